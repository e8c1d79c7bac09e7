"""The terms of the tiers beyond host memory (simulator/tiers.py, the profile's ``tiers``):

- :func:`dequant_sweep`: the dequantise step by stored bytes and dtype, timed on the very
  kernel the live executor runs (:func:`calibrate.executors.quant.dequantise`);
- :func:`direct_sweep` (CUDA): an expert FFN computed from mapped pinned host memory
  (zero-copy) by tokens, fitted to ``latency + bytes x (1 + f x (tokens - 1)) / bandwidth``;
- :func:`disk_sweep`: reads of a real file into page-aligned host memory by size, through the
  page cache (``buffered``; the file's pages are dropped with ``posix_fadvise`` before each
  read, so every read comes from the disk) and with ``O_DIRECT``, at queue depth 1 and N
  (N threads reading distinct parts of the file at once; the time of one request).

Each returns its part of the profile's ``tiers`` section and the raw points.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from calibrate.executors.quant import aligned_host, dequantise, mapped_view, quantise, unregister
from calibrate.fit import copy_curve
from calibrate.measurements.stats import summary
from calibrate.measurements.timing import Timer
from simulator.tiers import QUANT_BITS

def fit_curve(points: list[tuple[int, float]]) -> tuple[dict, dict]:
    """A profile curve from ``(bytes, median ms)`` points, made non-decreasing first (more bytes
    never take less time: timing noise between neighbouring sizes). Points too flat for a line
    (latency-bound: the fitted bandwidth past any link's) keep the measured table and the
    largest bandwidth a profile takes."""
    from pydantic import ValidationError

    from simulator.profile import MAX_GBPS

    mono, top = [], 0.0
    for b, ms in points:
        top = max(top, ms)
        mono.append((b, top))
    try:
        return copy_curve(mono)
    except (ValidationError, RuntimeError, ValueError):
        curve = {"latency_us": mono[0][1] * 1e3, "bandwidth_GBps": MAX_GBPS, "table": [list(p) for p in mono]}
        return curve, {"model": "too flat for a line: the measured table", "points": [list(p) for p in mono]}


DEQUANT_SIZES = [1 << 20, 4 << 20, 16 << 20, 64 << 20]        # values (elements) per expert
DISK_SIZES = [256 << 10, 1 << 20, 4 << 20, 16 << 20, 32 << 20]
PAGE = 4096


def dequant_sweep(timer: Timer, numels: list[int] = DEQUANT_SIZES, dtypes=tuple(QUANT_BITS), trials: int = 20,
                  warmup: int = 3, out_dtype: torch.dtype = torch.bfloat16) -> tuple[dict, dict]:
    """``({dtype: curve}, raw)``: dequantise time by stored bytes (ms = latency + bytes / GB/s),
    and in ``raw[dtype]["host_us"]`` the host's time to issue one call (the median over the
    sizes: its kernels' launches, whatever the size; int4's unpacking issues about eight)."""
    curves, raw = {}, {}
    for dt in dtypes:
        pts = []
        for n in numels:
            src = (torch.rand(n, device=timer.device) - 0.5).to(out_dtype)
            q = quantise(src, dt)
            out = torch.empty(n, dtype=out_dtype, device=timer.device)
            s = timer.time(lambda i: dequantise(q, dt, out), trials, warmup)
            pts.append({"values": n, "bytes": q.numel(), "ms": summary(s.ms), "host_ms": summary(s.host_ms)})
        curve, rec = fit_curve([(p["bytes"], p["ms"]["median"]) for p in pts])
        curves[dt] = curve
        raw[dt] = {"points": pts, "fit": rec,
                   "host_us": float(np.median([p["host_ms"]["median"] for p in pts])) * 1e3}
    return curves, raw


def direct_sweep(timer: Timer, model, tokens=(1, 2, 4, 8, 16, 32, 64), trials: int = 20, warmup: int = 3) -> tuple[dict, dict]:
    """Direct-read terms of one expert shape (CUDA): the FFN over weights in mapped pinned host
    memory, by tokens, fitted as a line ``ms(t) = a + b x t`` (least squares). The latency is
    the time of a tiny zero-copy read (a 4 KiB sum); then ``bytes / bandwidth = a + b -
    latency`` (one token's read) and ``per_token_factor = b / (a + b - latency)``."""
    from calibrate.executors.expert import expert_ffn, expert_views, torch_dtype

    if not timer.is_cuda:
        raise RuntimeError("direct host reads are a GPU path: run with --device cuda")
    dtype = torch_dtype(model)
    numel = model.matrices * model.hidden * model.ffn
    host, mm = aligned_host(numel * torch.tensor([], dtype=dtype).element_size(), pinned=True)
    try:
        flat_host = host.view(dtype)
        flat_host.copy_((torch.rand(numel) - 0.5).to(dtype) * model.hidden ** -0.5)
        view = mapped_view(flat_host, timer.device)
        w = expert_views(view, model)
        x = torch.randn(max(tokens), model.hidden, device=timer.device).to(dtype)
        pts = []
        for t in tokens:
            s = timer.time(lambda i: expert_ffn(x[:t], w.gate, w.up, w.down), trials, warmup)
            pts.append({"tokens": t, "bytes": model.expert_bytes, "ms": summary(s.ms)})
        tiny = view[:PAGE // 2]
        lat = timer.time(lambda i: tiny.sum(), trials, warmup)
        latency_ms = statistics.median(lat.ms)
    finally:
        del view
        unregister(host)
        del host, mm
    ts = [p["tokens"] for p in pts]
    ms = [p["ms"]["median"] for p in pts]
    n = len(ts)
    mt, mm_ = sum(ts) / n, sum(ms) / n
    b = max(0.0, sum((a - mt) * (c - mm_) for a, c in zip(ts, ms)) / max(1e-12, sum((a - mt) ** 2 for a in ts)))
    a = mm_ - b * mt
    read1 = max(1e-6, a + b - latency_ms)
    from simulator.profile import MAX_GBPS

    terms = {"latency_us": latency_ms * 1e3, "bandwidth_GBps": min(MAX_GBPS, model.expert_bytes / (read1 * 1e6)),
             "per_token_factor": min(1e3, b / read1), "points": [[p["tokens"], p["bytes"], p["ms"]["median"]] for p in pts]}
    return terms, {"points": pts, "latency_probe_ms": latency_ms, "line": {"a_ms": a, "b_ms_per_token": b}}


def _drop_cache(fd: int) -> None:
    """Drop the file's clean pages from the page cache (no root needed): the next buffered read
    comes from the disk."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _read_trial(path: str, io: str, size: int, depth: int, offsets: list[int], bufs: list) -> float:
    """Wall ms of ``depth`` concurrent reads of ``size`` bytes, one per thread (the time of a
    request when ``depth`` are in flight)."""
    flags = os.O_RDONLY | (os.O_DIRECT if io == "direct" else 0)
    fds = [os.open(path, flags) for _ in range(depth)]
    try:
        if io == "buffered":
            _drop_cache(fds[0])
        errors: list = []
        barrier = threading.Barrier(depth + 1)

        def job(i):
            barrier.wait()
            try:
                got = os.preadv(fds[i], [bufs[i][:size]], offsets[i])
                if got != size:
                    errors.append(f"short read {got} of {size}")
            except OSError as e:
                errors.append(str(e))
        threads = [threading.Thread(target=job, args=(i,)) for i in range(depth)]
        for th in threads:
            th.start()
        barrier.wait()
        t0 = time.perf_counter()
        for th in threads:
            th.join()
        ms = (time.perf_counter() - t0) * 1e3
        if errors:
            raise OSError(errors[0])
        return ms
    finally:
        for fd in fds:
            os.close(fd)


def disk_sweep(directory: str | Path, *, sizes: list[int] = DISK_SIZES, depth: int = 4, trials: int = 10,
               file_bytes: int = 512 << 20, ios=("buffered", "direct")) -> tuple[dict, dict]:
    """The ``tiers.disk`` section measured on the disk holding ``directory``: per io mode, a
    qd1 and a qd``depth`` curve of one request's read time by size. Writes (and removes) one
    file of ``file_bytes``. O_DIRECT on a file system without it (tmpfs) raises OSError."""
    file_bytes = max(file_bytes, max(sizes) * depth * 2)
    fd, path = tempfile.mkstemp(prefix="simmoe-disk-", suffix=".bin", dir=str(directory))
    try:
        chunk = os.urandom(1 << 20)
        with os.fdopen(fd, "wb") as f:
            for _ in range(file_bytes >> 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        bufs, maps = [], []
        for _ in range(depth):
            t, mm = aligned_host(max(sizes), pinned=False)
            bufs.append(memoryview(t.numpy()))
            maps.append(mm)
        out, raw = {}, {}
        for io in ios:
            part, praw = {}, {}
            for qd in (1, depth):
                pts = []
                for size in sizes:
                    span = file_bytes // size
                    ms = []
                    for k in range(trials):
                        offs = [((k * qd + i) * 7919 % span) * size for i in range(qd)]
                        ms.append(_read_trial(path, io, size, qd, offs, bufs))
                    pts.append({"bytes": size, "ms": summary(ms)})
                curve, rec = fit_curve([(p["bytes"], p["ms"]["median"]) for p in pts])
                part["qd1" if qd == 1 else "qdn"] = curve
                praw[f"qd{qd}"] = {"points": pts, "fit": rec}
            part["queue_depth"] = depth
            out[io], raw[io] = part, praw
        return out, raw
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
