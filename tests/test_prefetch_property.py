"""Oracle next-layer prefetch is never slower than no prefetch when it cannot change what the
cache evicts (the cache never evicts) and copies do not block the host (pinned memory): the
same copies, each issued no later. For every load mode and cache scope, including a capacity
exactly equal to the working set (global: every distinct expert of the trace; per-layer: every
expert of a layer).

CI runs a few hundred examples; ``SIMMOE_PROPERTY_EXAMPLES=5000`` runs the larger check
reported in BENCHMARKS.md."""
from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, example, given, settings, strategies as st

from simulator.engine import Engine
from simulator.models import ModelSpec
from simulator.planner import Planner
from simulator.profile import CostModel, load_profile
from simulator.scenario import PolicySpec
from simulator.traces import generate

EXAMPLES = int(os.environ.get("SIMMOE_PROPERTY_EXAMPLES", "250"))
PROFILE = load_profile("h100-probe")


def _run(m, tr, load, cache, prefetch):
    cost = CostModel(PROFILE, m.shape_key, m.expert_bytes, m.activation_bytes_per_token, tr.max_step_tokens)
    pol = PolicySpec(name="p", load=load, cache=cache, prefetch={"kind": prefetch})
    return Engine(cost, "pinned", 0.02).run(Planner(m, pol, tr, seed=1))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(L=2, E=3, k=2, B=6, seed=0, load="per-item", scope="global", exact=True, steps=3)
@example(L=3, E=4, k=2, B=5, seed=1, load="coalesced", scope="per-layer", exact=True, steps=3)
@given(L=st.integers(1, 5), E=st.integers(2, 12), k=st.integers(1, 4), B=st.integers(1, 9),
       seed=st.integers(0, 10**6), load=st.sampled_from(["per-item", "dedup", "coalesced"]),
       scope=st.sampled_from(["global", "per-layer"]), exact=st.booleans(), steps=st.integers(1, 5))
def test_oracle_prefetch_never_slower_without_evictions(L, E, k, B, seed, load, scope, exact, steps):
    k = min(k, E)
    m = ModelSpec(name="m", num_layers=L, num_experts=E, top_k=k, hidden=768, ffn=3072, dtype="fp32")
    tr = generate(num_layers=L, num_experts=E, top_k=k, batch_size=B, steps=steps, seed=seed, generator="mixed",
                  zipf=0.7, temporal=0.3)
    if scope == "global":
        capacity = len(np.unique(tr.experts.astype(np.int64) + np.arange(L)[None, :, None] * E)) if exact else L * E
    else:
        capacity = E
    cache = {"kind": "lru", "capacity": capacity, "scope": scope}
    none = _run(m, tr, load, cache, "none")
    oracle = _run(m, tr, load, cache, "oracle")
    assert sum(r.decisions.transfers for r in oracle) == sum(r.decisions.transfers for r in none)
    for a, b in zip(none, oracle):
        assert b.latency_ms <= a.latency_ms + 1e-9, (a.step, a.latency_ms, b.latency_ms)


@settings(max_examples=max(50, EXAMPLES // 5), deadline=None)
@given(L=st.integers(2, 5), E=st.integers(2, 10), k=st.integers(1, 3), B=st.integers(1, 9),
       seed=st.integers(0, 10**6), load=st.sampled_from(["per-item", "dedup", "coalesced"]))
def test_oracle_with_room_for_the_working_set_leaves_misses_only_at_layer_0(L, E, k, B, seed, load):
    """A per-layer cache of every expert of its layer: the oracle fetches every expert a
    layer >= 1 needs (no slot held in reserve), so the only demand misses are layer 0's first
    uses (nothing is prefetched across a step boundary)."""
    k = min(k, E)
    m = ModelSpec(name="m", num_layers=L, num_experts=E, top_k=k, hidden=768, ffn=3072, dtype="fp32")
    tr = generate(num_layers=L, num_experts=E, top_k=k, batch_size=B, steps=4, seed=seed, generator="mixed", zipf=0.5)
    recs = _run(m, tr, load, {"kind": "lru", "capacity": E, "scope": "per-layer"}, "oracle")
    assert sum(r.decisions.misses for r in recs) == len(np.unique(tr.experts[:, 0, :]))
