"""What the live executor pays, measured through its own code (CUDA only).

- **Copy trains**: the executor issues a layer's misses back to back on one copy stream, from
  expert weights spread over gigabytes of host memory. ``TRAIN`` expert-sized copies are timed
  as one train (CUDA events), rotating over a host pool far larger than any CPU cache, and
  the per-copy time is the train's time / ``TRAIN``. A lone copy on an idle stream also pays a
  start-up cost, which a train hides; the simulator's copies are almost always in trains.
- **The CPU-miss path**: the executor's ``_cpu`` (activations down, FFN on cold host weights,
  result up), a layer's burst of them after the host idled on the GPU; this is the profile's
  ``compute.cpu``, with ``host.cpu_path_includes_transfers`` set.
- **Executor runs**: host time (perf_counter) of the executor's own ``_load`` / ``_compute``
  / ``_dense`` calls inside whole steps of a synthetic trace: stream switch, ``wait_event``,
  the FFN's kernel launches, ``record``. These become the profile's ``host.launch_us``; a
  per-item run from pageable memory gives the blocking copy's time (the expert-size point of
  the pageable curve) and ``host.pageable_tail_us``.
"""
from __future__ import annotations

import gc
import time

import numpy as np
import torch

from simulator.models import ModelSpec
from simulator.scenario import PolicySpec
from simulator.traces import generate

from .stats import summary

TRAIN = 12
MIN_TRAINS, TRAIN_BUDGET_S = 5, 4.0   # trains per point: up to ``trials``, within this budget
RUN_LAYERS, RUN_STEPS, RUN_SEED, RUN_DENSE_MS = 4, 6, 11, 0.05
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
            began = time.perf_counter()
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
                if trial >= MIN_TRAINS and time.perf_counter() - began > TRAIN_BUDGET_S:
                    break
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
    clock as the executor meets it: after the host has idled waiting for the GPU (a layer's
    route sync), a burst of ``top_k`` calls back to back on different experts (a layer's missed
    experts); the point is the burst's time per call."""
    from .live import LiveExecutor, host_experts

    out = {}
    for m in models:
        host = host_experts(m, True, QUICK_HOST_POOL_BYTES if quick else 2 << 30)   # far past any CPU cache
        trace = generate(num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k,
                         batch_size=max(tokens), steps=1, seed=0, generator="uniform")
        ex = LiveExecutor(m, PolicySpec(name="probe", miss="cpu"), trace, device=str(device), dense_ms=0.2,
                          host=host, measure_copies=False)
        burst = max(2, m.top_k)
        rows = []
        k = 0
        for t in tokens:
            tick(f"CPU-miss path {m.name}, {t} tokens")
            for _ in range(burst):                    # untimed: first calls at this size
                ex._cpu(k, t, None)
                k += 1
            times = []
            began = time.perf_counter()
            for i in range(trials):
                ev = ex._dense()
                ev.synchronize()                      # the host idles on the GPU, as between layers
                t0 = time.perf_counter()
                for _ in range(burst):
                    ex._cpu(k, t, None)
                    k += 1
                times.append((time.perf_counter() - t0) * 1e3 / burst)
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


def _probe_model(m: ModelSpec) -> ModelSpec:
    """The model cut to RUN_LAYERS layers: enough layers for steady state, few enough to be quick."""
    return m.model_copy(update={"num_layers": min(m.num_layers, RUN_LAYERS)})


def _per_call_us(steps, kind: str, counter: str) -> float | None:
    n = sum(st.executed[counter] for st in steps)
    return sum(st.host_ms[kind] for st in steps) / n * 1e3 if n else None


def executor_runs(device: torch.device, models: tuple[ModelSpec, ...], quick: bool, tick) -> dict:
    """Host time per call of the live executor, measured inside its own steps.

    Timed one call at a time on an idle GPU, an issue call costs half of what it costs in a
    running step (measured on the H100: 77 vs 100-190 us per expert FFN), so issue costs are
    taken from whole executor steps instead, over a uniform synthetic trace (not a validation
    scenario's), on ``RUN_LAYERS`` of the model's layers:

    - **pinned**: dedup loads, an LRU cache of a quarter of the experts and next-layer oracle
      prefetch, at batch 1 and 4: host us per expert FFN, copy and dense call;
    - **pageable**: per-item loads from pageable memory (the executor's whole host pool) at
      batch 1 and 4: host ms per blocking copy, and us per expert FFN issued right after one (the
      driver finishes the staged copy before it takes the next call).

    ``{model: {"compute_us", "load_us", "dense_us", "pageable_copy_ms", "pageable_compute_us",
    "expert_bytes"}}``.
    """
    from .live import DEFAULT_HOST_BUDGET, LiveExecutor, host_experts

    out = {}
    for m in models:
        pm = _probe_model(m)
        steps = 3 if quick else RUN_STEPS
        res = {}
        for kind, batches, policy in (
                ("pinned", (1, 4), PolicySpec(name="probe-pinned", prefetch={"kind": "oracle"},
                                              cache={"kind": "lru", "capacity": max(2, pm.num_layers * pm.num_experts // 4)})),
                ("pageable", (1, 4), PolicySpec(name="probe-pageable", load="per-item", memory="pageable"))):
            tick(f"executor runs, {kind}, {m.name}")
            pinned = kind == "pinned" and device.type == "cuda"
            budget = QUICK_HOST_POOL_BYTES if quick else (DEFAULT_HOST_BUDGET if kind == "pageable" else 2 << 30)
            host = host_experts(pm, pinned, budget)
            measured = []
            for b in batches:
                trace = generate(num_layers=pm.num_layers, num_experts=pm.num_experts, top_k=pm.top_k, batch_size=b,
                                 steps=steps, seed=RUN_SEED, generator="uniform")
                ex = LiveExecutor(pm, policy, trace, device=str(device), dense_ms=RUN_DENSE_MS, seed=RUN_SEED,
                                  host=host, measure_copies=False)
                ex.warm_up()
                measured += [st for st, _ in ex.run()][1:]          # the first step warms up
                del ex
                torch.cuda.empty_cache()
            if kind == "pinned":
                res.update(compute_us=_per_call_us(measured, "compute", "computes"),
                           load_us=_per_call_us(measured, "load", "copies"),
                           dense_us=_per_call_us(measured, "dense", "denses"))
            else:
                res.update(pageable_copy_ms=_per_call_us(measured, "load", "copies") * 1e-3,
                           pageable_compute_us=_per_call_us(measured, "compute", "computes"))
            del host
            gc.collect()
        out[m.name] = dict(res, expert_bytes=m.expert_bytes)
    return out


def host_costs(runs: dict) -> tuple[dict, float]:
    """The profile's ``host.launch_us`` and ``host.pageable_tail_us`` from :func:`executor_runs`
    (medians over models; the calls are the same whatever the expert's shape)."""
    med = lambda f: float(np.median([f(r) for r in runs.values()]))  # noqa: E731
    launch = {"copy": med(lambda r: r["load_us"]), "expert": med(lambda r: r["compute_us"]),
              "dense": med(lambda r: r["dense_us"])}
    tail = max(0.0, med(lambda r: r["pageable_compute_us"] - r["compute_us"]))
    return launch, tail
