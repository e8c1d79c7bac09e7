"""Host-side overheads: synchronisation, a dense-work launch, slot allocation, the sleep kernel.

All on the host clock (``time.perf_counter``), the device idle before each trial:

- ``sync``: ``torch.cuda.synchronize()`` on an idle device (CPU device: ``torch.cpu.synchronize()``,
  a no-op: what is left is the call's own cost);
- ``dense_launch``: issuing ``torch.cuda._sleep(1000)``, the live executor's stand-in for a
  layer's dense work (CPU device: running a 64x64 fp32 matmul, synchronous);
- ``slot_allocation``: taking an expert-sized slot from a preallocated pool (a view) vs a fresh
  ``torch.empty`` served by torch's caching allocator vs (CUDA) a fresh ``cudaMalloc`` after
  ``torch.cuda.empty_cache()``;
- ``sleep`` (CUDA): device time of ``torch.cuda._sleep(cycles)`` for a few cycle counts, to
  turn the model's dense milliseconds into cycles.

The host time to issue one copy or one expert call comes from the copy and compute sweeps
(their ``host_ms``), not from here.
"""
from __future__ import annotations

import torch

from simulator.models import ModelSpec

from calibrate.fit import fit_sleep_cycles
from calibrate.measurements.stats import summary
from calibrate.measurements.timing import Timer, time_host

DENSE_SLEEP_CYCLES = 1000
SLEEP_CYCLES = (100_000, 1_000_000, 4_000_000)


def host_overheads(timer: Timer, trials: int, warmup: int) -> dict:
    """Sync and dense-launch host times (ms summaries)."""
    if timer.is_cuda:
        sync = time_host(lambda i: torch.cuda.synchronize(timer.device), trials, warmup)
        dense = time_host(lambda i: torch.cuda._sleep(DENSE_SLEEP_CYCLES), trials, warmup, before=timer.synchronize)
    else:
        a = torch.randn(64, 64)
        sync = time_host(lambda i: torch.cpu.synchronize(), trials, warmup)
        dense = time_host(lambda i: a @ a, trials, warmup)
    return {"sync_ms": summary(sync), "dense_launch_ms": summary(dense)}


def slot_allocation(timer: Timer, spec: ModelSpec, trials: int, warmup: int) -> dict:
    """Host time (ms) to get an expert-sized slot: from a pool, fresh (cached), fresh (cudaMalloc)."""
    eb = spec.expert_bytes
    pool = torch.empty((2, eb), dtype=torch.uint8, device=timer.device)
    out = {
        "expert_bytes": eb,
        "pool_slot_ms": summary(time_host(lambda i: pool[i % 2], trials, warmup)),
        "fresh_ms": summary(time_host(lambda i: torch.empty(eb, dtype=torch.uint8, device=timer.device),
                                      trials, warmup)),
    }
    if timer.is_cuda:
        out["fresh_uncached_ms"] = summary(time_host(
            lambda i: torch.empty(eb, dtype=torch.uint8, device=timer.device), trials, warmup,
            before=torch.cuda.empty_cache))
    return out


def sleep_rate(timer: Timer, trials: int, warmup: int) -> dict:
    """Cycles per ms of ``torch.cuda._sleep`` (CUDA only), from CUDA-event medians."""
    medians = []
    for c in SLEEP_CYCLES:
        s = timer.time(lambda i: torch.cuda._sleep(c), trials, warmup)
        medians.append(summary(s.ms)["median"])
    return fit_sleep_cycles(list(SLEEP_CYCLES), medians)
