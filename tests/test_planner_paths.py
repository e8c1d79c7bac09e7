"""The planner's fast paths make the very plans of its general path: the bulk plan of a cache
that keeps nothing (``Planner._plan_staged``) and LRU/FIFO's one-call eviction
(``_Stamped.replace``) against the policy's plain victim search, removal and insertion."""
from __future__ import annotations

from functools import lru_cache

import pytest

from simulator.models import ModelSpec
from simulator.planner import Planner
from simulator.policies.base import EvictionPolicy
from simulator.policies.cache import _Stamped
from simulator.scenario import PolicySpec
from simulator.traces import generate

M = ModelSpec(name="m", num_layers=3, num_experts=10, top_k=3, hidden=64, ffn=128, dtype="fp32")


@lru_cache(maxsize=None)
def _trace(batch: int, prefill: int):
    return generate(num_layers=M.num_layers, num_experts=M.num_experts, top_k=M.top_k, batch_size=batch, steps=6,
                    seed=batch + prefill, generator="mixed", zipf=0.8, temporal=0.4, batch_locality=0.3,
                    prefill_tokens=prefill)


def _plans(planner: Planner) -> list:
    return [(layers, d.as_dict()) for layers, d in map(planner.plan_step, range(planner.trace.num_steps))]


@pytest.mark.parametrize("load", ["per-item", "dedup", "coalesced", "layer"])
@pytest.mark.parametrize("capacity", [None, 1, 4])
@pytest.mark.parametrize("batch,prefill", [(5, 0), (4, 3)])
def test_bulk_plan_of_a_cache_that_keeps_nothing_equals_the_general_path(load, capacity, batch, prefill):
    cache = {"kind": "none"} if capacity is None else {"kind": "none", "capacity": capacity * M.expert_bytes}
    if load == "layer":
        cache = {"kind": "none", "capacity": M.num_experts * M.expert_bytes}
    spec = PolicySpec(name="p", load=load, cache=cache)
    tr = _trace(batch, prefill)
    fast, slow = Planner(M, spec, tr, seed=1), Planner(M, spec, tr, seed=1)
    assert fast.staged
    slow.staged = False
    assert _plans(fast) == _plans(slow)


@pytest.mark.parametrize("kind", ["lru", "fifo", "static-hot"])
@pytest.mark.parametrize("load", ["per-item", "dedup", "coalesced"])
@pytest.mark.parametrize("prefetch", ["none", "oracle"])
@pytest.mark.parametrize("capacity", [2, 7])
def test_one_call_eviction_equals_victim_remove_insert(monkeypatch, kind, load, prefetch, capacity):
    spec = PolicySpec(name="p", load=load, cache={"kind": kind, "capacity": capacity * M.expert_bytes},
                      prefetch={"kind": prefetch})
    tr = _trace(6, 2)
    fast = _plans(Planner(M, spec, tr, seed=1))
    monkeypatch.setattr(_Stamped, "replace", EvictionPolicy.replace)
    assert fast == _plans(Planner(M, spec, tr, seed=1))
