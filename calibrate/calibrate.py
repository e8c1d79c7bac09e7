"""``simmoe calibrate``: measure this machine and write a hardware profile.

A :class:`Plan` (validated options) runs as a fixed list of stages, each on its own buffers,
which are freed (and the device synchronised, so a CUDA error shows in the stage that caused
it) before the next:

1. copies: host <-> device by size and memory kind; one vs two copy streams; coalesced vs
   separate expert copies (:mod:`calibrate.measurements.copies`);
2. expert compute on the device, per expert shape (:mod:`calibrate.measurements.compute`);
3. expert compute on the host CPU (reused from 2 on the CPU device);
4. host overheads: sync, dense launch, slot allocation, the sleep kernel (:mod:`calibrate.measurements.overheads`);
5. (CUDA) the live executor's costs: expert-sized copy trains from cache-cold host pools, the
   host time of its own calls inside its steps, its CPU-miss path (:mod:`calibrate.measurements.executor_costs`);
6. the published study's table (:mod:`calibrate.measurements.study`).

Nothing is written until every stage has finished; the profile is then written atomically.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from simulator.errors import InputError
from simulator.models import PRESETS, ModelSpec

from calibrate.measurements import provenance as prov_mod
from calibrate.measurements.compute import expert_sweep
from calibrate.measurements.copies import alloc_pools, coalescing, copy_sweep, stream_comparison
from calibrate.measurements.executor_costs import copy_trains, cpu_path, executor_runs
from calibrate.executors.expert import torch_dtype
from calibrate.measurements.overheads import host_overheads, sleep_rate, slot_allocation
from calibrate.profile_writer import build_profile, check_writable, write_or_keep
from calibrate.measurements.study import study_table
from calibrate.measurements.timing import Timer

TRIALS, QUICK_TRIALS = 100, 10
WARMUP, QUICK_WARMUP = 3, 1
MIN_BYTES = 4 << 10
MAX_BYTES, QUICK_MAX_BYTES = 1 << 30, 64 << 20
MAX_TOKENS, QUICK_MAX_TOKENS = 4096, 256
QUICK_MODEL = "published-study"
CPU_POINT_BUDGET_S = 0.5   # a CPU compute point stops adding trials after this long (3 trials at least)
CPU_STOP_MS = 200.0        # and the CPU token sweep stops after the first point slower than this
CPU_ROTATE_BYTES = 4 << 30  # CPU expert weights rotate over this much memory (cold, as in the live executor)

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Plan:
    """What one calibration measures."""

    device: torch.device
    models: tuple[ModelSpec, ...]
    trials: int
    warmup: int
    quick: bool
    max_bytes: int
    sizes: tuple[int, ...]
    tokens: tuple[int, ...]


def log_spaced(lo: int, hi: int, factor: int) -> list[int]:
    """``lo, lo*factor, ...`` up to ``hi``, with ``hi`` itself always last."""
    out = [lo]
    while out[-1] * factor < hi:
        out.append(out[-1] * factor)
    return out + [hi] if out[-1] != hi else out


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; a CUDA device must exist."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise InputError("command line", "--device", f"{name!r}: expected cuda, cuda:N or cpu")
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA support"
        raise InputError("command line", "--device",
                         f"{name}: no CUDA GPU available (torch {torch.__version__}, {built}); "
                         "use --device cpu to calibrate on the CPU")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise InputError("command line", "--device", f"{name}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def resolve_models(names: list[str], quick: bool) -> tuple[ModelSpec, ...]:
    """Presets by name (default: all, or the published study's expert with ``--quick``), one per expert shape."""
    names = list(names) or ([QUICK_MODEL] if quick else list(PRESETS))
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise InputError("command line", "--model", f"unknown preset {unknown[0]!r}; known: {', '.join(PRESETS)}")
    by_shape: dict[str, ModelSpec] = {}
    for n in names:
        torch_dtype(PRESETS[n])
        by_shape.setdefault(PRESETS[n].shape_key, PRESETS[n])
    return tuple(by_shape.values())


def make_plan(device: str, models: list[str], trials: int | None, quick: bool) -> Plan:
    """Validate the options (InputError on bad ones) and lay out sizes and token counts."""
    specs = resolve_models(models, quick)
    dev = resolve_device(device)
    max_bytes = QUICK_MAX_BYTES if quick else MAX_BYTES
    factor = 4 if quick else 2
    sizes = set(log_spaced(MIN_BYTES, max_bytes, factor)) | {m.expert_bytes for m in specs if m.expert_bytes <= max_bytes}
    return Plan(
        device=dev, models=specs, trials=trials or (QUICK_TRIALS if quick else TRIALS),
        warmup=QUICK_WARMUP if quick else WARMUP, quick=quick, max_bytes=max_bytes, sizes=tuple(sorted(sizes)),
        tokens=tuple(log_spaced(1, QUICK_MAX_TOKENS if quick else MAX_TOKENS, factor)),
    )


# ------------------------------------------------------------------------------ stages
def _stage_copies(plan: Plan, timer: Timer, tick) -> dict:
    pools = alloc_pools(timer, plan.max_bytes)
    out = {"copies": copy_sweep(timer, pools, list(plan.sizes), plan.trials, plan.warmup, tick)}
    if timer.is_cuda:
        tick("one copy stream vs two")
        out["copy_streams"] = stream_comparison(timer, pools, plan.trials, plan.warmup)
    out["coalescing"] = {}
    for m in plan.models:
        tick(f"coalesced vs separate copies, {m.name}")
        out["coalescing"][m.name] = coalescing(timer, pools, m, plan.trials, plan.warmup)
    return out


def _compute_tables(plan: Plan, timer: Timer, tick) -> dict:
    cpu = not timer.is_cuda
    # cold weights on the CPU device; with CUDA the live-executor stage times the cold CPU path
    rotate = CPU_ROTATE_BYTES if cpu and not plan.quick and plan.device.type == "cpu" else None
    out = {}
    for m in plan.models:
        out[m.shape_key] = expert_sweep(timer, m, list(plan.tokens), plan.trials, plan.warmup, tick,
                                        budget_s=CPU_POINT_BUDGET_S if cpu else None,
                                        stop_ms=CPU_STOP_MS if cpu else None, rotate_bytes=rotate)
        gc.collect()
    return out


def _stage_compute_device(plan: Plan, timer: Timer, tick) -> dict:
    return {"compute_device": _compute_tables(plan, timer, tick)}


def _stage_compute_cpu(plan: Plan, timer: Timer, tick) -> dict:
    return {"compute_cpu": _compute_tables(plan, Timer(torch.device("cpu")), tick)}


def _stage_overheads(plan: Plan, timer: Timer, tick) -> dict:
    tick("sync and launch")
    out = {"overheads": host_overheads(timer, plan.trials, plan.warmup)}
    out["overheads"]["slot_allocation"] = {}
    for m in plan.models:
        tick(f"slot allocation, {m.name}")
        out["overheads"]["slot_allocation"][m.name] = slot_allocation(timer, m, plan.trials, plan.warmup)
    if timer.is_cuda:
        tick("sleep kernel rate")
        out["sleep"] = sleep_rate(timer, plan.trials, plan.warmup)
    return out


def _stage_executor(plan: Plan, timer: Timer, tick) -> dict:
    return {"copy_trains": copy_trains(plan.device, plan.models, plan.trials, plan.quick, tick),
            "executor_runs": executor_runs(plan.device, plan.models, plan.quick, tick),
            "executor_cpu": cpu_path(plan.device, plan.models, list(plan.tokens), plan.trials, plan.quick, tick)}


def _stage_study(plan: Plan, timer: Timer, tick) -> dict:
    return {"study_table": study_table(timer, plan.max_bytes, plan.trials, plan.warmup, tick)}


def stages(plan: Plan) -> list[tuple[str, Callable]]:
    out = [("copies", _stage_copies), ("expert compute, device", _stage_compute_device)]
    if plan.device.type == "cuda":
        out.append(("expert compute, host CPU", _stage_compute_cpu))
    out.append(("host overheads", _stage_overheads))
    if plan.device.type == "cuda":
        out.append(("live executor costs", _stage_executor))
    return out + [("published-study table", _stage_study)]


def _release(timer: Timer) -> None:
    gc.collect()
    if timer.is_cuda:
        torch.cuda.synchronize(timer.device)
        torch.cuda.empty_cache()


def measure(plan: Plan, progress: Progress | None = None) -> dict:
    """Run every stage; the merged results (the profile's ``measurements``)."""
    timer = Timer(plan.device)
    if timer.is_cuda:
        torch.cuda.set_device(plan.device)
    results: dict = {"stage_seconds": {}}
    todo = stages(plan)
    for i, (label, stage) in enumerate(todo):
        def tick(what: str, i=i, label=label) -> None:
            if progress:
                progress(i, len(todo), f"{label}: {what}")
        began = time.perf_counter()
        try:
            results.update(stage(plan, timer, tick))
            _release(timer)
        except torch.OutOfMemoryError as e:
            raise InputError("calibrate", label, f"out of memory ({str(e).splitlines()[0]}); "
                             "free the device or use --quick") from None
        results["stage_seconds"][label] = round(time.perf_counter() - began, 2)
    if progress:
        progress(len(todo), len(todo), "done")
    return results


@dataclass
class Job:
    """A plan with its destination, checked before anything is measured."""

    plan: Plan
    path: Path
    name: str
    provenance: dict


@dataclass
class Outcome:
    path: Path
    profile: dict
    elapsed_s: float


def prepare(plan: Plan, out: Path | None, name: str | None) -> Job:
    """Provenance, and the profile path (default ``profiles/<device slug>.json``), checked writable."""
    prov = prov_mod.collect(plan.device)
    slug = prov_mod.default_slug(prov)
    path = Path(out) if out else Path("profiles") / f"{slug}.json"
    check_writable(path)
    return Job(plan, path, name or slug, prov)


def run(job: Job, command_line: str, progress: Progress | None = None) -> Outcome:
    """Measure, fit, and write the profile atomically."""
    plan = job.plan
    began = time.perf_counter()
    results = measure(plan, progress)
    elapsed = time.perf_counter() - began
    prov = dict(job.provenance, models=[m.name for m in plan.models], trials=plan.trials, warmup=plan.warmup,
                quick=plan.quick, command_line=command_line, elapsed_s=round(elapsed, 1))
    doc = build_profile(job.name, prov, results)
    write_or_keep(doc, job.path)
    return Outcome(job.path, doc, elapsed)
