"""Timing a callable on the calibrated device: CUDA events on a stream, or the host clock.

Every trial starts on an idle device: the timer waits for the previous trial to finish, then
records a start event, calls ``fn(i)``, records an end event. So a trial's time includes the
gaps while the host issues the work (as the live executor would see it), never work queued
by an earlier trial. ``fn`` receives a running index (warm-ups included) so it can rotate
through several buffers and keep caches from flattering the result.

With ``gpu_only``, each trial is queued behind a sleep kernel on the same stream, so the
host has issued all of it before the GPU starts: the events then time the GPU's work alone,
not the host's launch gaps (NVBench's blocking-kernel method). The simulator charges the host's
issue time separately (``host.launch_us``), so expert compute is timed this way.

On the CPU device the work is synchronous and the device time is the host time.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch

from calibrate.measurements.host_state import gated

MIN_TRIALS = 3
ROTATE_BYTES = 256 << 20  # rotate through at least this much memory: well past any L2/LLC
MAX_ROTATE = 8
BLOCKER_CYCLES = 4_000_000  # ~2 ms of GPU sleep: longer than issuing any one trial takes
BLOCKER_MS = 2.0            # what BLOCKER_CYCLES sleeps, roughly (a ~2 GHz SM clock)


@dataclass
class Samples:
    """Per-trial times in ms: ``ms`` on the device (CUDA events), ``host_ms`` of the issuing call."""

    ms: list[float]
    host_ms: list[float]


def rotation_count(item_bytes: int, pool_bytes: int | None = None, lo: int = 1, hi: int = MAX_ROTATE) -> int:
    """How many distinct buffers of ``item_bytes`` to cycle through (at most ``pool_bytes`` in all)."""
    n = max(lo, min(hi, -(-ROTATE_BYTES // item_bytes)))
    if pool_bytes is not None:
        n = min(n, max(1, pool_bytes // item_bytes))
    return n


class Timer:
    """Times work on one device (``cuda:N`` or ``cpu``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.is_cuda = device.type == "cuda"

    def new_stream(self):
        """A fresh CUDA stream on the device (None on the CPU)."""
        return torch.cuda.Stream(self.device) if self.is_cuda else None

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[int], object], trials: int, warmup: int, stream=None,
             budget_s: float | None = None, gpu_only: bool = False, block_ms: float = 0.0) -> Samples:
        """Time ``trials`` calls of ``fn`` after ``warmup`` untimed ones, on ``stream``.

        With ``budget_s``, stop early once that much wall time is spent (after at least
        ``MIN_TRIALS`` trials): for slow CPU points. With ``gpu_only`` (CUDA), time the
        device's work alone, behind a sleep kernel (``block_ms``: at least this long, for
        work whose issue takes the host longer than the default ~2 ms).
        """
        self.synchronize()  # buffers made on other streams are ready
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            for i in range(warmup):
                fn(i)
            self.synchronize()
            cycles = max(BLOCKER_CYCLES, int(BLOCKER_CYCLES * block_ms / BLOCKER_MS))
            return self._trials(fn, trials, warmup, budget_s, cycles if gpu_only and self.is_cuda else 0)

    def _trials(self, fn, trials: int, first: int, budget_s: float | None, block: int = 0) -> Samples:
        """Each trial through the host gate (:mod:`calibrate.measurements.host_state`): with
        ``--host-state fast`` a trial runs in the host's fast state, run again if it ended slow."""
        out = Samples([], [])
        if self.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def one(i: int) -> tuple[float, float]:
            if block:
                torch.cuda._sleep(block)
            if self.is_cuda:
                start.record()
            t0 = time.perf_counter()
            fn(first + i)
            t1 = time.perf_counter()
            if self.is_cuda:
                end.record()
                end.synchronize()
                return start.elapsed_time(end), (t1 - t0) * 1e3
            return (t1 - t0) * 1e3, (t1 - t0) * 1e3

        began = time.perf_counter()
        for i in range(trials):
            ms, host_ms = gated(lambda: one(i))
            out.ms.append(ms)
            out.host_ms.append(host_ms)
            if budget_s is not None and i + 1 >= MIN_TRIALS and time.perf_counter() - began > budget_s:
                break
        return out


def time_host(fn: Callable[[int], object], trials: int, warmup: int,
              before: Callable[[], object] | None = None) -> list[float]:
    """Host time (ms) of each of ``trials`` calls of ``fn``; ``before()`` runs untimed ahead of each."""
    for i in range(warmup):
        if before:
            before()
        fn(i)
    out = []
    for i in range(trials):
        if before:
            before()
        t0 = time.perf_counter()
        fn(warmup + i)
        out.append((time.perf_counter() - t0) * 1e3)
    return out
