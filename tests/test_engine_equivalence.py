"""The fast engine equals the all-events reference engine bit for bit: step records (every
float compared with ==) and timelines, over every policy family, load mode, memory kind, miss
policy, prefill and per-layer caches."""
from __future__ import annotations

from dataclasses import fields

import pytest
from hypothesis import given, settings, strategies as st

from reference_engine import Engine as ReferenceEngine
from simulator.engine import Engine
from simulator.models import ModelSpec
from simulator.planner import Planner
from simulator.profile import CostModel, load_profile, parse_profile
from simulator.scenario import PolicySpec
from simulator.timeline import policy_events
from simulator.traces import generate

M = ModelSpec(name="m", num_layers=4, num_experts=12, top_k=2, hidden=768, ffn=3072, dtype="fp32")


def _cost(tail_us: float = 0.0, blocks: bool = True, cpu_transfers: bool = False) -> CostModel:
    doc = load_profile("h100-probe").to_json()
    doc["host"]["pageable_tail_us"] = tail_us
    doc["host"]["pageable_blocks_host"] = blocks
    doc["host"]["cpu_path_includes_transfers"] = cpu_transfers
    doc["compute"] = dict(doc["compute"], cpu={M.shape_key: [[1, 0.9], [8, 2.5], [64, 9.0]]})
    prof = parse_profile(doc, f"t{tail_us}{blocks}{cpu_transfers}")
    return CostModel(prof, M.shape_key, M.expert_bytes, M.activation_bytes_per_token, 64)


COSTS = {(t, b, c): _cost(t, b, c) for t in (0.0, 35.0) for b in (True, False) for c in (False, True)}

policies = st.fixed_dictionaries({
    "load": st.sampled_from(["per-item", "dedup", "coalesced"]),
    "cache": st.one_of(
        st.just({"kind": "none"}),
        st.fixed_dictionaries({
            "kind": st.sampled_from(["none", "lru", "fifo", "lfu", "belady", "static-hot"]),
            "capacity": st.integers(1, 60),
            "scope": st.sampled_from(["global", "per-layer"]),
        })),
    "prefetch": st.fixed_dictionaries({
        "kind": st.sampled_from(["none", "oracle", "predicted", "popularity"]),
        "budget": st.one_of(st.none(), st.integers(1, 6)),
    }),
    "miss": st.one_of(st.just("copy"), st.just("cpu"),
                      st.fixed_dictionaries({"kind": st.just("cpu"), "max_tokens": st.integers(1, 4)})),
    "memory": st.sampled_from(["pinned", "pageable"]),
})


def _run(engine_cls, pol, tr, cost, dense_ms, timeline):
    planner = Planner(M, pol, tr, seed=3)
    return engine_cls(cost, pol.memory, dense_ms, timeline=timeline).run(planner)


def _assert_same(pol, tr, cost, dense_ms):
    tl_ref, tl_new = [], []
    ref = _run(ReferenceEngine, pol, tr, cost, dense_ms, tl_ref)
    new = _run(Engine, pol, tr, cost, dense_ms, tl_new)
    assert len(ref) == len(new) == tr.num_steps
    for a, b in zip(ref, new):
        for f in fields(a):
            va, vb = getattr(a, f.name), getattr(b, f.name)
            assert va == vb, (f.name, a.step, va, vb)
            if isinstance(va, float):
                assert va.hex() == vb.hex()
    for stream in ("compute", "copy", "cpu"):   # each track in its own order, bit for bit
        assert [r for r in tl_ref if r[0] == stream] == [r for r in tl_new if r[0] == stream]
    # and the Perfetto events built from them
    import pandas as pd
    steps = pd.DataFrame([{"step": r.step, "phase": r.phase, "start_ms": r.start_ms, "latency_ms": r.latency_ms}
                          for r in ref])
    assert policy_events(1, "p", 1, tl_ref, steps, M.num_experts) == policy_events(1, "p", 1, tl_new, steps,
                                                                                   M.num_experts)


@settings(max_examples=150, deadline=None)
@given(policy=policies, B=st.integers(1, 9), seed=st.integers(0, 10_000), prefill=st.sampled_from([0, 0, 3]),
       tail=st.sampled_from([0.0, 35.0]), blocks=st.booleans(), cpu_transfers=st.booleans(),
       dense_ms=st.sampled_from([0.0, 0.02, 0.3]))
def test_fast_engine_equals_reference(policy, B, seed, prefill, tail, blocks, cpu_transfers, dense_ms):
    if policy["cache"]["kind"] == "none" and policy["prefetch"]["kind"] != "none":
        policy = dict(policy, prefetch={"kind": "none"})
    pol = PolicySpec(name="p", **policy)
    tr = generate(num_layers=M.num_layers, num_experts=M.num_experts, top_k=M.top_k, batch_size=B, steps=5,
                  seed=seed, generator="mixed", zipf=0.7, temporal=0.3, batch_locality=0.3,
                  prefill_tokens=prefill)
    _assert_same(pol, tr, COSTS[(tail, blocks, cpu_transfers)], dense_ms)


@pytest.mark.parametrize("load", ["per-item", "dedup", "coalesced"])
@pytest.mark.parametrize("memory", ["pinned", "pageable"])
def test_fast_engine_equals_reference_long_runs(load, memory):
    """Long runs: clocks in the seconds, where rounding of ``now + delay`` differs most."""
    tr = generate(num_layers=M.num_layers, num_experts=M.num_experts, top_k=M.top_k, batch_size=6, steps=300,
                  seed=5, generator="mixed", zipf=0.9, temporal=0.4)
    pol = PolicySpec(name="p", load=load, memory=memory, cache={"kind": "lru", "capacity": 20},
                     prefetch={"kind": "predicted", "accuracy": 0.6})
    _assert_same(pol, tr, COSTS[(35.0, True, False)], 0.05)


@pytest.mark.parametrize("kind", ["history", "affinity"])
@pytest.mark.parametrize("load", ["per-item", "coalesced"])
def test_fast_engine_equals_reference_with_learned_prefetch(tmp_path, kind, load):
    from simulator.traces.real import sequences_from_trace

    corpus = generate(num_layers=M.num_layers, num_experts=M.num_experts, top_k=M.top_k, batch_size=12, steps=40,
                      seed=8, generator="mixed", zipf=0.6, temporal=0.5, cross_layer=0.5)
    path = tmp_path / "train.npz"
    sequences_from_trace(corpus).save(path)
    tr = generate(num_layers=M.num_layers, num_experts=M.num_experts, top_k=M.top_k, batch_size=4, steps=20,
                  seed=9, generator="mixed", zipf=0.6, temporal=0.5, cross_layer=0.5)
    pol = PolicySpec(name="p", load=load, cache={"kind": "lru", "capacity": 14},
                     prefetch={"kind": kind, "options": {"train": {"path": str(path)}}})
    _assert_same(pol, tr, COSTS[(0.0, True, False)], 0.05)
