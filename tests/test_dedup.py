"""Deduplication invariants as hypothesis properties."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from simulator.models import ModelSpec
from simulator.planner import COMPUTE, LOAD, Planner
from simulator.profile import CostModel, load_profile
from simulator.engine import Engine
from simulator.scenario import PolicySpec
from simulator.traces import generate
from simulator.traces.trace import concat_steps

PROFILE = load_profile("h100-probe")


def model(E, k, L=3):
    return ModelSpec(name="m", num_layers=L, num_experts=E, top_k=k, hidden=768, ffn=3072, dtype="fp32")


def random_trace(E, k, B, L, steps, seed):
    return generate(num_layers=L, num_experts=E, top_k=k, batch_size=B, steps=steps, seed=seed,
                    generator="zipf", zipf=1.0)


def run(m, trace, load, memory="pinned"):
    pol = PolicySpec(name=load, load=load, memory=memory)
    planner = Planner(m, pol, trace)
    cost = CostModel(PROFILE, m.shape_key, m.expert_bytes, m.activation_bytes_per_token, 4096)
    recs = Engine(cost, memory, 0.01).run(planner)
    return recs


dims = st.tuples(st.integers(2, 24), st.integers(1, 4), st.integers(1, 12), st.integers(0, 10_000)).filter(
    lambda t: t[1] <= t[0])


@settings(max_examples=40, deadline=None)
@given(dims)
def test_dedup_counts(d):
    E, k, B, seed = d
    m = model(E, k)
    tr = random_trace(E, k, B, 3, 3, seed)
    for r in run(m, tr, "dedup"):
        dec = r.decisions
        assert dec.unique_requests <= dec.requests
        assert dec.transfers == dec.misses            # no cache: every unique expert is copied
        assert dec.bytes_h2d == dec.transfers * m.expert_bytes
        savings = (dec.requests - dec.unique_requests) / dec.requests
        assert 0 <= savings < 1
        if B == 1:
            assert savings == 0


@settings(max_examples=30, deadline=None)
@given(dims, st.sampled_from(["pinned", "pageable"]))
def test_dedup_never_worse_than_per_item(d, memory):
    E, k, B, seed = d
    m = model(E, k)
    tr = random_trace(E, k, B, 3, 3, seed)
    per_item = run(m, tr, "per-item", memory)
    dedup = run(m, tr, "dedup", memory)
    for a, b in zip(per_item, dedup):
        assert b.decisions.bytes_h2d <= a.decisions.bytes_h2d
        assert b.latency_ms <= a.latency_ms + 1e-9


@settings(max_examples=25, deadline=None)
@given(dims, st.randoms(use_true_random=False))
def test_permuting_items_changes_nothing(d, rnd):
    E, k, B, seed = d
    m = model(E, k)
    tr = random_trace(E, k, B, 3, 3, seed)
    parts = []
    for s in range(tr.num_steps):
        perm = list(range(B))
        rnd.shuffle(perm)
        parts.append((tr.step(s)[perm], tr.seq[tr.step_offsets[s]:tr.step_offsets[s + 1]][perm], 0))
    shuffled = concat_steps(parts, E, {})
    a, b = run(m, tr, "dedup"), run(m, shuffled, "dedup")
    assert [r.decisions.as_dict() for r in a] == [r.decisions.as_dict() for r in b]
    assert [r.latency_ms for r in a] == [r.latency_ms for r in b]


def test_plan_serves_every_routed_token_once():
    m = model(16, 3, L=4)
    tr = random_trace(16, 3, 8, 4, 5, 3)
    for load in ("per-item", "dedup", "coalesced"):
        planner = Planner(m, PolicySpec(name="p", load=load, cache={"kind": "lru", "capacity": 5}), tr)
        for s in range(tr.num_steps):
            layers, _ = planner.plan_step(s)
            for l, ops in enumerate(layers):
                routed = np.bincount(tr.step(s)[:, l].ravel(), minlength=16)
                served = np.zeros(16, dtype=int)
                for op in ops:
                    if op[0] == COMPUTE:
                        served[op[2] % 16] += op[3]
                    if op[0] == LOAD and not op[4]:
                        assert len(op[1]) == len(op[2])
                assert (served == routed).all(), (load, s, l)
