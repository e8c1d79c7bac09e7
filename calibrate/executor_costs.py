"""What the live executor pays, measured through its own code (CUDA only).

- **Copy trains**: the executor issues a layer's misses back to back on one copy stream, from
  expert weights spread over gigabytes of host memory. ``TRAIN`` expert-sized copies are timed
  as one train (CUDA events), rotating over a host pool far larger than any CPU cache, and
  the per-copy time is the train's time / ``TRAIN``. A lone copy on an idle stream also pays a
  start-up cost, which a train hides; the simulator's copies are almost always in trains.
- **The CPU-miss path**: the executor's ``_cpu`` (activations down, FFN on cold host weights,
  result up) after the host idled on the GPU; this is the profile's ``compute.cpu``, with
  ``host.cpu_path_includes_transfers`` set.
- **Issue costs**: host time (perf_counter, no synchronise) of the executor's own
  ``_load`` / ``_compute`` / ``_dense`` calls: stream switch, ``wait_event``, the FFN's
  kernel launches, ``record``. These become the profile's ``host.launch_us``.
"""
from __future__ import annotations

import gc
import time

import numpy as np
import torch

from simulator.models import ModelSpec
from simulator.scenario import PolicySpec
from simulator.traces import generate

from .expert import torch_dtype
from .stats import summary

TRAIN = 12
QUICK_HOST_POOL_BYTES = 256 << 20
CPU_POINT_BUDGET_S = 1.0
CPU_STOP_MS = 200.0


def copy_trains(device: torch.device, models: tuple[ModelSpec, ...], trials: int, quick: bool, tick) -> dict:
    """``{kind: [{"bytes": expert bytes, "ms": per-copy summary, "train": TRAIN}, ...]}``.

    The host experts are allocated exactly as the live executor allocates them
    (:func:`calibrate.live.host_experts`: one tensor per expert, up to its default budget):
    a pageable copy's speed depends on how its source memory was laid out."""
    from .live import DEFAULT_HOST_BUDGET, host_experts

    stream = torch.cuda.Stream(device)
    out: dict = {}
    for kind in ("pinned", "pageable"):
        rows = []
        for m in models:
            eb = m.expert_bytes
            tick(f"copy train {kind}, {m.name}")
            # pageable: the executor's whole default pool (its speed depends on the footprint);
            # pinned copies are DMA from locked pages, 2 GiB is plenty
            budget = DEFAULT_HOST_BUDGET if kind == "pageable" else 2 << 30
            host = host_experts(m, kind == "pinned", QUICK_HOST_POOL_BYTES if quick else budget)
            dev = torch.empty((2, host[0].numel()), dtype=host[0].dtype, device=device)
            per_copy = []
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for trial in range(trials + 1):               # the first train is a warm-up
                torch.cuda.synchronize(device)
                with torch.cuda.stream(stream):
                    start.record(stream)
                    for j in range(TRAIN):
                        dev[j % 2].copy_(host[(trial * TRAIN + j) % len(host)], non_blocking=True)
                    end.record(stream)
                end.synchronize()
                if trial:
                    per_copy.append(start.elapsed_time(end) / TRAIN)
            rows.append({"bytes": eb, "model": m.name, "train": TRAIN, "host_pool_bytes": len(host) * eb,
                         "ms": summary(per_copy)})
            del host, dev
            gc.collect()
            torch.cuda.empty_cache()
        out[kind] = rows
    return out


def cpu_path(device: torch.device, models: tuple[ModelSpec, ...], tokens: list[int], trials: int, quick: bool,
             tick) -> dict:
    """``{shape_key: [[tokens, ms], ...]}``: the live executor's CPU-miss path (activations to
    the host, the FFN on cold host weights with torch, the result back), timed on the host
    clock after the host has idled waiting for the GPU, as it does between layers."""
    from .live import LiveExecutor, host_experts

    out = {}
    for m in models:
        host = host_experts(m, True, QUICK_HOST_POOL_BYTES if quick else 2 << 30)   # far past any CPU cache
        trace = generate(num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k,
                         batch_size=max(tokens), steps=1, seed=0, generator="uniform")
        ex = LiveExecutor(m, PolicySpec(name="probe", miss="cpu"), trace, device=str(device), dense_ms=0.2,
                          host=host, measure_copies=False)
        rows = []
        k = 0
        for t in tokens:
            tick(f"CPU-miss path {m.name}, {t} tokens")
            times = []
            began = time.perf_counter()
            for i in range(trials):
                ev = ex._dense()
                ev.synchronize()                      # the host idles on the GPU, as between layers
                t0 = time.perf_counter()
                ex._cpu(k, t, None)
                times.append((time.perf_counter() - t0) * 1e3)
                k += 1
                if i >= 2 and time.perf_counter() - began > CPU_POINT_BUDGET_S:
                    break
            rows.append([t, summary(times)["median"]])
            if rows[-1][1] > CPU_STOP_MS:
                break
        out[m.shape_key] = rows
        del ex, host
        gc.collect()
        torch.cuda.empty_cache()
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
