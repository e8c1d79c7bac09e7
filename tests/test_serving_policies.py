"""Phase-aware policies: prefill bypass keeps the decode working set, warm admits the prompt's
hottest experts, the upload budget caps a step's copies, prefill and decode prefetch apart."""
from __future__ import annotations

import numpy as np
import pytest

from serving_helpers import serving_dict, serving_scenario
from simulator.planner import LOAD
from simulator.profile import load_profile
from simulator.scenario import parse_scenario
from simulator.serving.planner import ServingPlanner, StepTrace
from simulator.serving.runner import serve_one

L, E, K = 4, 16, 2


def planner(serving=None, cache=8, prefetch=None):
    pol = {"name": "p", "cache": {"kind": "lru", "capacity": cache}, "serving": serving or {}}
    if prefetch:
        pol["prefetch"] = prefetch
    sc = serving_scenario(policies=[pol])
    trace = StepTrace(L, E, K, 64)
    return ServingPlanner(sc.model, sc.policies[0], trace, seed=0), trace


def decode_rows(n=2):
    """n decode tokens routing experts {0, 1} at every layer: a working set of 8 keys."""
    return np.tile(np.array([0, 1]), (n, L, 1))


def prefill_rows(n=32, seed=0):
    g = np.random.Generator(np.random.PCG64(seed))
    return np.stack([np.stack([g.choice(np.arange(2, E), K, replace=False) for _ in range(L)]) for _ in range(n)])


def add(trace, rows, kind):
    return trace.append(rows, np.full(len(rows), kind, np.uint8), np.zeros(len(rows), np.int64))


def cache_keys(p):
    return set(p.caches[0].slot_of)


@pytest.mark.parametrize("mode", ["cache", "bypass", "warm"])
def test_prefill_placement_and_the_decode_working_set(mode):
    p, tr = planner({"prefill": mode, "keep_top": 1})
    p.plan_step(add(tr, decode_rows(), 0))            # the decode working set enters the cache
    before = cache_keys(p)
    assert len(before) == 8
    _, dec = p.plan_step(add(tr, prefill_rows(), 1))  # a prompt touching 14 other experts per layer
    after = cache_keys(p)
    _, nxt = p.plan_step(add(tr, decode_rows(), 0))
    if mode == "bypass":
        assert after == before and nxt.misses == 0 and p.staged_loads == dec.misses > 0
    elif mode == "warm":                              # one prompt expert per layer admitted
        assert len(after - before) <= L and len(after - before) >= 1 and nxt.misses > 0
    else:
        assert not (before <= after) and nxt.misses > 0 and p.staged_loads == 0
    assert dec.transfers == dec.misses                # every prefill miss was copied once


def test_mixed_step_keeps_decode_experts_in_the_cache():
    p, tr = planner({"prefill": "bypass"})
    rows = np.concatenate([decode_rows(1), prefill_rows(8)])
    kinds = np.array([0] + [1] * 8, np.uint8)
    layers, _ = p.plan_step(tr.append(rows, kinds, np.arange(9)))
    assert set(range(0, L * E, E)) | set(range(1, L * E, E)) <= cache_keys(p)
    staged_keys = {k for ops in layers for op in ops if op[0] == LOAD for k in op[2]
                   if any(s >= p.staging_base for s in op[1])}
    assert staged_keys and not staged_keys & cache_keys(p)


def test_staging_slots_are_a_ring_after_the_cache():
    p, tr = planner({"prefill": "bypass", "staging": 3})
    assert p.total_slots == 8 + 3 and p.staging_base == 8
    layers, _ = p.plan_step(add(tr, prefill_rows(), 1))
    slots = [op[1][0] for ops in layers for op in ops if op[0] == LOAD]
    assert set(slots) <= {8, 9, 10} and slots[:4] == [8, 9, 10, 8]


@pytest.mark.parametrize("phase", ["prefill", "all"])
def test_upload_budget_caps_copies_per_step(phase):
    p, tr = planner({"upload_budget": 5, "budget_phase": phase})
    _, d0 = p.plan_step(add(tr, decode_rows(), 0))
    _, d1 = p.plan_step(add(tr, prefill_rows(), 1))
    assert d1.transfers == 5 and d1.cpu_computes == d1.misses - 5
    assert p.budget.over == d0.cpu_computes + d1.cpu_computes
    if phase == "all":
        assert d0.transfers == 5 and d0.cpu_computes == 3
    else:
        assert d0.transfers == 8 and d0.cpu_computes == 0


def test_upload_budget_caps_prefetch_too():
    p, tr = planner({"upload_budget": 3, "budget_phase": "all"}, cache=32, prefetch={"kind": "oracle"})
    _, d = p.plan_step(add(tr, prefill_rows(), 1))
    assert d.transfers <= 3


def test_separate_prefill_and_decode_prefetch():
    p, tr = planner({"prefill_prefetch": {"kind": "oracle"}}, cache=32)
    _, dd = p.plan_step(add(tr, decode_rows(), 0))
    _, dp = p.plan_step(add(tr, prefill_rows(4), 1))
    _, dd2 = p.plan_step(add(tr, decode_rows(), 0))
    assert dd.prefetches_issued == 0 and dd2.prefetches_issued == 0 and dp.prefetches_issued > 0


def test_policies_needing_the_future_are_refused():
    sc = serving_scenario(policies=[{"name": "b", "cache": {"kind": "belady", "capacity": 8}}])
    with pytest.raises(ValueError, match="whole request stream"):
        ServingPlanner(sc.model, sc.policies[0], StepTrace(L, E, K, 64))


def test_bypass_wins_back_decode_hits_on_a_serving_run():
    """Prompts between decode tokens: LRU lets each prompt evict the decode working set;
    bypass keeps it (higher decode-step hit rate, lower TPOT and TTFT)."""
    over = {"requests": 16, "arrivals": {"kind": "poisson", "rate": 10.0},
            "prompt": {"kind": "fixed", "value": 48}, "output": {"kind": "fixed", "value": 12},
            "scheduler": {"token_budget": 64, "chunk": 32}}
    pols = [{"name": "lru", "cache": {"kind": "lru", "capacity": 32}},
            {"name": "bypass", "cache": {"kind": "lru", "capacity": 32}, "serving": {"prefill": "bypass"}}]
    sc = parse_scenario(serving_dict(workload=over, policies=pols,
                                     trace={"generator": "temporal", "zipf": 1.2, "temporal": 0.8}))
    prof = load_profile(None)
    runs = {p.name: serve_one(sc, p, 4, 0, prof, index=i) for i, p in enumerate(sc.policies)}
    hit, tpot, ttft = {}, {}, {}
    for name, r in runs.items():
        dec = r.steps[r.steps["prefill_tokens"] == 0]
        hit[name] = dec["hits"].sum() / (dec["hits"] + dec["misses"]).sum()
        tpot[name], ttft[name] = r.requests["tpot_ms"].mean(), r.requests["ttft_ms"].mean()
    assert hit["bypass"] > hit["lru"] + 0.02
    assert tpot["bypass"] < tpot["lru"] and ttft["bypass"] < ttft["lru"]
    assert runs["bypass"].info["staged_loads"] > 0 and runs["lru"].info["staged_loads"] == 0


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from simulator.planner import COMPUTE, CPU  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), mode=st.sampled_from(["cache", "bypass", "warm"]),
       budget=st.one_of(st.none(), st.integers(0, 12)), phase=st.sampled_from(["prefill", "all"]),
       prefetch=st.sampled_from([None, "oracle"]), cache=st.integers(2, 40), staging=st.integers(1, 6))
def test_every_routed_expert_is_served_once_whatever_the_phase_policy(seed, mode, budget, phase, prefetch,
                                                                     cache, staging):
    serving = {"prefill": mode, "staging": staging, "keep_top": 2, "budget_phase": phase}
    if budget is not None:
        serving["upload_budget"] = budget
    p, tr = planner(serving, cache=cache, prefetch={"kind": prefetch} if prefetch else None)
    g = np.random.Generator(np.random.PCG64(seed))
    for s in range(6):
        n = int(g.integers(1, 12))
        rows = np.stack([np.stack([g.choice(E, K, replace=False) for _ in range(L)]) for _ in range(n)])
        kinds = (g.random(n) < 0.5).astype(np.uint8)
        layers, d = p.plan_step(tr.append(rows, kinds, np.arange(n)))
        copies = 0
        for l, ops in enumerate(layers):
            served = [op[2] for op in ops if op[0] == COMPUTE] + [op[1] for op in ops if op[0] == CPU]
            assert sorted(served) == sorted(set((l * E + rows[:, l, :]).ravel().tolist()))   # each once (dedup)
            copies += sum(len(op[2]) for op in ops if op[0] == LOAD)
        assert copies == d.transfers
        if budget is not None and (phase == "all" or kinds.any()):
            assert d.transfers <= budget
        assert len(p.caches[0].slot_of) <= cache


# ------------------------------------------------------------------ budget_over: defer
def test_fit_prefill_counts_each_prompt_tokens_first_misses():
    """fit_prefill keeps the longest prefix of prompt tokens whose distinct missed experts,
    with the decode tokens' (never deferred), fit the budget; resident experts cost nothing."""
    p, tr = planner({"upload_budget": 6, "budget_over": "defer"}, cache=64)
    p.plan_step(add(tr, decode_rows(), 0))                    # experts {0, 1} of every layer resident
    hit = np.tile(np.array([1, 0]), (3, L, 1))                # prompt tokens routing resident experts only
    new = np.tile(np.array([2, 3]), (1, L, 1))                # one token missing 8 keys (2 per layer)
    rows = np.concatenate([hit, new, hit])
    kinds = np.ones(len(rows), np.uint8)
    assert p.fit_prefill(rows, kinds) == 3                    # the 4th token's 8 misses exceed 6
    p.budget.budget = 8
    assert p.fit_prefill(rows, kinds) == 7                    # ... fit 8, and the rest hit
    dec = np.tile(np.array([4, 5]), (1, L, 1))                # a decode token missing 8 others
    both = np.concatenate([dec, rows])
    assert p.fit_prefill(both, np.r_[0, kinds].astype(np.uint8)) == 3   # 8 + 0 fits, 8 + 8 does not
    assert p.fit_prefill(new, np.ones(1, np.uint8)) == 1      # a step of one prompt token alone still runs
    p.budget.budget = 0
    assert p.fit_prefill(np.concatenate([dec, new]), np.array([0, 1], np.uint8)) == 0


DEFER = {"name": "defer", "cache": {"kind": "lru", "capacity": 64},
         "serving": {"prefill": "bypass", "upload_budget": 10, "budget_over": "defer"}}


def test_defer_keeps_copies_within_the_budget_and_serves_every_token():
    """With a cache holding every expert (no eviction within a step, so the estimate is exact)
    a step's copies stay within the budget except a lone prompt token run to make progress;
    nothing runs on the CPU; every request still gets its whole prompt and output; the
    prompts are spread over more steps than with misses sent to the CPU."""
    cpu = {**DEFER, "name": "cpu", "serving": {**DEFER["serving"], "budget_over": "cpu"}}
    sc = serving_scenario(policies=[DEFER, cpu])
    prof = load_profile("h100-pcie5")
    d = serve_one(sc, sc.policies[0], 4, 0, prof)
    c = serve_one(sc, sc.policies[1], 4, 0, prof)
    st = d.steps
    lone = (st["prefill_tokens"] == 1) & (st["decode_tokens"] == 0)
    capped = st["prefill_tokens"] > 0
    assert (st.loc[capped & ~lone, "transfers"] <= 10).all()
    assert st["cpu_computes"].sum() == 0 and c.steps["cpu_computes"].sum() > 0
    assert d.info["deferred_prompt_tokens"] > 0 and d.info["budget_cpu_misses"] == 0
    assert d.info["budget_over_copies"] == int((st["transfers"] - 10).clip(lower=0)[capped].sum())
    req = d.requests.set_index("request")
    assert (req["output_tokens"] == c.requests.set_index("request")["output_tokens"]).all()
    assert st["prefill_tokens"].sum() == req["prompt_tokens"].sum()
    assert len(st) > len(c.steps)
    assert d.steps["prefill_tokens"].max() <= c.steps["prefill_tokens"].max()


def test_defer_is_refused_without_a_budget_to_defer_past():
    from simulator.errors import InputError

    with pytest.raises(InputError, match="budget_over"):
        serving_scenario(policies=[{"name": "x", "serving": {"budget_over": "defer"}}])
