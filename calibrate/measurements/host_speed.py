"""How fast the host issues work right now: a fixed probe, timed beside calibration and beside
each live step of a real model.

An eager transformers model on a GPU is host-bound at decode: its step time is mostly the
host's dispatch of small kernels, and on a shared machine that speed moves by a quarter within
seconds (docs/validation.md). The probe issues ``PROBE_OPS`` tiny in-place kernels without
waiting (``dispatch_us``: host microseconds per op issued) and times them on the device with
events (``gpu_us``: device microseconds per op, which moves with the GPU's clock). The
calibration stores the probe it met (``engine.<model>.source.host_probe``); a validation row
measures it again before each step, and ``now / calibration`` scales the projection's host
terms (:func:`calibrate.validation.model_rows.host_scaled`), as ``--host-now`` does for the twin.
"""
from __future__ import annotations

import statistics
import time

import torch

PROBE_OPS = 200
PROBE_REPEATS = 3


def host_probe(device: torch.device | str, ops: int = PROBE_OPS, repeats: int = PROBE_REPEATS) -> dict:
    """``{"dispatch_us", "gpu_us", "sm_mhz"}`` medians over ``repeats`` (``gpu_us`` and
    ``sm_mhz`` None where not measurable)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    x = torch.zeros(16, device=dev)
    disp, gpu = [], []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(dev)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        t0 = time.perf_counter()
        for _ in range(ops):
            x.add_(1.0)
        disp.append((time.perf_counter() - t0) * 1e6 / ops)
        if cuda:
            b.record()
            b.synchronize()
            gpu.append(a.elapsed_time(b) * 1e3 / ops)
    return {"dispatch_us": statistics.median(disp), "gpu_us": statistics.median(gpu) if gpu else None,
            "sm_mhz": sm_clock(dev)}


def sm_clock(dev: torch.device) -> float | None:
    """The GPU's SM clock now (MHz), if NVML is available."""
    if dev.type != "cuda":
        return None
    try:
        return float(torch.cuda.clock_rate(dev))
    except Exception:  # no pynvml / NVML: the clock is simply not recorded
        return None


def parse_cpus(spec: str) -> list[int]:
    """``"0-7"``, ``"2,4,6"`` or ``"0-3,8"`` -> sorted CPU ids; ValueError on anything else."""
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{spec!r} is not a CPU list such as 0-7 or 2,4,6")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a or b - a > 4096:
            raise ValueError(f"{part!r}: an empty or absurd range")
        cpus.update(range(a, b + 1))
    return sorted(cpus)


def pin_cpus(cpus: list[int]) -> list[int]:
    """Pin this process (and the threads it starts) to ``cpus``, with as many torch threads;
    returns the CPUs now allowed. A host-bound eager step moves by a quarter when the
    scheduler moves its thread between cores (docs/validation.md): calibrate and validate
    on the same pinned cores."""
    import os
    have = os.sched_getaffinity(0)
    bad = [c for c in cpus if c not in have]
    if bad:
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise ValueError(f"CPU(s) {', '.join(map(str, bad[:4]))}{more} not available (this process may use "
                         f"{len(have)}: {min(have)}-{max(have)})")
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))
    return sorted(os.sched_getaffinity(0))


def apply_cpus(spec: str | None) -> list[int] | None:
    """The ``--cpus`` flag of calibrate, calibrate engine and validate: pin this process (and
    torch's threads) to the CPUs of ``spec``; one clear line on a bad list. None: leave as is."""
    if not spec:
        return None
    from simulator.errors import InputError
    try:
        return pin_cpus(parse_cpus(spec))
    except ValueError as e:
        raise InputError("command line", "--cpus", str(e)) from None
