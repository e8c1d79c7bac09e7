"""What a serving run costs before it runs (the estimate/limits style of
:mod:`simulator.estimate`): CPU seconds from the routed (token, layer) pairs it simulates,
memory from the routing rows of the requests in flight and the result tables."""
from __future__ import annotations

from ..estimate import Estimate, check
from .spec import LengthSpec

#: CPU seconds per simulated (token, MoE layer) pair, measured on scenarios/serving_olmoe.yaml
#: (bench/bench_serving.py prints the current figure; BENCHMARKS.md); bytes per table row
SECONDS_PER_TOKEN_LAYER = 1.9e-5
BYTES_PER_REQUEST_ROW = 400
BYTES_PER_STEP_ROW = 600


def mean_length(spec: LengthSpec) -> float:
    if spec.kind == "fixed":
        return float(spec.value)
    if spec.kind == "uniform":
        return (spec.min + spec.max) / 2
    if spec.kind == "lognormal":
        return min(spec.mean, spec.upper)
    w = spec.weights or [1.0] * len(spec.values)
    return sum(v * x for v, x in zip(spec.values, w)) / sum(w)


def estimate_serving(sc) -> Estimate:
    w, m = sc.workload, sc.model
    runs = len(sc.batch_sizes) * sc.replications * len(sc.policies)
    per_req = mean_length(w.prompt) + mean_length(w.output)
    tokens = w.requests * per_req
    seconds = runs * tokens * m.num_layers * SECONDS_PER_TOKEN_LAYER
    in_flight = max(sc.batch_sizes) * per_req * m.num_layers * m.top_k * 8      # rows, sampler temporaries
    steps = w.requests * mean_length(w.output)
    mem = in_flight + runs * (w.requests * BYTES_PER_REQUEST_ROW + steps * BYTES_PER_STEP_ROW)
    size = (f"{w.requests:,} requests x ~{per_req:,.0f} tokens x {len(sc.policies)} policies x "
            f"{len(sc.batch_sizes)} max batches x {sc.replications} replications")
    return Estimate(seconds=seconds, bytes=mem, size=size)


def check_serving(sc, source: str, force: bool = False) -> Estimate:
    est = estimate_serving(sc)
    check(est, source, lambda over: "workload.requests", force)
    return est
