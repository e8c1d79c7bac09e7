"""What the live executor pays, measured through its own code (CUDA only).

- **Copy trains**: the executor issues a layer's misses back to back on one copy stream, from
  expert weights spread over gigabytes of host memory. ``TRAIN`` expert-sized copies are timed
  as one train (CUDA events), rotating over a host pool far larger than any CPU cache, and
  the per-copy time is the train's time / ``TRAIN``. A lone copy on an idle stream also pays a
  start-up cost, which a train hides; the simulator's copies are almost always in trains.
- **Issue costs**: host time (perf_counter, no synchronise) of the executor's own
  ``_load`` / ``_compute`` / ``_dense`` calls: stream switch, ``wait_event``, the FFN's
  kernel launches, ``record``. These become the profile's ``host.launch_us``.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from simulator.models import ModelSpec
from simulator.scenario import PolicySpec
from simulator.traces import generate

from .expert import torch_dtype
from .stats import summary

TRAIN = 12
# as large as the live executor's default host pool: pageable copies slow down with the
# footprint (page-table walks on the host side of the staging copy)
HOST_POOL_BYTES = {"pinned": 4 << 30, "pageable": 8 << 30}
MAX_HOST_EXPERTS = 512
QUICK_HOST_POOL_BYTES = 256 << 20


def copy_trains(device: torch.device, models: tuple[ModelSpec, ...], trials: int, quick: bool, tick) -> dict:
    """``{kind: [{"bytes": expert bytes, "ms": per-copy summary, "train": TRAIN}, ...]}``."""
    stream = torch.cuda.Stream(device)
    out: dict = {}
    for kind in ("pinned", "pageable"):
        rows = []
        for m in models:
            eb = m.expert_bytes
            budget = QUICK_HOST_POOL_BYTES if quick else HOST_POOL_BYTES[kind]
            n_host = max(2, min(MAX_HOST_EXPERTS, budget // eb))
            tick(f"copy train {kind}, {m.name}")
            host = torch.empty((n_host, eb), dtype=torch.uint8, pin_memory=(kind == "pinned")).fill_(1)
            dev = torch.empty((2, eb), dtype=torch.uint8, device=device)
            per_copy = []
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for trial in range(trials + 1):               # the first train is a warm-up
                torch.cuda.synchronize(device)
                with torch.cuda.stream(stream):
                    start.record(stream)
                    for j in range(TRAIN):
                        dev[j % 2].copy_(host[(trial * TRAIN + j) % n_host], non_blocking=True)
                    end.record(stream)
                end.synchronize()
                if trial:
                    per_copy.append(start.elapsed_time(end) / TRAIN)
            rows.append({"bytes": eb, "model": m.name, "train": TRAIN, "host_pool_bytes": n_host * eb,
                         "ms": summary(per_copy)})
            del host, dev
            torch.cuda.empty_cache()
        out[kind] = rows
    return out


def issue_costs(device: torch.device, models: tuple[ModelSpec, ...], trials: int, tick) -> dict:
    """Host ms per ``_load`` / ``_compute`` / ``_dense`` call of the live executor, per model."""
    from .live import LiveExecutor

    out = {}
    for m in models:
        tick(f"executor issue costs, {m.name}")
        trace = generate(num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k, batch_size=1,
                         steps=1, seed=0, generator="uniform")
        host = [torch.empty(m.matrices * m.hidden * m.ffn, dtype=torch_dtype(m), pin_memory=True).fill_(0.01)]
        ex = LiveExecutor(m, PolicySpec(name="probe", cache={"kind": "lru", "capacity": 2}), trace,
                          device=str(device), dense_ms=0.01, host=host, measure_copies=False)
        ex.warm_up()
        res = {}
        for name, call in (("compute", lambda: ex._compute(0, 1)),
                           ("load", lambda: ex._load((1,), (0,), m.expert_bytes, [])),
                           ("dense", ex._dense)):
            times = []
            for _ in range(trials):
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1e3)
            res[name] = summary(times)
        torch.cuda.synchronize(device)
        out[m.name] = res
        del ex, host
        torch.cuda.empty_cache()
    return out


def launch_us(issue: dict) -> dict:
    """The profile's ``host.launch_us`` from :func:`issue_costs` (medians over models)."""
    med = lambda k: float(np.median([r[k]["median"] for r in issue.values()])) * 1e3  # noqa: E731
    return {"copy": med("load"), "expert": med("compute"), "dense": med("dense")}
