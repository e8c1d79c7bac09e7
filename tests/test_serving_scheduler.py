"""The continuous-batching scheduler: limits, FCFS, token conservation, latency bookkeeping,
Little's law, refusals."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving_helpers import serving_dict, serving_scenario
from simulator.errors import InputError
from simulator.profile import load_profile
from simulator.scenario import parse_scenario
from simulator.serving.metrics import time_in_system
from simulator.serving.runner import serve_one, serve_scenario
from simulator.serving.scheduler import DECODE, PREFILL, Scheduler
from simulator.serving.workload import Request


def drive(sched: Scheduler, step_ms):
    """Run the scheduler on a clock where a step of n tokens lasts step_ms(n); yields each plan
    with the KV tokens reserved while it ran."""
    now, out = 0.0, []
    while not sched.finished:
        plan = sched.build(now)
        if plan is None:
            now = sched.next_arrival()
            continue
        out.append((plan, sched.kv_used, [r.req.rid for r in sched.running]))
        now += step_ms(plan.tokens)
        sched.finish(plan, now)
    return out


requests_st = st.lists(
    st.tuples(st.floats(0, 50, allow_nan=False), st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(reqs=requests_st, max_batch=st.integers(1, 6), budget=st.integers(6, 48),
       chunk=st.one_of(st.none(), st.integers(1, 20)), kv_extra=st.one_of(st.none(), st.integers(0, 60)))
def test_scheduler_invariants(reqs, max_batch, budget, chunk, kv_extra):
    arrivals = sorted(a for a, _, _ in reqs)
    rs = [Request(i, arrivals[i], p if chunk else min(p, budget), o) for i, (_, p, o) in enumerate(reqs)]
    kv = None if kv_extra is None else max(r.kv_tokens for r in rs) + kv_extra
    sched = Scheduler(rs, max(1, min(max_batch, budget)), budget, chunk, kv)
    plans = drive(sched, lambda n: 1.0 + 0.1 * n)
    prefill, decode = defaultdict(int), defaultdict(int)
    admitted_order = []
    for plan, kv_used, running in plans:
        assert plan.tokens <= budget
        assert len(plan.items) <= sched.max_batch and len(running) <= sched.max_batch
        assert kv is None or kv_used <= kv
        assert len({it.rid for it in plan.items}) == len(plan.items)      # a request once per step
        for it in plan.items:
            if it.kind == PREFILL:
                assert it.row0 == prefill[it.rid] and (chunk is None or it.count <= chunk)
                prefill[it.rid] += it.count
            else:
                assert it.count == 1 and it.row0 == rs[it.rid].prompt + decode[it.rid]
                decode[it.rid] += 1
        for rid in running:
            if rid not in admitted_order:
                admitted_order.append(rid)
    done = {f.req.rid: f for f in sched.done}
    assert sorted(done) == [r.rid for r in rs]                  # every request finishes, once
    assert len(sched.done) == len(rs)
    for r in rs:
        f = done[r.rid]
        assert prefill[r.rid] == r.prompt                       # tokens conserved
        assert decode[r.rid] == r.output - 1                    # + the first token from prefill
        assert r.arrival_ms <= f.admit_ms <= f.first_ms <= f.finish_ms     # TTFT <= e2e
    # FCFS: admitted in arrival order
    assert admitted_order == sorted(admitted_order, key=lambda i: (rs[i].arrival_ms, i))
    assert sched.kv_used == 0


def test_fcfs_head_blocks_when_kv_is_full():
    rs = [Request(0, 0.0, 10, 5), Request(1, 0.0, 10, 5), Request(2, 0.0, 1, 2)]
    sched = Scheduler(rs, 3, 64, None, kv_tokens=20)
    plan = sched.build(0.0)
    assert [it.rid for it in plan.items] == [0]     # 1 does not fit next to 0; 2 would, but waits behind 1


def test_refusals():
    with pytest.raises(ValueError, match="nothing fits"):
        Scheduler([Request(0, 0.0, 10, 5)], 2, 64, None, kv_tokens=5)
    with pytest.raises(ValueError, match="chunked prefill"):
        Scheduler([Request(0, 0.0, 100, 5)], 2, 64, None)
    with pytest.raises(ValueError, match="token budget"):
        Scheduler([Request(0, 0.0, 10, 5)], 8, 4, 2)


def test_memory_split_refuses_when_slots_leave_no_kv():
    d = serving_dict(workload={"scheduler": {"token_budget": 32, "chunk": 16, "gpu_memory": "100 MiB",
                                             "kv_bytes_per_token": 1024}})
    sc = parse_scenario(d)            # 24 slots of a 28 MiB expert: more than 100 MiB
    with pytest.raises(InputError) as e:
        serve_scenario(sc)
    assert e.value.field == "policies[0].cache.capacity" and "nothing is left for the KV cache" in str(e.value)
    d["workload"]["scheduler"]["gpu_memory"] = "1 GiB"
    d["workload"]["scheduler"]["kv_bytes_per_token"] = 1 << 25
    with pytest.raises(InputError, match="nothing fits"):
        serve_scenario(parse_scenario(d))


def test_kv_limit_bounds_the_batch():
    """A KV cache of ~2 requests keeps the batch at 2 whatever the max batch."""
    over = {"scheduler": {"token_budget": 32, "chunk": 16, "gpu_memory": 24 * 28311552 + 64 * 1024,
                          "kv_bytes_per_token": 1024},
            "prompt": {"kind": "fixed", "value": 20}, "output": {"kind": "fixed", "value": 8},
            "arrivals": {"kind": "poisson", "rate": 1000.0}}
    sc = serving_scenario(workload=over)
    run = serve_one(sc, sc.policies[0], 4, 0, load_profile(None))
    assert run.info["kv_tokens"] == 64 and run.info["peak_batch"] == 2
    assert run.steps["kv_tokens_used"].max() <= 64


def test_littles_law_and_latency_columns():
    sc = serving_scenario(workload={"requests": 30})
    res = serve_scenario(sc)
    row = res.summary[0]
    assert row["mean_in_system"] == pytest.approx(row["arrival_rate_x_e2e"], rel=1e-9)
    r = res.requests
    assert (r["ttft_ms"] <= r["e2e_ms"]).all() and (r["queue_ms"] >= 0).all()
    assert len(r) == 30 and r["request"].is_unique
    # the time average swept event by event equals the sum of stays over the span
    avg, span = time_in_system(r["arrival_ms"].to_numpy(), r["finish_ms"].to_numpy())
    assert avg * span == pytest.approx(r["e2e_ms"].sum(), rel=1e-9)
    multi = r[r["output_tokens"] > 1]
    assert np.allclose(multi["tpot_ms"], (multi["finish_ms"] - multi["first_token_ms"]) / (multi["output_tokens"] - 1))
    # steps: the step's tokens are the scheduler's, within its budget
    s = res.steps
    assert (s["prefill_tokens"] + s["decode_tokens"] == s["tokens"]).all() and (s["tokens"] <= 32).all()
    assert s["prefill_tokens"].sum() == r["prompt_tokens"].sum()
    assert s["decode_tokens"].sum() == (r["output_tokens"] - 1).sum()


def test_idle_gaps_jump_to_the_next_arrival():
    sc = serving_scenario(workload={"arrivals": {"kind": "poisson", "rate": 0.5}, "requests": 4})
    res = serve_scenario(sc)
    s, r = res.steps, res.requests
    starts = s["start_ms"].to_numpy()
    assert np.all(np.diff(starts) > 0)
    for a in r["arrival_ms"]:     # a lone request arriving to an idle server is admitted on arrival
        assert a in set(r["admit_ms"]) or a < starts.max()
    assert (r["queue_ms"] == 0).sum() >= 3
