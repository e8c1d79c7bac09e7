"""The published study's table, re-measured: computation vs memory transfer per configuration.

The study (shared/reference/README.md) timed a 768x3072 gated fp32 expert (27.0 MiB) for
batch 1, 2, 4 with 1 or 10 experts; every batch item loaded its own experts from pageable
memory, so a configuration moves ``batch x experts`` copies. Here, per trial:

- computation: the configuration's expert calls, ``experts`` calls of :func:`run_expert` on
  ``batch`` tokens each, on a compute stream;
- memory transfer: ``batch x experts`` host-to-device copies of one expert each from pageable
  memory, on a copy stream (CPU device: host-to-host copies).

Both are timed as one unit per trial with CUDA events; the two samples are compared with
Welch's t-test and Cohen's d (:func:`calibrate.measurements.stats.compare`).
"""
from __future__ import annotations

from typing import Callable

import torch

from simulator.models import PRESETS

from calibrate.executors.expert import alloc_expert, run_expert, torch_dtype
from calibrate.measurements.stats import compare, summary
from calibrate.measurements.timing import Timer

BATCHES = (1, 2, 4)
EXPERTS = (1, 10)


def study_table(timer: Timer, pool_bytes: int, trials: int, warmup: int, tick: Callable[[str], None]) -> list[dict]:
    """One row per (batch, experts): computation and transfer summaries, test, dominance, ratio."""
    spec = PRESETS["published-study"]
    r = max(1, min(max(EXPERTS), pool_bytes // spec.expert_bytes))  # distinct experts to rotate over
    host = [alloc_expert(spec, "pageable") for _ in range(r)]
    dev = [alloc_expert(spec, "device", timer.device) for _ in range(r)]
    compute_stream, copy_stream = timer.new_stream(), timer.new_stream()
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, spec.hidden, dtype=torch_dtype(spec), device=timer.device)
        for experts in EXPERTS:
            tick(f"batch {batch}, {experts} expert(s)")

            def computation(i: int) -> None:
                for j in range(experts):
                    run_expert(x, dev[(i * experts + j) % r])

            def transfer(i: int) -> None:
                for j in range(batch * experts):
                    k = (i * batch * experts + j) % r
                    dev[k].flat.copy_(host[k].flat, non_blocking=True)

            c = timer.time(computation, trials, warmup, compute_stream).ms
            t = timer.time(transfer, trials, warmup, copy_stream).ms
            rows.append(study_row(batch, experts, c, t))
    return rows


def study_row(batch: int, experts: int, computation_ms: list[float], transfer_ms: list[float]) -> dict:
    """A table row from the two samples: summaries, Welch's test, which dominates and by how much."""
    c, t = summary(computation_ms), summary(transfer_ms)
    return {
        "batch": batch, "experts": experts, "copies": batch * experts,
        "computation_ms": c, "transfer_ms": t,
        "dominates": "memory transfer" if t["mean"] > c["mean"] else "computation",
        "transfer_over_computation": t["mean"] / c["mean"],
        **compare(computation_ms, transfer_ms),
    }
