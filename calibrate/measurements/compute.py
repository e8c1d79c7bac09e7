"""Expert-FFN compute time by tokens routed, for one expert shape, on the device or the host CPU.

Each point calls :func:`calibrate.executors.expert.run_expert` (the live executor's code) on ``tokens``
rows, rotating over several experts' weights (at least 2, and at least 256 MiB in all up to
8 experts; on the host CPU, gigabytes: a server CPU's last-level cache holds hundreds of MiB)
so that the weights do not sit in cache. On CUDA the calls go on a compute
stream, timed with CUDA events per call, each queued behind a sleep kernel so that the events
time the GPU's work alone (the host's issue time is ``host.launch_us``, measured apart). CPU
points stop early after ``budget_s`` (with at least 3 trials), and the sweep stops after the
first point slower than ``stop_ms``: the cost model extrapolates linearly in tokens past the
last point.
"""
from __future__ import annotations

from typing import Callable

import torch

from simulator.models import ModelSpec

from calibrate.executors.expert import alloc_expert, run_expert, torch_dtype
from calibrate.measurements.stats import summary
from calibrate.measurements.timing import Timer, rotation_count

MAX_HOST_EXPERTS = 512


def expert_sweep(timer: Timer, spec: ModelSpec, tokens: list[int], trials: int, warmup: int,
                 tick: Callable[[str], None], budget_s: float | None = None,
                 stop_ms: float | None = None, rotate_bytes: int | None = None) -> list[dict]:
    """One point per token count: device time (ms) and host issue time of one expert call.

    ``rotate_bytes``: rotate over this many bytes of weights (host CPU: several GiB, as the
    live executor's host expert pool is, so that no CPU cache holds them)."""
    if rotate_bytes is None:
        n = rotation_count(spec.expert_bytes, lo=2)
    else:
        n = max(2, min(MAX_HOST_EXPERTS, rotate_bytes // spec.expert_bytes))
    memory = "device" if timer.is_cuda else "pageable"
    experts = [alloc_expert(spec, memory, timer.device) for _ in range(n)]
    stream = timer.new_stream()
    rows = []
    for t in tokens:
        tick(f"{spec.shape_key}, {t} tokens")
        x = torch.randn(t, spec.hidden, dtype=torch_dtype(spec), device=timer.device)
        s = timer.time(lambda i: run_expert(x, experts[i % n]), trials, warmup, stream, budget_s, gpu_only=True)
        rows.append({"tokens": t, "experts_rotated": n, "ms": summary(s.ms), "host_ms": summary(s.host_ms)})
        if stop_ms is not None and rows[-1]["ms"]["median"] > stop_ms:
            break
    return rows
