"""Engine throughput: routed requests per second on one core.

Replays a Mixtral-8x7B decode trace (batch 16, >= 1M routed requests) through the planner and
the SimPy engine with an LRU cache and next-layer prefetch, and, in the same run, the same
request stream through libcachesim's LRU in a Python loop (the usual way to drive it from
Python). Reports the median of several repeats of each, side by side, and their ratio.

    python bench/bench_engine.py [--steps 1000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from simulator.engine import Engine
from simulator.models import PRESETS
from simulator.planner import Planner, RequestStream
from simulator.profile import CostModel, load_profile
from simulator.scenario import PolicySpec
from simulator.traces import generate


def simmoe_replay(model, trace, policy, cost) -> tuple[float, int]:
    t0 = time.perf_counter()
    planner = Planner(model, policy, trace, seed=0)
    recs = Engine(cost, policy.memory, model.dense_ms_per_layer or 0.2).run(planner)
    dt = time.perf_counter() - t0
    return dt, sum(r.decisions.requests for r in recs)


def libcachesim_replay(keys, capacity) -> tuple[float, int]:
    import libcachesim as lcs

    t0 = time.perf_counter()
    cache = lcs.LRU(cache_size=capacity)
    hits = 0
    for i, k in enumerate(keys):
        r = lcs.Request()
        r.obj_id, r.obj_size, r.clock_time = k, 1, i
        hits += cache.get(r)
    return time.perf_counter() - t0, hits


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--capacity", type=int, default=96)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})   # one core
    m = PRESETS["mixtral-8x7b"]
    trace = generate(num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k, batch_size=args.batch,
                     steps=args.steps, seed=0, generator="mixed", zipf=0.5, temporal=0.3)
    cost = CostModel(load_profile("h100-probe"), m.shape_key, m.expert_bytes, m.activation_bytes_per_token, 4096)
    policy = PolicySpec(name="lru+prefetch", load="dedup", cache={"kind": "lru", "capacity": args.capacity},
                        prefetch={"kind": "oracle"})
    # the request stream the cache sees (dedup: unique experts per layer-step)
    keys = RequestStream(trace, m, Planner(m, policy, trace).load).keys.tolist()
    ours, theirs = [], []
    for _ in range(args.repeats):       # interleaved, so drift hits both alike
        dt, n = simmoe_replay(m, trace, policy, cost)
        ours.append(n / dt)
        dt2, _ = libcachesim_replay(keys, args.capacity)
        theirs.append(len(keys) / dt2)
    routed = trace.num_requests
    fig = {
        "routed_requests": routed, "cache_requests": len(keys), "repeats": args.repeats,
        "simmoe_routed_req_per_s_median": statistics.median(ours),
        "simmoe_cache_req_per_s_median": statistics.median(ours) * len(keys) / routed,
        "libcachesim_cache_req_per_s_median": statistics.median(theirs),
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
    }
    print(f"trace: mixtral-8x7b decode, batch {args.batch}, {args.steps} steps: {routed:,} routed requests "
          f"-> {len(keys):,} deduplicated cache requests")
    print(f"simmoe planner+SimPy engine (LRU {args.capacity} + oracle prefetch): "
          f"median {fig['simmoe_routed_req_per_s_median']:,.0f} routed req/s "
          f"({fig['simmoe_cache_req_per_s_median']:,.0f} cache req/s) over {args.repeats} runs")
    print(f"libcachesim LRU, Python loop over the same cache requests: "
          f"median {fig['libcachesim_cache_req_per_s_median']:,.0f} req/s")
    print(f"ratio (simmoe cache req/s / libcachesim req/s): "
          f"{fig['simmoe_cache_req_per_s_median'] / fig['libcachesim_cache_req_per_s_median']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=1)


if __name__ == "__main__":
    main()
