"""Engine invariants: capacity, time order, termination, Belady bound, prefetch bound."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from simulator.engine import Engine
from simulator.expert_cache import ExpertCache
from simulator.models import ModelSpec
from simulator.planner import Planner
from simulator.profile import CostModel, load_profile
from simulator.scenario import PolicySpec
from simulator.traces import expected_unique_uniform, generate

PROFILE = load_profile("h100-probe")
M = ModelSpec(name="m", num_layers=4, num_experts=12, top_k=2, hidden=768, ffn=3072, dtype="fp32")
COST = CostModel(PROFILE, M.shape_key, M.expert_bytes, M.activation_bytes_per_token, 4096)


def trace(B=4, steps=6, seed=0, **knobs):
    knobs.setdefault("zipf", 0.8)
    return generate(num_layers=M.num_layers, num_experts=M.num_experts, top_k=M.top_k, batch_size=B,
                    steps=steps, seed=seed, generator="mixed", **knobs)


def simulate(policy: dict, tr, timeline=None, memory=None):
    pol = PolicySpec(name="p", **policy)
    planner = Planner(M, pol, tr, seed=3)
    return planner, Engine(COST, memory or pol.memory, 0.02, timeline=timeline).run(planner)


policies = st.fixed_dictionaries({
    "load": st.sampled_from(["per-item", "dedup", "coalesced"]),
    "cache": st.fixed_dictionaries({
        "kind": st.sampled_from(["lru", "fifo", "lfu", "belady", "static-hot"]),
        "capacity": st.integers(1, 30),
        "scope": st.sampled_from(["global", "per-layer"]),
    }),
    "prefetch": st.fixed_dictionaries({
        "kind": st.sampled_from(["none", "oracle", "predicted", "popularity"]),
        "budget": st.one_of(st.none(), st.integers(1, 6)),
    }),
    "memory": st.sampled_from(["pinned", "pageable"]),
})


@settings(max_examples=60, deadline=None)
@given(policy=policies, B=st.integers(1, 9), seed=st.integers(0, 1000))
def test_any_configuration_terminates_within_capacity_and_in_time_order(policy, B, seed):
    occupancy_ok = []
    original = ExpertCache.insert

    def checked_insert(self, key, t, protected):
        out = original(self, key, t, protected)
        occupancy_ok.append(len(self) <= self.slots and not (out[1] is not None and out[1] in protected))
        return out

    tr = trace(B=B, steps=5, seed=seed, temporal=0.3)
    tl: list = []
    ExpertCache.insert = checked_insert
    try:
        planner, recs = simulate(policy, tr, timeline=tl)
    finally:
        ExpertCache.insert = original
    assert [r.step for r in recs] == list(range(tr.num_steps))     # every step finished
    assert all(occupancy_ok)
    for r in recs:
        d = r.decisions
        assert d.hits + d.misses == d.served                        # each request served once
        assert d.prefetches_used <= d.prefetches_issued + 64
    starts = [r.start_ms for r in recs]
    assert starts == sorted(starts)
    for stream in ("compute", "copy"):
        ev = [(s, e) for name, s, e, *_ in tl if name == stream]
        for (s0, e0), (s1, e1) in zip(ev, ev[1:]):
            assert s0 <= e0 <= s1 <= e1                             # a stream never overlaps or rewinds
    issued = sum(r.decisions.prefetches_issued for r in recs)
    used = sum(r.decisions.prefetches_used for r in recs)
    wasted = sum(r.decisions.prefetches_wasted for r in recs)
    assert used + wasted <= issued


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 40), st.integers(0, 500), st.sampled_from(["global", "per-layer"]))
def test_belady_bounds_every_policy(B, capacity, seed, scope):
    if scope == "per-layer":
        capacity = max(1, capacity // 4)
    tr = trace(B=B, steps=8, seed=seed, temporal=0.4)
    hits = {}
    for kind in ("lru", "fifo", "lfu", "belady"):
        _, recs = simulate({"load": "dedup", "cache": {"kind": kind, "capacity": capacity, "scope": scope}}, tr)
        hits[kind] = sum(r.decisions.hits for r in recs)
    assert hits["belady"] >= max(hits.values())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(0, 24), st.integers(0, 500))
def test_oracle_prefetch_never_slower(B, extra, seed):
    """A theorem where prefetching cannot change what the cache evicts (it never evicts) and
    copies do not block the host (pinned): the same copies, each issued no later. With
    evictions LRU's recency order shifts (test_oracle_prefetch_with_evictions), a tiny cache
    can lose a streaming slot (test_tiny_cache_prefetch_can_lose), and pageable prefetch
    copies block the host (test_pageable_prefetch_blocks_host); docs/architecture.md."""
    capacity = M.num_layers * M.num_experts + extra
    tr = trace(B=B, steps=6, seed=seed)
    cache = {"kind": "lru", "capacity": capacity}
    _, none = simulate({"cache": cache}, tr)
    _, oracle = simulate({"cache": cache, "prefetch": {"kind": "oracle"}}, tr)
    for a, b in zip(none, oracle):
        assert b.latency_ms <= a.latency_ms + 1e-9
        assert b.decisions.transfers == a.decisions.transfers


def test_oracle_prefetch_with_evictions():
    """With an evicting LRU cache of two working sets or more, the oracle is faster in total
    on nearly every trace, and never slower by more than a few percent."""
    ratios = []
    for seed in range(60):
        B = 1 + seed % 8
        capacity = 2 * min(B * M.top_k, M.num_experts) + seed % 7
        tr = trace(B=B, steps=6, seed=seed)
        _, none = simulate({"cache": {"kind": "lru", "capacity": capacity}}, tr)
        _, oracle = simulate({"cache": {"kind": "lru", "capacity": capacity}, "prefetch": {"kind": "oracle"}}, tr)
        ratios.append(sum(r.latency_ms for r in oracle) / sum(r.latency_ms for r in none))
    ratios = np.array(ratios)
    assert np.mean(ratios <= 1 + 1e-12) >= 0.9
    assert ratios.max() < 1.05
    assert np.median(ratios) < 1.0


def test_streaming_through_one_slot_terminates_and_serialises():
    tr = trace(B=8, steps=3, seed=1)
    tl: list = []
    _, recs = simulate({"cache": {"kind": "lru", "capacity": 1}}, tr, timeline=tl)
    assert len(recs) == 3
    loads = [x for x in tl if x[0] == "copy"]
    computes = [x for x in tl if x[0] == "compute" and x[3] == 2]
    # with one slot every load must wait for the previous expert's compute to finish
    for (_, ls, le, *_), (_, cs, ce, *_) in zip(loads[1:], computes):
        assert ls >= ce - 1e-12


def test_uniform_unique_experts_match_formula():
    E, k, B, L, steps = 32, 4, 6, 4, 400
    m = ModelSpec(name="u", num_layers=L, num_experts=E, top_k=k, hidden=768, ffn=3072, dtype="fp32")
    tr = generate(num_layers=L, num_experts=E, top_k=k, batch_size=B, steps=steps, seed=11, generator="uniform")
    planner = Planner(m, PolicySpec(name="d", load="dedup"), tr)
    per_layer = []
    for s in range(steps):
        _, d = planner.plan_step(s)
        per_layer.append(d.unique_requests / L)
    x = np.array([len(np.unique(tr.step(s)[:, l])) for s in range(steps) for l in range(L)])
    mean, se = x.mean(), x.std(ddof=1) / math.sqrt(len(x))
    expected = expected_unique_uniform(E, k, B)
    assert abs(mean - expected) < 4 * se
    assert abs(np.mean(per_layer) - expected) < 4 * se


def test_cpu_miss_moves_no_expert_bytes():
    prof = dict(PROFILE.to_json())
    prof["compute"] = dict(prof["compute"], cpu={M.shape_key: [[1, 1.0], [64, 8.0]]})
    from simulator.profile import parse_profile

    cost = CostModel(parse_profile(prof, "t"), M.shape_key, M.expert_bytes, M.activation_bytes_per_token, 64)
    tr = trace(B=4, steps=3)
    planner = Planner(M, PolicySpec(name="c", miss="cpu"), tr)
    recs = Engine(cost, "pinned", 0.02).run(planner)
    assert all(r.decisions.bytes_h2d == 0 and r.decisions.cpu_computes == r.decisions.misses for r in recs)
    assert all(r.cpu_ms > 0 for r in recs)


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_static_hot_keeps_hot_set_resident(scope):
    tr = trace(B=4, steps=6, zipf=1.5)
    planner, recs = simulate({"cache": {"kind": "static-hot", "capacity": 8, "staging": 2, "scope": scope}}, tr)
    assert len(planner.preloaded) == (6 if scope == "global" else 6 * M.num_layers)
    for c in planner.caches:
        assert c.policy.hot <= set(c.slot_of)       # hot experts never left


def test_tiny_cache_prefetch_can_lose():
    """The counter-example: 2 slots, 3 experts per layer; the prefetched expert's slot is
    pinned until its layer, so the other two stream through one slot."""
    tr = trace(B=3, steps=6, seed=11)
    _, none = simulate({"cache": {"kind": "lru", "capacity": 2}}, tr)
    _, oracle = simulate({"cache": {"kind": "lru", "capacity": 2}, "prefetch": {"kind": "oracle"}}, tr)
    assert sum(r.latency_ms for r in oracle) > sum(r.latency_ms for r in none)


def test_prefetch_pays_less_from_pageable_memory():
    """A prefetch copy from pageable memory blocks the host while it runs, so it overlaps
    less of the layer's work than a pinned one: the gain is smaller."""
    gains = {"pinned": [], "pageable": []}
    for seed in range(8):
        tr = trace(B=2, steps=6, seed=seed)
        cache = {"kind": "lru", "capacity": 10}
        for memory in gains:
            _, none = simulate({"cache": cache, "memory": memory}, tr)
            _, oracle = simulate({"cache": cache, "memory": memory, "prefetch": {"kind": "oracle"}}, tr)
            gains[memory].append(1 - sum(r.latency_ms for r in oracle) / sum(r.latency_ms for r in none))
    assert np.median(gains["pinned"]) > np.median(gains["pageable"])
    assert np.median(gains["pinned"]) > 0.02


def test_pageable_tail_delays_only_the_blocked_host():
    """``host.pageable_tail_us`` is host time after each blocking pageable copy: per-item loads
    (each copy blocks, the host is the critical path) slow down by about a tail per copy;
    pinned runs do not change at all."""
    doc = PROFILE.to_json()
    doc["host"]["pageable_tail_us"] = 200.0
    from simulator.profile import parse_profile

    tailed = CostModel(parse_profile(doc, "tailed"), M.shape_key, M.expert_bytes, M.activation_bytes_per_token, 4096)
    tr = trace(B=3, steps=4, seed=5)
    for memory, load in (("pageable", "per-item"), ("pinned", "dedup")):
        pol = PolicySpec(name="p", load=load, memory=memory)
        base = Engine(COST, memory, 0.02).run(Planner(M, pol, tr, seed=3))
        slow = Engine(tailed, memory, 0.02).run(Planner(M, pol, tr, seed=3))
        extra = sum(b.latency_ms for b in slow) - sum(a.latency_ms for a in base)
        copies = sum(r.decisions.copies for r in base)
        if memory == "pinned":
            assert extra == 0.0
        else:
            assert copies > 0 and 0.5 * 0.2 * copies <= extra <= 0.2 * copies + 1e-9
