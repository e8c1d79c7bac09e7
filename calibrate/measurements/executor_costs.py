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

from calibrate.measurements.stats import summary

TRAIN = 12
MIN_TRAINS, TRAIN_BUDGET_S = 5, 4.0   # trains per point: up to ``trials``, within this budget
RUN_LAYERS, RUN_STEPS, RUN_SEED, RUN_DENSE_MS = 4, 6, 11, 0.05
QUICK_HOST_POOL_BYTES = 256 << 20
CPU_POINT_BUDGET_S = 1.0
CPU_STOP_MS = 200.0


def copy_trains(device: torch.device, models: tuple[ModelSpec, ...], trials: int, quick: bool, tick) -> dict:
    """``{kind: [{"bytes": expert bytes, "ms": per-copy summary, "train": TRAIN}, ...]}``.

    The host experts are allocated exactly as the live executor allocates them
    (:func:`calibrate.executors.twin.host_experts`: one tensor per expert, up to its default budget):
    a pageable copy's speed depends on how its source memory was laid out."""
    from calibrate.executors.twin import DEFAULT_HOST_BUDGET, host_experts

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


CPU_PASSES = 3   # the token sweep runs this many times over, so drift touches every point alike


def cpu_bursts(ex, key: int, tokens: int, burst: int, trials: int, budget_s: float) -> tuple[list[float], int]:
    """Per-call ms of up to ``trials`` bursts of ``burst`` CPU-path calls (``ex._cpu``) on
    experts ``key, key+1, ...``, each burst after the host waited on the GPU (a layer's dense
    work), as a layer's missed experts meet it. Returns the times and the next expert key."""
    times: list[float] = []
    began = time.perf_counter()
    for i in range(trials):
        ev = ex._dense()
        if ev is not None:
            ev.synchronize()                      # the host idles on the GPU, as between layers
        t0 = time.perf_counter()
        for _ in range(burst):
            ex._cpu(key, tokens, None)
            key += 1
        times.append((time.perf_counter() - t0) * 1e3 / burst)
        if i >= 2 and time.perf_counter() - began > budget_s:
            break
    return times, key


def cpu_executor(device: torch.device, m: ModelSpec, max_tokens: int, host):
    """A live executor whose ``_cpu`` is the CPU-miss path of ``m``, for up to ``max_tokens``."""
    from calibrate.executors.twin import LiveExecutor

    trace = generate(num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k,
                     batch_size=max_tokens, steps=1, seed=0, generator="uniform")
    return LiveExecutor(m, PolicySpec(name="probe", miss="cpu"), trace, device=str(device), dense_ms=0.2,
                        host=host, measure_copies=False)


def cpu_path(device: torch.device, models: tuple[ModelSpec, ...], tokens: list[int], trials: int, quick: bool,
             tick) -> dict:
    """``{shape_key: [[tokens, ms], ...]}``: the live executor's CPU-miss path (activations to
    the host, the FFN on cold host weights with torch, the result back), timed on the host
    clock as the executor meets it (:func:`cpu_bursts`, bursts of ``top_k`` calls); the point is
    the median time per call. The token sweep runs ``CPU_PASSES`` times over, each pass with a
    share of the trials and time, so that a host whose speed drifts over the sweep (as the
    shared VMs here do, by 10-20% within seconds) moves every point alike rather than bending
    the table."""
    from calibrate.executors.twin import host_experts

    out = {}
    for m in models:
        host = host_experts(m, True, QUICK_HOST_POOL_BYTES if quick else 2 << 30)   # far past any CPU cache
        ex = cpu_executor(device, m, max(tokens), host)
        burst = max(2, m.top_k)
        samples: dict[int, list[float]] = {}
        k = 0
        for t in tokens:                              # untimed: first calls at each size
            for _ in range(burst):
                ex._cpu(k, t, None)
                k += 1
        live = list(tokens)
        for p in range(CPU_PASSES):
            for t in list(live):
                tick(f"CPU-miss path {m.name}, {t} tokens, pass {p + 1}/{CPU_PASSES}")
                times, k = cpu_bursts(ex, k, t, burst, max(3, trials // CPU_PASSES), CPU_POINT_BUDGET_S / CPU_PASSES)
                samples.setdefault(t, []).extend(times)
                if p == 0 and summary(times)["median"] > CPU_STOP_MS:   # later points: past the stop
                    live = live[:live.index(t) + 1]
                    break
        out[m.shape_key] = [[t, summary(samples[t])["median"]] for t in live]
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


PROBE_KINDS = ("pinned", "pageable")


def probe_policy(kind: str, pm: ModelSpec) -> PolicySpec:
    """The probe's policy: pinned dedup loads, an LRU cache of a quarter of the experts and
    next-layer oracle prefetch; or per-item loads from pageable memory."""
    if kind == "pinned":
        return PolicySpec(name="probe-pinned", prefetch={"kind": "oracle"},
                          cache={"kind": "lru", "capacity": max(2, pm.num_layers * pm.num_experts // 4)})
    return PolicySpec(name="probe-pageable", load="per-item", memory="pageable")


def probe_steps(device: torch.device, pm: ModelSpec, kind: str, host, steps: int = RUN_STEPS,
                batches: tuple[int, ...] = (1, 4)) -> list:
    """The executor's steps (:class:`calibrate.executors.twin.LiveStep`) of the ``kind`` probe on the
    (cut) model ``pm``, a uniform synthetic trace at each batch size; the first step of each
    warms up and is dropped."""
    from calibrate.executors.twin import LiveExecutor

    measured = []
    for b in batches:
        trace = generate(num_layers=pm.num_layers, num_experts=pm.num_experts, top_k=pm.top_k, batch_size=b,
                         steps=steps, seed=RUN_SEED, generator="uniform")
        ex = LiveExecutor(pm, probe_policy(kind, pm), trace, device=str(device), dense_ms=RUN_DENSE_MS,
                          seed=RUN_SEED, host=host, measure_copies=False)
        ex.warm_up()
        measured += [st for st, _ in ex.run()][1:]
        del ex
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return measured


def probe_costs(steps: list, kind: str) -> dict:
    """Host cost per call from :func:`probe_steps`: pinned, us per expert FFN, copy and dense
    call; pageable, ms per blocking copy and us per expert FFN issued right after one."""
    if kind == "pinned":
        return {"compute_us": _per_call_us(steps, "compute", "computes"),
                "load_us": _per_call_us(steps, "load", "copies"),
                "dense_us": _per_call_us(steps, "dense", "denses")}
    return {"pageable_copy_ms": _per_call_us(steps, "load", "copies") * 1e-3,
            "pageable_compute_us": _per_call_us(steps, "compute", "computes")}


def executor_runs(device: torch.device, models: tuple[ModelSpec, ...], quick: bool, tick) -> dict:
    """Host time per call of the live executor, measured inside its own steps.

    Timed one call at a time on an idle GPU, an issue call costs half of what it costs in a
    running step (measured on the H100: 77 vs 100-190 us per expert FFN), so issue costs are
    taken from whole executor steps instead, over a uniform synthetic trace (not a validation
    scenario's), on ``RUN_LAYERS`` of the model's layers (:func:`probe_steps`):

    - **pinned**: dedup loads, an LRU cache of a quarter of the experts and next-layer oracle
      prefetch, at batch 1 and 4: host us per expert FFN, copy and dense call;
    - **pageable**: per-item loads from pageable memory (the executor's whole host pool) at
      batch 1 and 4: host ms per blocking copy, and us per expert FFN issued right after one (the
      driver finishes the staged copy before it takes the next call).

    ``{model: {"compute_us", "load_us", "dense_us", "pageable_copy_ms", "pageable_compute_us",
    "expert_bytes"}}``.
    """
    from calibrate.executors.twin import DEFAULT_HOST_BUDGET, host_experts

    out = {}
    for m in models:
        pm = _probe_model(m)
        res = {}
        for kind in PROBE_KINDS:
            tick(f"executor runs, {kind}, {m.name}")
            pinned = kind == "pinned" and device.type == "cuda"
            budget = QUICK_HOST_POOL_BYTES if quick else (DEFAULT_HOST_BUDGET if kind == "pageable" else 2 << 30)
            host = host_experts(pm, pinned, budget)
            res.update(probe_costs(probe_steps(device, pm, kind, host, 3 if quick else RUN_STEPS), kind))
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
