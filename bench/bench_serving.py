"""Serving simulation speed: simulated requests per second of wall time for a 1,000-request
workload, beside the real (simulated) time those requests stand for.

The workload is scenarios/serving_olmoe.yaml (OLMoE-1B-7B on the h200 profile, hf-eager,
Poisson arrivals, lognormal lengths, chunked prefill, max batch 8) with ``--requests``
requests; each policy of ``--policies`` is run ``--repeats`` times in turn (one replication,
one max batch), timed in wall seconds around ``serve_one`` (routing generation, scheduler,
planner, engine, tables). Reported per policy: the median wall time, simulated requests per
wall second, simulated routed (token, layer) pairs per wall second, and the simulated span
(first arrival to last finish) with its ratio to the wall time. Also the estimate's
per-(token, layer) constant (simulator/serving/estimate.py) against the measured one.

    python bench/bench_serving.py [--requests 1000] [--repeats 3] [--policies lru,lru-bypass]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from simulator.profile import load_profile
from simulator.scenario import load_scenario
from simulator.serving.estimate import SECONDS_PER_TOKEN_LAYER
from simulator.serving.runner import serve_one
from simulator.serving.workload import make_requests

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "serving_olmoe.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policies", default="lru,lru-bypass")
    ap.add_argument("--rate", type=float, default=None, help="arrival rate (default: the scenario's)")
    a = ap.parse_args()
    sc, base = load_scenario(SCENARIO)
    w = sc.workload.model_copy(update={"requests": a.requests})
    if a.rate:
        w = w.model_copy(update={"arrivals": w.arrivals.model_copy(update={"rate": a.rate})})
    sc = sc.model_copy(update={"workload": w})
    prof = load_profile(sc.profile)
    reqs = make_requests(w, sc.seed, 0)
    tokens = sum(r.prompt + r.output - 1 for r in reqs)
    pols = {p.name: (i, p) for i, p in enumerate(sc.policies)}
    times: dict[str, list[float]] = {n: [] for n in a.policies.split(",")}
    spans: dict[str, float] = {}
    for _ in range(a.repeats):
        for name in times:
            i, p = pols[name]
            t0 = time.perf_counter()
            run = serve_one(sc, p, sc.batch_sizes[0], 0, prof, index=i, requests=reqs)
            times[name].append(time.perf_counter() - t0)
            r = run.requests
            spans[name] = (r["finish_ms"].max() - r["arrival_ms"].min()) / 1e3
    print(f"{a.requests} requests, {tokens:,} simulated tokens x {sc.model.num_layers} MoE layers, "
          f"rate {w.arrivals.rate:g}/s, max batch {sc.batch_sizes[0]}, {a.repeats} repeat(s)")
    print("| policy | wall s (median) | simulated requests / wall s | (token, layer) pairs / wall s | "
          "simulated span s | span / wall |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.1f} | {a.requests / m:.1f} | {tokens * sc.model.num_layers / m:,.0f} | "
              f"{spans[name]:,.0f} | {spans[name] / m:.1f}x |")
    per = statistics.median(statistics.median(ts) for ts in times.values()) / (tokens * sc.model.num_layers)
    print(f"seconds per (token, layer): measured {per:.2e}, estimate's constant {SECONDS_PER_TOKEN_LAYER:.2e}")


if __name__ == "__main__":
    main()
