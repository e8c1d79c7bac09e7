"""The planner's fast paths make the very plans of its general path: the bulk plan of a cache
that keeps nothing (``Planner._plan_staged``) and LRU/FIFO's one-call eviction
(``_Stamped.replace``) against the policy's plain victim search, removal and insertion."""
from __future__ import annotations

from functools import lru_cache

import pytest

from simulator.models import ModelSpec
from simulator.planner import Planner, StepRouting
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


def _general(planner: Planner) -> Planner:
    """The same planner on its general path: every request and insertion through the policy."""
    planner.plain_layers = False
    for c in planner.caches:
        c.plain = False
    return planner


@pytest.mark.parametrize("kind", ["lru", "fifo"])
@pytest.mark.parametrize("load", ["dedup", "coalesced", "layer"])
@pytest.mark.parametrize("prefetch", [{"kind": "none"}, {"kind": "oracle"}, {"kind": "predicted", "accuracy": 0.6},
                                      {"kind": "oracle", "budget": 2}])
@pytest.mark.parametrize("capacity,scope", [(1, "global"), (3, "global"), (7, "global"), (2, "per-layer")])
def test_lru_fifo_fast_paths_equal_the_general_path(kind, load, prefetch, capacity, scope):
    """Tiny caches too: held residents in the way (parked, put back, released for a demand)."""
    spec = PolicySpec(name="p", load=load, cache={"kind": kind, "capacity": capacity * M.expert_bytes, "scope": scope},
                      prefetch=prefetch)
    tr = _trace(6, 2)
    fast = Planner(M, spec, tr, seed=1)
    assert fast.caches[0].plain and fast.plain_layers
    assert _plans(fast) == _plans(_general(Planner(M, spec, tr, seed=1)))


@pytest.mark.parametrize("batch,prefill", [(1, 0), (5, 0), (4, 3)])
def test_steps_looked_at_together_equal_one_by_one(batch, prefill):
    tr = _trace(batch, prefill)
    for start, stop in ((0, tr.num_steps), (2, 5), (3, 4)):
        for i, got in enumerate(StepRouting.steps(tr, start, stop, M.num_experts, future=True)):
            one = StepRouting(tr.step(start + i), M.num_experts)
            assert (got.routing == one.routing).all() and (got.keys == one.keys).all()
            assert got.uniq.tolist() == one.uniq.tolist() and got.counts.tolist() == one.counts.tolist()
            assert got.bounds == one.bounds and got.lists() == one.lists()
            assert [got.future(l) for l in range(M.num_layers)] == [one.future(l) for l in range(M.num_layers)]
            assert got.layer_keys() == one.layer_keys()


def test_planner_reads_the_routing_in_chunks_of_steps(monkeypatch):
    """Out of order too (a live executor may ask again): the same plans as one step at a time."""
    import simulator.planner as planner_mod

    spec = PolicySpec(name="p", load="dedup", cache={"kind": "lru", "capacity": 4 * M.expert_bytes},
                      prefetch={"kind": "oracle"})
    tr = _trace(5, 0)
    want = _plans(Planner(M, spec, tr, seed=1))
    monkeypatch.setattr(planner_mod, "CHUNK_REQUESTS", 2 * 5 * M.num_layers * M.top_k)   # two steps a chunk
    p = Planner(M, spec, tr, seed=1)
    assert [(layers, d.as_dict()) for layers, d in map(p.plan_step, range(tr.num_steps))] == want
    assert len(p._chunk) == 2
    again = Planner(M, spec, tr, seed=1)
    got = [again.plan_step(s) for s in range(tr.num_steps)]
    assert again.routing_of(1) is not None and again.routing_of(0).routing.shape == tr.step(0).shape
    assert [(layers, d.as_dict()) for layers, d in got] == want
