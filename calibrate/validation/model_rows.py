"""Real model vs projection, row by row (``simmoe validate --executor model``).

A preset's transformers model (random weights, its public architecture) runs live with its
routed experts offloaded (:class:`calibrate.executors.model.ModelExecutor`, the same planner
and policy objects as the simulator), on its own recorded routing or forced from the
scenario's trace; each (policy, batch, prompt) row is then simulated, with the scenario's
profile and ``engine.style``, on the very routing the row ran. Decisions (hits, misses,
transfers, copies, bytes, CPU experts) are checked step by step against the planner.

:func:`validate_model` is the command's engine (torch only inside the live run);
:func:`compare` projects rows a GPU run brought back, torch-free::

    python -m calibrate.validation.model_rows live-olmoe.json traces-olmoe.npz --profile h200

Error % = (projected - live) / live, of the median step latency over the steps after the
warm-up (at least the first step; the same steps on both sides).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from calibrate.measurements import host_state
from simulator.engine_costs import require_style
from simulator.engine_styles import EXECUTOR_DISPATCH as EXECUTOR_STYLES
from simulator.errors import InputError
from simulator.models import PRESETS, ModelSpec
from simulator.planner import Planner
from simulator.profile import Profile, load_profile
from simulator.runner import build_trace, cost_model, simulate
from simulator.scenario import MAX_CONTEXT, PolicySpec, Scenario, parse_scenario
from simulator.traces import Trace

#: what the executor counts of its own work, checked against the planner's decisions
COUNTED = ("transfers", "copies", "bytes_h2d", "cpu_computes", "dequants", "direct_computes")
DEFAULT_PROMPT = 4


def resident_policy(E: int, L: int, memory: str = "pinned") -> PolicySpec:
    """Every expert cached and preloaded: the engine alone."""
    return PolicySpec(name="resident", load="dedup", memory=memory,
                      cache={"kind": "static-hot", "capacity": E * L + 1, "staging": 1})


def model_policies(E: int, L: int, capacity: int, memory: str) -> dict[str, PolicySpec]:
    """The policies a real-model run compares (``bench/model_executor.py --policy``)."""
    lru = {"kind": "lru", "capacity": capacity}
    return {
        "resident": resident_policy(E, L, memory),
        "layer": PolicySpec(name="layer", load="layer", memory=memory, cache={"kind": "none", "capacity": E}),
        "dedup": PolicySpec(name="dedup", load="dedup", memory=memory),
        "lru": PolicySpec(name="lru", load="dedup", memory=memory, cache=lru),
        "lru-prefetch": PolicySpec(name="lru-prefetch", load="dedup", memory=memory, cache=lru,
                                   prefetch={"kind": "oracle"}),
        "cpu-miss": PolicySpec(name="cpu-miss", load="dedup", memory=memory, cache=lru, miss="cpu"),
    }


def decode_trace(experts: np.ndarray, batch: int, num_experts: int) -> Trace:
    steps = len(experts) // batch
    return Trace(experts=experts, step_offsets=np.arange(steps + 1, dtype=np.int64) * batch,
                 seq=np.tile(np.arange(batch, dtype=np.int32), steps), phase=np.zeros(steps, np.uint8),
                 num_experts=num_experts).validate("recorded trace")


def row_scenario(sc_name: str, spec: ModelSpec, policy: PolicySpec, trace: Trace, prompt: int, profile: str,
                 style: str, dense_ms: float | None = None, seed: int = 0) -> Scenario:
    """The one-row scenario the projection of a live row runs: the model as built, one policy,
    one batch, the row's steps and context. The policy object is used as given (the
    ``resident`` row's cache holds one slot more than a scenario may name)."""
    sc = parse_scenario({"name": "model-rows", "model": spec.model_dump(mode="json"), "profile": profile,
                         "seed": seed, "replications": 1, "batch_sizes": [int(trace.max_step_tokens)],
                         "trace": {"generator": "uniform", "steps": trace.num_steps, "prompt_tokens": prompt},
                         "engine": {"style": style, "dense_ms_per_layer": dense_ms},
                         "policies": [{"name": policy.name}]}, f"scenario {sc_name}")
    return sc.model_copy(update={"policies": [policy]})


def project_steps(sc: Scenario, trace: Trace, profile: Profile):
    """The simulated steps of ``trace`` under the one-row scenario ``sc`` (a DataFrame)."""
    return simulate(sc, sc.policies[0], trace, cost_model(sc, profile, trace.max_step_tokens), seed=sc.seed)


def project(sc: Scenario, trace: Trace, profile: Profile) -> list[float]:
    """Simulated latency (ms) of each step of ``trace`` under the one-row scenario ``sc``."""
    return [float(x) for x in project_steps(sc, trace, profile)["latency_ms"]]


def compare(live: dict, traces: dict[int, np.ndarray], profile: str, style: str = "hf-eager",
            capacity: int | None = None, memory: str = "pinned") -> list[dict]:
    """Rows of a ``bench/model_executor.py --out`` file against the projection."""
    m = PRESETS[live["model"]]
    E, L = m.num_experts, m.num_layers
    pols = model_policies(E, L, capacity or max(2, E * L // 4), memory)
    prof = load_profile(profile)
    rows = []
    for r in live["rows"]:
        b, prompt = r["batch"], r.get("prompt", DEFAULT_PROMPT)
        tr = decode_trace(traces[b], b, E)
        sim = statistics.median(project(row_scenario("model-rows", m, pols[r["policy"]], tr, prompt, profile, style),
                                        tr, prof)[1:])
        rows.append({"policy": r["policy"], "batch": b, "prompt": prompt, "live_ms": r["step_ms"], "sim_ms": sim,
                     "error_pct": (sim - r["step_ms"]) / r["step_ms"] * 100,
                     "decisions_identical": r["decisions_identical"]})
    return rows


# ------------------------------------------------------------------------------- live rows
#: timed steps a row keeps however short its budget (``row_budget_s``)
MIN_TIMED_STEPS = 3


def run_live(built, policy: PolicySpec, trace: Trace, *, device: str, host, prompt: int, probe: bool = False,
             dispatch: str = "loop", budget_s: float | None = None, warm: int = 1, timeline: list | None = None,
             cost=None, dense_ms: float = 0.0):
    """The steps of ``trace`` through :class:`ModelExecutor` (every one, or with ``budget_s``
    those until they took that long, ``warm`` + ``MIN_TIMED_STEPS`` at least); returns the
    steps and whether every step's decisions and executed work equal the planner's.
    ``timeline`` (a list): one more step, after those, runs under the profiler and is not
    among the steps returned (the trace's last step is kept for it); ``(step, its ms, its
    events)`` is appended (:mod:`calibrate.validation.live_timeline`). ``cost``, ``dense_ms``:
    what a cost-aware miss policy's planners (the executor's and the reference) are priced with."""
    from calibrate.executors.model import ModelExecutor

    ex = ModelExecutor(built, policy, trace, device=device, host=host, prompt_tokens=prompt, probe=probe,
                       dispatch=dispatch, cost=cost, dense_ms=dense_ms)
    ref = Planner(built.spec, policy, trace, cost=cost, dense_ms=dense_ms)
    steps, same = [], True
    last = trace.num_steps - (1 if timeline is not None and trace.num_steps > 1 else 0)
    t0 = time.perf_counter()

    def check(st, dec, s) -> bool:
        want = ref.plan_step(s)[1].as_dict()
        return dec.as_dict() == want and all(st.executed[c] == want[c] for c in COUNTED)
    try:
        for s in range(last):
            st, dec = ex.run_step(s)
            same &= check(st, dec, s)
            steps.append(st)
            if budget_s is not None and s + 1 >= warm + MIN_TIMED_STEPS and time.perf_counter() - t0 > budget_s:
                break
        if timeline is not None and len(steps) < trace.num_steps:
            from calibrate.validation.live_timeline import profile_step
            s = len(steps)
            try:
                st, dec, events = profile_step(ex, s)
            except RuntimeError as e:   # the profiler unavailable: the row stands without its timeline
                print(f"--live-timeline: step {s} not profiled ({str(e).splitlines()[0][:100]})", file=sys.stderr)
            else:
                same &= check(st, dec, s)
                timeline.append((s, st.latency_ms, events))
    except torch_oom() as e:
        ex.release()
        raise InputError("command line", "--prompt / --batch-sizes",
                         f"row {policy.name} B={trace.max_step_tokens} prompt {prompt}: out of GPU memory "
                         f"({str(e).splitlines()[0][:120]}); run fewer or smaller rows") from None
    ex.release()
    return steps, same


def torch_oom():
    """torch's out-of-memory error class (an exception no code raises without torch)."""
    import torch
    return getattr(torch, "OutOfMemoryError", MemoryError)


def live_summary(steps, batch: int, warm: int = 1) -> dict:
    """Median step latency and tokens/s after ``warm`` steps; copies, bytes and copy rate."""
    timed = steps[warm:] or steps
    lat = statistics.median(st.latency_ms for st in timed)
    moved = sum(st.executed["bytes_h2d"] for st in timed)
    out = {"live_median_ms": lat, "live_tokens_per_s": batch / lat * 1e3,
           "live_steps_ms": [st.latency_ms for st in steps],
           "copies_per_step": statistics.mean(st.executed["copies"] for st in timed),
           "GB_per_step": moved / len(timed) / 1e9,
           "copy_GBps": moved / 1e9 / (sum(st.latency_ms for st in timed) / 1e3)}
    if any(st.executed.get("cpu_computes") for st in timed):   # the host's time in CPU experts
        out["live_cpu_ms"] = statistics.median(st.executed.get("cpu_us", 0) / 1e3 for st in timed)
        out["live_cpu_down_ms"] = statistics.median(st.executed.get("cpu_down_us", 0) / 1e3 for st in timed)
    return out


HOST_SCALED = ("launch_us", "sync_us", "pageable_tail_us")


def host_scaled(profile: Profile, model: str, factor: float) -> Profile:
    """The profile with its host-bound terms scaled by ``factor`` (the host's dispatch speed
    now against calibration's, :mod:`calibrate.measurements.host_speed`): the host's issue
    costs, and the model's engine tables, whose eager decode is host-bound (every table entry:
    the non-expert layer and its host part, the embedding and head, prefill, and each style's
    call; the in situ CPU path). The GPU's terms (copy curves, expert compute, ``decode_gpu``)
    stay as measured."""
    d = profile.model_dump(mode="json", by_alias=True)
    h = d["host"]
    h["launch_us"] = {k: v * factor for k, v in h["launch_us"].items()}
    h["sync_us"] *= factor
    h["pageable_tail_us"] *= factor
    e = d["engine"][model]
    for g in ("decode", "decode_host", "dense_decode"):
        if e.get(g):
            e[g]["ms"] = [[v * factor for v in row] for row in e[g]["ms"]]
    for t in ("prefill", "head"):
        e[t] = [[x, v * factor] for x, v in e[t]]
    for st in e["styles"].values():
        for k in ("base_ms", "per_expert_ms", "host_base_ms", "host_per_expert_ms", "host_per_load_ms"):
            if st.get(k) is not None:
                st[k] *= factor
    if (e.get("in_situ") or {}).get("cpu_path"):
        e["in_situ"]["cpu_path"] = [[t, v * factor] for t, v in e["in_situ"]["cpu_path"]]
    return Profile.model_validate(d)


def probe_factor(probes: list, prof: Profile, model: str) -> tuple[float | None, float | None]:
    """(the median of the timed steps' probes in µs, its ratio to calibration's), or Nones.
    Calibration's is the probe beside the in situ steps (``in_situ.probe_dispatch_us``), which
    the profile's step terms were measured at; else the engine run's own, before and after it
    (``source.host_probe_dispatch_us``: on the H200 that one met the slow state, 9.1 us, while
    the in situ steps between ran in the fast one)."""
    vals = [pr["dispatch_us"] for pr in probes if pr and pr.get("dispatch_us")]
    eng = prof.engine.get(model)
    situ = eng.in_situ if eng is not None else None
    cal = situ.probe_dispatch_us if situ is not None and situ.probe_dispatch_us else \
        ((eng.source or {}).get("host_probe_dispatch_us") if eng is not None else None)
    if not vals:
        return None, None
    now = statistics.median(vals)
    return now, (now / cal if cal else None)


MIN_FAST_STEPS = 3   # a row enters the fast-state error with at least this many fast steps
HOST_MEMORY_SHARE = 0.85   # of the memory available, what the host copies of the experts may take


def host_memory_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_host_memory(spec: ModelSpec, policies, device: str, source: str, available: int | None = None) -> None:
    """Refuse, before anything is built, a run whose host copies of the routed experts (one
    per memory kind the policies use, and the largest quantised copy one row's executor
    makes) would not fit the host's available memory."""
    from simulator.tiers import stored_bytes
    cuda = device.startswith("cuda")
    kinds = sorted({"pinned" if p.memory == "pinned" and cuda else "pageable" for p in policies})
    experts = spec.num_experts * spec.num_layers
    need = spec.expert_bytes * experts * len(kinds)
    quant = [stored_bytes(spec, p.expert_dtype) * experts for p in policies if p.expert_dtype]
    if quant:
        need += max(quant)
        kinds.append("a quantised copy")
    avail = host_memory_available() if available is None else available
    if avail is not None and need > HOST_MEMORY_SHARE * avail:
        raise InputError(source, "policies", f"the routed experts in host memory ({' and '.join(kinds)}) take "
                                             f"{need / 2**30:.1f} GiB, over {HOST_MEMORY_SHARE:.0%} of the "
                                             f"{avail / 2**30:.1f} GiB available; use one memory kind for every "
                                             f"policy, or fewer layers (--layers)")


def host_pools(built, policies, device: str) -> dict:
    """The routed experts in host memory once per memory kind the policies use (pinned only on CUDA)."""
    from calibrate.executors.model import host_experts

    cuda = device.startswith("cuda")
    kinds = {p.memory == "pinned" and cuda for p in policies}
    pools = {pinned: host_experts(built, pinned) for pinned in sorted(kinds)}
    return {p.memory: pools[p.memory == "pinned" and cuda] for p in policies}


def write_model_validation(report: dict, out_dir: Path) -> list[Path]:
    """validation.json (and, with timing, validation.png: live vs projected) and the rows'
    routing (``routing.npz``, for ``--reproject``), written atomically (all or none)."""
    report = dict(report)
    traces = report.pop(ROUTING_KEY, None) or {}
    extra = {ROUTING_FILE: lambda path: write_routing(traces, path)} if traces else {}
    for key, name in ((PROFILE_KEY, PROFILE_FILE), (IN_SITU_KEY, IN_SITU_FILE)):   # --in-situ's
        doc = report.pop(key, None)
        if doc is not None:
            extra[name] = lambda path, doc=doc: path.write_text(json.dumps(doc, indent=1) + "\n")
    timelines = report.pop(TIMELINES_KEY, None)
    if timelines:   # --live-timeline: one Perfetto file per row
        def write_timelines(path: Path, docs=timelines):
            path.mkdir()
            for name, doc in docs.items():
                (path / name).write_text(json.dumps(doc, separators=(",", ":")))
        extra[TIMELINES_DIR] = write_timelines
    if report["timing"]:
        from calibrate.validation.validate import write_validation
        return write_validation(report, out_dir, extra)
    from simulator.atomic import atomic_files
    with atomic_files(Path(out_dir), "--out") as tmp:
        (tmp / "validation.json").write_text(json.dumps(report, indent=1) + "\n")
        for name, write in extra.items():
            write(tmp / name)
    return [Path(out_dir) / "validation.json"] + [Path(out_dir) / n for n in extra]


def write_routing(traces: dict[str, Trace], path: Path) -> None:
    """Each row's decode trace (``p<prompt>_b<batch>``): experts, step offsets, sequences, phases."""
    arrays = {}
    for key, tr in traces.items():
        arrays.update({f"{key}.experts": tr.experts, f"{key}.step_offsets": tr.step_offsets,
                       f"{key}.seq": tr.seq, f"{key}.phase": tr.phase})
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def read_routing(path: Path, num_experts: int) -> dict[tuple[int, int], Trace]:
    """:func:`write_routing`'s file back: (prompt, batch) -> Trace (one clear error if unreadable)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            parts: dict[str, dict] = {}
            for name in z.files:
                key, _, field = name.partition(".")
                parts.setdefault(key, {})[field] = z[name]
        out = {}
        for key, a in parts.items():
            prompt, batch = (int(x[1:]) for x in key.split("_"))
            out[prompt, batch] = Trace(experts=a["experts"], step_offsets=a["step_offsets"], seq=a["seq"],
                                       phase=a["phase"], num_experts=num_experts).validate(str(path))
        return out
    except InputError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise InputError(str(path), "routing", f"cannot read the rows' routing: {e}") from None


def reproject(run_dir: Path, profile: str | Profile | None = None) -> dict:
    """A ``--executor model`` run's live rows projected again, with this code and ``profile``
    (default: the run's), on the routing each row ran: no GPU, no model. Returns the report
    with the new projections (``reprojected_from``: the run's folder, ``profile_then``: its
    profile), for :func:`write_model_validation`."""
    run_dir = Path(run_dir)
    vj = run_dir / "validation.json"
    try:
        doc = json.loads(vj.read_text())
    except FileNotFoundError:
        raise InputError(str(vj), "validation.json", "not found: give the folder a `simmoe validate --executor "
                                                     "model` run wrote") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(str(vj), "validation.json", f"cannot read JSON: {e}") from None
    if doc.get("executor") != "model" or not doc.get("timing"):
        raise InputError(str(vj), "executor", "not a timed `--executor model` run (only those have rows to project)")
    if "spec" not in doc or not (run_dir / ROUTING_FILE).exists():
        raise InputError(str(run_dir), ROUTING_FILE, "missing: the run predates --reproject (2026-12-02); "
                                                     "run it again to keep its routing")
    spec = ModelSpec.model_validate(doc["spec"])
    pols = {p["name"]: PolicySpec.model_validate(p) for p in doc["policies"]}
    then = doc["profile"]
    if profile is None and then == PROFILE_FILE:   # --in-situ: the profile written beside the rows
        profile = str(run_dir / PROFILE_FILE)
    prof = profile if isinstance(profile, Profile) else load_profile(profile or then)
    prof_name = profile if isinstance(profile, str) else then
    style, warm = doc["style"], doc["warmup_steps"]
    require_style(prof, spec.name, style, str(profile or doc["profile"]))
    traces = read_routing(run_dir / ROUTING_FILE, spec.num_experts)
    rows, cells, ones = [], [], []
    for r in doc["rows"]:
        row = {k: v for k, v in r.items() if k not in PROJECTED}
        key = (row["prompt"], row["batch_size"])
        if row["policy"] not in pols or key not in traces:
            raise InputError(str(vj), "rows", f"row {row['policy']} B={key[1]} prompt {key[0]}: "
                                              "its policy or routing is missing")
        pol, tr = pols[row["policy"]], traces[key]
        ones.append(project_row(row, pol, key[0], tr, spec=spec, sc_name=doc["scenario"], prof=prof,
                                prof_name=prof_name, style=style, dense_ms=doc.get("dense_ms_per_layer"),
                                seed=doc.get("seed", 0), warm=warm))
        cells.append((pol, key[0], key[1], tr))
        rows.append(row)
    if any(p.name == "resident" for p, *_ in cells):
        paired_errors(rows, cells, ones, prof, spec.name, warm)
    return {**doc, "rows": rows, "profile": prof_name, "profile_then": doc["profile"],
            "reprojected_from": str(run_dir), **summary_stats(rows, True),
            ROUTING_KEY: {f"p{p}_b{b}": tr for (p, b), tr in traces.items()}}


# ----------------------------------------------------------------- scenario -> built model
def scaled_policy(policy: PolicySpec, full: ModelSpec, built: ModelSpec) -> PolicySpec:
    """A full-size scenario's policy on a smaller built model (``--tiny``, ``--layers``): cache
    capacities (in experts; bytes of the full-size expert are first counted in experts) and
    prefetch budgets scaled by the share of experts kept, rounded up. A per-layer pool (cache
    ``none``, ``scope: per-layer``) and a prefetch budget scale by the experts per layer."""
    if (full.num_experts, full.num_layers) == (built.num_experts, built.num_layers):
        return policy
    per_layer = built.num_experts / full.num_experts
    total = built.num_experts * built.num_layers / (full.num_experts * full.num_layers)
    d = policy.model_dump(mode="json")
    c = policy.cache
    if c.capacity is not None:
        f = per_layer if c.kind == "none" or c.scope == "per-layer" else total
        d["cache"]["capacity"] = max(1, math.ceil(c.slots(full.expert_bytes) * f))
        if c.staging:
            d["cache"]["staging"] = max(1, math.ceil(c.staging * f))
    if policy.prefetch.budget:
        d["prefetch"]["budget"] = max(1, math.ceil(policy.prefetch.budget * per_layer))
    return PolicySpec.model_validate(d)


def built_spec(sc: Scenario, tiny: bool, layers: int | None, source: str) -> ModelSpec:
    """The model ``--executor model`` builds for the scenario (without building it)."""
    from calibrate.models.build import keep_layers, tiny_spec

    m = sc.model
    if m.arch is None:
        known = ", ".join(n for n, p in PRESETS.items() if p.arch is not None)
        raise InputError(source, "model", f"{m.name!r} has no architecture to build (--executor model needs a "
                                          f"preset with one: {known}; --executor twin runs any model)")
    spec = tiny_spec(m) if tiny else m
    if layers is not None:
        try:
            spec = keep_layers(spec, layers)
        except ValueError as e:
            raise InputError("command line", "--layers", str(e)) from None
    return spec


def host_factor_matching(one: Scenario, trace: Trace, prof: Profile, model: str, live_ms: float, warm: int,
                         lo: float = 0.2, hi: float = 5.0, iters: int = 14, upto: int | None = None) -> float:
    """The factor on the profile's host terms (:func:`host_scaled`) at which the projection
    of ``one`` (a resident row) takes ``live_ms`` in the median (of its steps ``warm:upto``):
    bisection (the projection grows with the factor), clamped to [lo, hi]."""
    def med(f: float) -> float:
        return statistics.median(project(one, trace, host_scaled(prof, model, f))[warm:upto])
    if med(lo) >= live_ms:
        return lo
    if med(hi) <= live_ms:
        return hi
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if med(mid) < live_ms else (lo, mid)
    return math.sqrt(lo * hi)


def paired_errors(rows: list[dict], cells: list, ones: list[Scenario], prof: Profile, model: str, warm: int) -> None:
    """The error of each offloading row against the resident row of its (prompt, batch), run
    just before it: the host factor that makes the resident row's projection meet its live
    median (the engine alone, on the host as it was then) is applied to the row's projection
    (``host_factor_paired``, ``sim_paired_median_ms``, ``error_paired_pct``). This separates
    the offloading model (copies, hits, prefetch, CPU misses) from the host's minute-to-minute
    speed, which moved 1.7x between calibration and validation on the lent H200
    (docs/validation.md); the resident rows themselves get no paired error."""
    factors = {}
    for row, (pol, prompt, b, tr), one in zip(rows, cells, ones):
        key = (prompt, b)
        upto = row.get("steps_run")
        if pol.name == "resident":
            factors[key] = host_factor_matching(one, tr, prof, model, row["live_median_ms"], warm, upto=upto)
        if key not in factors:
            continue
        f = factors[key]
        med = statistics.median(project(one, tr, host_scaled(prof, model, f))[warm:upto])
        row.update(host_factor_paired=f, sim_paired_median_ms=med)
        if pol.name != "resident":   # the resident row meets itself by construction
            row["error_paired_pct"] = (med - row["live_median_ms"]) / row["live_median_ms"] * 100


def thread_notes(prof: Profile, threads: int, cpu_policies: list, model: str | None = None) -> list[str]:
    """A note when the run's CPU misses compute with other than the profile's torch threads:
    the profile's CPU expert times then do not describe this run (on the H200, 8 pinned
    threads against a profile of 16 put every CPU-miss row 22-44% slower live). ``model``:
    the threads of its in situ CPU path, where the profile has one (what the rows are priced by)."""
    eng = prof.engine.get(model) if model else None
    situ = eng.in_situ if eng is not None else None
    cal = situ.cpu_threads if situ is not None and situ.cpu_path else (prof.provenance or {}).get("cpu_threads")
    if not cpu_policies or not cal or cal == threads:
        return []
    names = ", ".join(p.name for p in cpu_policies)
    return [f"{names}: CPU experts run with {threads} torch thread(s) here, the profile's were timed with {cal}; "
            f"calibrate with the same --cpus for these rows to be comparable"]


def cpu_notes(rows: list[dict]) -> list[str]:
    """For each projected row with CPU experts: the host's time in them per step, live (the
    experts, plus the layer's input coming down) beside the projection's, so that a CPU-miss
    row's error is seen in the part that made it."""
    out = []
    for r in rows:
        if "sim_cpu_ms" not in r:
            continue
        live = r["live_cpu_ms"] + r.get("live_cpu_down_ms", 0.0)
        out.append(f"{r['policy']} B={r['batch_size']} prompt {r['prompt']}: CPU experts {live:.1f} ms a step live "
                   f"(of which the input's download {r.get('live_cpu_down_ms', 0.0):.1f}), "
                   f"{r['sim_cpu_ms']:.1f} ms projected ({(r['sim_cpu_ms'] - live) / live * 100:+.1f}%)")
    return out


def timeline_notes(rows: list[dict]) -> list[str]:
    """--live-timeline: for each row whose profiled step copied experts, the copies live and
    projected (count, median time, the copy engine's idle time between the first and last)."""
    out = []
    for r in rows:
        t = r.get("live_timeline")
        if not t or not t["copies"]["live"].get("copies"):
            continue
        lv, pj = t["copies"]["live"], t["copies"]["projected"]
        rate = f" ({lv['median_GBps']:.0f} GB/s)" if "median_GBps" in lv else ""
        proj = (f"{pj['copies']} x {pj['median_ms']:.3f} ms, idle {pj['idle_ms']:.1f} ms"
                if pj.get("copies") else "no copies")
        ov = t["copies"].get("overtaken_uploads") or {}
        held = (f"; {ov['overtaken']} of {ov['uploads']} compute-stream uploads overtaken by "
                f"{ov['copies_ahead']} expert copies issued after them ({ov['held_ms']:.1f} ms)"
                if ov.get("overtaken") else "")
        out.append(f"{r['policy']} B={r['batch_size']} prompt {r['prompt']} step {t['step']} "
                   f"({t['live_ms']:.1f} ms live, {t['sim_ms']:.1f} projected): copies live {lv['copies']} x "
                   f"{lv['median_ms']:.3f} ms{rate}, idle {lv['idle_ms']:.1f} ms; projected {proj}{held}")
    return out


class Stopped(BaseException):
    """A SIGTERM during the live rows (a BaseException: no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def stop_on_sigterm():
    """Within: a SIGTERM raises :class:`Stopped` (in the main thread; elsewhere nothing
    changes), so that the rows done are still projected and written. The previous handler is
    back afterwards: a second SIGTERM during the projections ends the process as before."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped("stopped by SIGTERM")
    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def validate_model(sc: Scenario, *, profile: str | Profile | None = None, device: str = "cuda", tiny: bool = False,
                   layers: int | None = None, routing: str = "own", prompts: list[int] | None = None,
                   resident: bool = True, base_dir: Path | None = None, source: str = "scenario",
                   progress: Callable[[int, int, str], None] | None = None, timing: bool | None = None,
                   passes: int = 1, say: Callable[[str], None] | None = None,
                   row_budget_s: float | None = None, max_seconds: float | None = None,
                   skip_unfit: bool = False, in_situ: bool = False, live_timeline: bool = False) -> dict:
    """Every (policy, batch, prompt) of ``sc`` on the real model, live and projected.

    ``routing``: ``own`` (each batch's routing recorded from the model's own router, every
    expert resident) or ``trace`` (the scenario's trace, built for the model as built, forced).
    ``resident``: a first row ``resident`` with every expert cached and preloaded (the engine
    alone; a scenario cannot name it: a cache there holds at most every expert, staging included).
    On the CPU (``device='cpu'``) only the decisions are checked: CPU timing is not a GPU's,
    so no projection is made (``timing``: default, not on the CPU; tests force it on the CPU).
    ``say``: receives one line, with timing, before the live rows: how long they will take
    (:func:`live_estimate_s`; the report keeps it, ``estimate_s``, beside ``live_s``).
    ``max_seconds``: no row starts once this many seconds have passed since the call began
    (the model's build and routing included); the rows left are listed in the report
    (``rows_not_run``), the rows that ran reported as usual (the first row always runs; a run
    inside a time limit, such as the lent GPU's 10 minutes a call, keeps what it finished).
    A SIGTERM (``timeout``'s) during the rows stops them the same way: the row it cut is
    dropped and named, and the rows done are projected and reported. ``skip_unfit``: a row
    that would not fit the GPU's free memory is left out and named in ``rows_not_run`` (else
    one error before any row). ``in_situ`` (with timing): before the rows, the in situ terms
    are timed on the model just built (:func:`calibrate.measurements.engine_step.measure_in_situ`:
    whole decode steps, the executor's pools, the router read, its CPU experts) and the rows are
    projected with them in place of the profile's (:func:`merge_in_situ`; the report's
    profile is then the one written beside it, ``profile.json``), so the terms and the rows
    meet one host state, and one build serves both. ``live_timeline`` (with timing): each
    row's step after its timed ones runs under the profiler, and its live and projected
    timelines are kept (one Perfetto file per row, written beside the report) with the copy
    engine's figures of both (``row["live_timeline"]``: :mod:`calibrate.validation.live_timeline`)."""
    from calibrate.validation.validate import check_device

    style = sc.engine.style
    timing = not device.startswith("cpu") if timing is None else timing
    spec = built_spec(sc, tiny, layers, source)
    if sc.trace.prefill_tokens:
        raise InputError(source, "trace.prefill_tokens", "the model executor runs decode steps after a prompt; "
                                                          "give the context as trace.prompt_tokens")
    prompts = prompts or [max(1, sc.trace.prompt_tokens or DEFAULT_PROMPT)]
    if max(prompts) > MAX_CONTEXT:
        raise InputError("command line", "--prompt", f"{max(prompts):,} tokens is past any context (at most {MAX_CONTEXT:,})")
    arch = spec.arch
    if max(prompts) + sc.trace.steps > arch.max_positions:
        raise InputError("command line", "--prompt", f"{max(prompts):,} tokens + {sc.trace.steps} decode steps pass "
                                                     f"{sc.model.name}'s {arch.max_positions:,} positions: at most "
                                                     f"{arch.max_positions - sc.trace.steps:,}")
    policies = [scaled_policy(p, sc.model, spec) for p in sc.policies]
    if resident:
        if any(p.name == "resident" for p in policies):
            raise InputError(source, "policies", "a policy is named 'resident', the row --resident adds; rename it")
        policies.insert(0, resident_policy(spec.num_experts, spec.num_layers))
    warm = max(1, sc.engine.warmup_steps)
    if warm >= sc.trace.steps:
        raise InputError(source, "trace.steps", f"{sc.trace.steps} step(s) leave none after the "
                                                f"{warm}-step warm-up to measure")
    prof = profile if isinstance(profile, Profile) else load_profile(profile or sc.profile)
    prof_name = profile if isinstance(profile, str) else (sc.profile or prof.name)
    if timing:
        if style not in EXECUTOR_STYLES:
            raise InputError(source, "engine.style", f"{style} does not price what the model executor runs; set "
                                                     f"engine.style to offload (its per-expert loop), offload-grouped "
                                                     f"(one grouped GEMM per call) or offload-graphs (grouped, "
                                                     f"between CUDA-graph replays)")
        require_style(prof, spec.name, style, f"profile {prof_name}")
    check_device(device)
    check_host_memory(spec, policies, device, source)
    import torch

    from calibrate.models.build import build_model

    t0 = time.perf_counter()
    built = build_model(sc.model, tiny=tiny, layers=layers, device=device, seed=sc.seed)
    traces = {}
    for prompt in prompts:
        for b in sc.batch_sizes:
            if routing == "own":
                from calibrate.executors.model import record_routing
                traces[prompt, b] = record_routing(built, batch=b, steps=sc.trace.steps, prompt_tokens=prompt,
                                                   seed=sc.seed, device=device)
            else:
                traces[prompt, b] = build_trace(sc.model_copy(update={"model": built.spec}), b, 0, base_dir)
    if timing:   # the compute tables of the built expert shape: before the long live part
        project_sc = row_scenario(sc.name, built.spec, policies[0], traces[prompts[0], sc.batch_sizes[0]], prompts[0],
                                  prof_name, style, sc.engine.dense_ms_per_layer, sc.seed)
        cost_model(project_sc, prof, 1)
    hosts = host_pools(built, policies, device)
    build_s = time.perf_counter() - t0
    situ_doc = prof_doc = None
    if in_situ and timing:   # before any executor: the in situ steps need the model's own experts
        from calibrate.measurements.engine_profile import merge_in_situ
        from calibrate.measurements.engine_step import measure_in_situ
        from simulator.profile import parse_profile
        if say:
            say(f"timing the in situ terms on the model just built (on the H200 about 3 min for OLMoE-1B-7B)")
        dispatch = EXECUTOR_STYLES.get(style, "loop")
        situ_doc = measure_in_situ(built.spec.name, device=device, built=built, host=hosts.get("pageable"),
                                   pinned_host=hosts.get("pinned"),
                                   styles={style: dispatch} if dispatch != "loop" else None, progress=say)
        situ_doc["elapsed_s"] = time.perf_counter() - t0 - build_s
        prof_doc = merge_in_situ(prof.to_json(), built.spec.name, situ_doc, source=f"profile {prof_name}")
        prof = parse_profile(prof_doc, f"profile {prof_name} with the in situ terms")
        prof_name = PROFILE_FILE
    rows, ones = [], []   # ones: each row's one-row scenario (with timing)
    # batch-major: a (prompt, batch)'s policies run back to back, the resident row first, so the
    # host's speed the resident row meets is the one its neighbours meet (the paired error below)
    cells = [(pol, prompt, b, tr) for (prompt, b), tr in traces.items() for pol in policies]
    total = len(cells) * passes
    not_run: list[str] = []
    if device.startswith("cuda"):
        unfit = check_gpu_memory(built, cells, sc.trace.steps, torch.cuda.mem_get_info(torch.device(device))[0],
                                 skip=skip_unfit)
        not_run += [f"{pol.name} B={b} prompt {prompt} (GPU memory)" for i, (pol, prompt, b, _) in enumerate(cells)
                    if i in unfit]
        cells = [c for i, c in enumerate(cells) if i not in unfit]
        total = len(cells) * passes
    # a cost-aware miss policy plans on predicted stream times: its planners get the projection's
    planner_costs = []
    for pol, prompt, b, tr in cells:
        if pol.miss.kind != "cheapest":
            planner_costs.append({})
            continue
        one = row_scenario(sc.name, built.spec, pol, tr, prompt, prof_name, style, sc.engine.dense_ms_per_layer,
                           sc.seed)
        planner_costs.append({"cost": cost_model(one, prof, tr.max_step_tokens), "dense_ms": one.dense_ms})
    estimate = None
    if timing:
        estimate = passes * sum(live_estimate_s(row_scenario(sc.name, built.spec, pol, tr, prompt, prof_name, style,
                                                             sc.engine.dense_ms_per_layer, sc.seed), tr, prof, prompt,
                                                budget_s=row_budget_s, warm=warm)
                                for pol, prompt, b, tr in cells)
        if say:
            from simulator.estimate import fmt_seconds
            say(f"{total} live row(s): about {fmt_seconds(estimate)} (their projected steps and prompts; "
                f"the model took {fmt_seconds(time.perf_counter() - t0)} to build)")
    live_t0 = time.perf_counter()
    ran: dict[int, list] = {i: [] for i in range(len(cells))}   # each pass's steps, rows interleaved
    profile_rows = live_timeline and timing
    profiled: dict[int, list] = {}   # --live-timeline: each row's profiled step (one per pass)
    timelines: dict[str, dict] = {}
    done = 0
    stopped = None
    with stop_on_sigterm():
        for p in range(passes):
            for i, (pol, prompt, b, tr) in enumerate(cells):
                label = f"{pol.name} B={b} prompt {prompt}" + (f" pass {p + 1}" if passes > 1 else "")
                if stopped or (max_seconds is not None and done and time.perf_counter() - t0 >= max_seconds):
                    not_run.append(label + (f" ({stopped})" if stopped else ""))
                    continue
                try:
                    if progress:
                        progress(done, total, label)
                    ran[i].append(run_live(built, pol, tr, device=device, host=hosts[pol.memory], prompt=prompt,
                                           probe=timing, dispatch=EXECUTOR_STYLES.get(style, "loop"),
                                           budget_s=row_budget_s, warm=warm,
                                           timeline=profiled.setdefault(i, []) if profile_rows else None,
                                           **planner_costs[i]))
                except Stopped as why:
                    stopped = str(why)
                    not_run.append(f"{label} ({stopped})")
                    continue
                done += 1
    ran_cells = [(i, cell) for i, cell in enumerate(cells) if ran[i]]
    for i, (pol, prompt, b, tr) in ran_cells:
        same = all(ok for _, ok in ran[i])
        steps = [st for one, _ in ran[i] for st in one[warm:]]          # every pass's timed steps
        row = {"policy": pol.name, "batch_size": b, "prompt": prompt, "steps": tr.num_steps, "passes": passes,
               "steps_run": max(len(one) for one, _ in ran[i]),   # fewer than steps: cut by --row-budget
               "decisions_identical": same, **live_summary(steps, b, 0),
               "warmup_steps_ms": [st.latency_ms for one, _ in ran[i] for st in one[:warm]],
               "router_agrees": all(st.executed["router_agrees"] == built.spec.num_layers
                                    for one, _ in ran[i] for st in one),
               "probes": [st.probe for st in steps]}
        fast = [st for st in steps if st.host_fast]   # --host-state fast: the steps that ended fast
        if fast:
            row.update(fast_steps=[[st.step, st.latency_ms] for st in fast])
        if timing:
            ones.append(project_row(row, pol, prompt, tr, spec=built.spec, sc_name=sc.name, prof=prof,
                                    prof_name=prof_name, style=style, dense_ms=sc.engine.dense_ms_per_layer,
                                    seed=sc.seed, warm=warm))
            if profiled.get(i):
                name, doc = row_live_timeline(row, profiled[i][-1], ones[-1], tr, prof, built.spec.num_experts)
                timelines[name] = doc
        rows.append(row)
    live_s = time.perf_counter() - live_t0   # the live rows and their projections
    if progress:
        progress(total, total, "done")
    if timing and resident:
        paired_errors(rows, [cell for _, cell in ran_cells], ones, prof, built.spec.name, warm)
    gate = host_state.gate()
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "none"
    notes = thread_notes(prof, torch.get_num_threads(), [p for p in policies if p.miss.kind == "cpu"],
                         built.spec.name if style != "twin" else None) + cpu_notes(rows) + timeline_notes(rows)
    return {"scenario": sc.name, "executor": "model", "model": built.spec.name, "tiny": tiny,
            "layers": len(built.decoder_layers), "moe_layers": built.spec.num_layers,
            "profile": prof_name, "style": style, "routing": routing, "device": device, "timing": timing,
            "warmup_steps": warm, "environment": {"gpu": gpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                                "cpus": _cpus()},
            "build_s": build_s, "rows": rows, "host_now": None, "notes": notes,
            "decisions_identical": all(r["decisions_identical"] for r in rows),
            "host_state": gate.summary() if gate is not None else None,
            "estimate_s": estimate, "live_s": live_s, "max_seconds": max_seconds, "rows_not_run": not_run,
            "stopped": stopped,
            **summary_stats(rows, timing),
            # what ``--reproject`` needs to project these rows again (routing: ROUTING_FILE)
            "spec": built.spec.model_dump(mode="json"), "policies": [p.model_dump(mode="json") for p in policies],
            "seed": sc.seed, "dense_ms_per_layer": sc.engine.dense_ms_per_layer,
            **({"in_situ_s": situ_doc["elapsed_s"], IN_SITU_KEY: situ_doc, PROFILE_KEY: prof_doc} if situ_doc else {}),
            ROUTING_KEY: {f"p{prompt}_b{b}": tr for (prompt, b), tr in traces.items()},
            **({TIMELINES_KEY: timelines} if timelines else {})}


#: the live rows' routing, beside validation.json (``simmoe validate RUN --reproject``)
ROUTING_FILE = "routing.npz"
ROUTING_KEY = "_routing"   # the report's traces, written to ROUTING_FILE, not to the JSON
#: ``--in-situ``: the profile the rows were projected with, and its in situ steps, beside validation.json
PROFILE_FILE, PROFILE_KEY = "profile.json", "_profile"
IN_SITU_FILE, IN_SITU_KEY = "in_situ.json", "_in_situ"
#: --live-timeline: each row's profiled step and its projection, in TIMELINES_DIR beside validation.json
TIMELINES_DIR, TIMELINES_KEY = "timelines", "_timelines"


def row_live_timeline(row: dict, profiled: tuple, one: Scenario, tr: Trace, prof: Profile,
                      num_experts: int) -> tuple[str, dict]:
    """The row's profiled step beside the same step of its projection: the file's name and
    document; sets ``row["live_timeline"]`` (the file, the step, the copy engine's figures)."""
    from calibrate.validation.live_timeline import copy_summary, row_timeline
    step, live_ms, events = profiled
    records: list = []
    df = simulate(one, one.policies[0], tr, cost_model(one, prof, tr.max_step_tokens), seed=one.seed,
                  timeline=records)
    label = f"{row['policy']} B={row['batch_size']} prompt {row['prompt']}"
    doc, recs = row_timeline(label, events, df, records, step, num_experts, row["batch_size"])
    name = f"{row['policy']}-b{row['batch_size']}-p{row['prompt']}.json"
    row["live_timeline"] = {"file": f"{TIMELINES_DIR}/{name}", "step": step, "live_ms": live_ms,
                            "sim_ms": float(df["latency_ms"].iloc[step]),
                            "copies": copy_summary(events, recs, live_ms)}
    return name, doc


#: the fields a projection sets on a row (cleared before a re-projection)
PROJECTED = ("sim_median_ms", "sim_tokens_per_s", "sim_steps_ms", "error_pct", "tokens_error_pct",
             "live_fast_steps", "live_fast_median_ms", "sim_fast_median_ms", "error_fast_pct", "probe_dispatch_us",
             "host_factor", "sim_now_median_ms", "error_now_pct", "host_factor_paired", "sim_paired_median_ms",
             "error_paired_pct")


def project_row(row: dict, pol: PolicySpec, prompt: int, tr: Trace, *, spec: ModelSpec, sc_name: str,
                prof: Profile, prof_name: str, style: str, dense_ms: float | None, seed: int, warm: int) -> Scenario:
    """Project one live row (its routing ``tr``) and set the projected fields on ``row``: the
    median step after ``warm``, tokens/s, the errors; with the steps that ended in the host's
    fast state (``fast_steps``), their error; with probes beside the steps, the projection at
    the host's speed then ("now"). Returns the row's one-row scenario."""
    b = int(tr.max_step_tokens)
    one = row_scenario(sc_name, spec, pol, tr, prompt, prof_name, style, dense_ms, seed)
    df = project_steps(one, tr, prof)
    sim = [float(x) for x in df["latency_ms"]]
    upto = row.get("steps_run")           # the steps the row ran (a --row-budget cuts them)
    med = statistics.median(sim[warm:upto])
    live_ms = row["live_median_ms"]
    row.update(sim_median_ms=med, sim_tokens_per_s=b / med * 1e3, sim_steps_ms=sim,
               error_pct=(med - live_ms) / live_ms * 100,
               tokens_error_pct=(b / med - b / live_ms) / (b / live_ms) * 100)
    if "live_cpu_ms" in row:   # the CPU experts' part of the step, live and projected
        row["sim_cpu_ms"] = statistics.median(float(x) for x in df["cpu_ms"].iloc[warm:upto])
    fast = row.get("fast_steps") or []
    if fast:
        fast_live = statistics.median(ms for _, ms in fast)
        fast_sim = statistics.median(sim[s] for s, _ in fast)
        row.update(live_fast_steps=len(fast), live_fast_median_ms=fast_live, sim_fast_median_ms=fast_sim,
                   error_fast_pct=(fast_sim - fast_live) / fast_live * 100)
    now, factor = probe_factor(row.get("probes") or [], prof, spec.name)
    row.update(probe_dispatch_us=now, host_factor=factor)
    if factor is not None:   # the host terms at the speed the probe met beside the row
        now_ms = statistics.median(project(one, tr, host_scaled(prof, spec.name, factor))[warm:upto])
        row.update(sim_now_median_ms=now_ms, error_now_pct=(now_ms - live_ms) / live_ms * 100)
    return one


#: of the GPU memory free after the build, what one row may need (the rest: activations, allocator)
GPU_MEMORY_SHARE = 0.85


def row_gpu_bytes(built, policy: PolicySpec, trace: Trace, prompt: int, steps: int) -> int:
    """GPU bytes one live row holds beyond the built model: its slot pool and its KV cache of
    the prompt and every step (a dynamic cache's append copies a layer's cache: counted twice)."""
    slots = Planner(built.spec, policy, trace).total_slots
    a = built.spec.arch
    kv = int(trace.max_step_tokens) * (prompt + steps + 1) * a.kv_bytes_per_token(built.spec.dtype_bytes) \
        * len(built.decoder_layers)
    return slots * built.spec.expert_bytes + 2 * kv


def unfit_cells(built, cells: list, steps: int, free: int) -> list[tuple[int, str]]:
    """``(index, why)`` of each row that would need more GPU memory than is free."""
    out = []
    for i, (pol, prompt, b, tr) in enumerate(cells):
        need = row_gpu_bytes(built, pol, tr, prompt, steps)
        if need > GPU_MEMORY_SHARE * free:
            out.append((i, f"row {pol.name} B={b} prompt {prompt} needs ~{need / 2**30:.1f} GiB of GPU memory "
                           f"(expert slots and KV cache), {free / 2**30:.1f} GiB is free after the model"))
    return out


def check_gpu_memory(built, cells: list, steps: int, free: int, skip: bool = False) -> set[int]:
    """Before any row runs: one clear line when a row would need more GPU memory than is free,
    or with ``skip`` the indices of such rows (left out, and named in the report)."""
    unfit = unfit_cells(built, cells, steps, free)
    if unfit and not skip:
        raise InputError("command line", "--prompt / --batch-sizes",
                         f"{unfit[0][1]}: run fewer or smaller rows (or --skip-unfit)")
    return {i for i, _ in unfit}


def live_estimate_s(one: Scenario, trace: Trace, prof: Profile, prompt: int, budget_s: float | None = None,
                    warm: int = 1) -> float:
    """Seconds one live row takes, as its projection has it: its steps, plus its prompt's
    prefill as the executor runs it (chunks of at most ``PREFILL_CHUNK_TOKENS`` tokens, each
    copying every expert of every MoE layer from pinned host memory and running the layer's
    prefill over the chunk). Model build, routing records and CUDA-graph captures are not in
    it (on the H200, OLMoE: ~45 s to build, then 150-300 s for 24 rows at prompt 256).
    ``budget_s``: a row's steps stop once they took that long (after ``warm`` + 3)."""
    from calibrate.executors.model import PREFILL_CHUNK_TOKENS
    from simulator.engine_costs import curve_ms

    m = one.model
    B = int(trace.max_step_tokens)
    per_chunk = max(16, PREFILL_CHUNK_TOKENS // max(B, 1))
    chunks = -(-prompt // per_chunk)
    cost = cost_model(one, prof, B)
    tables = prof.engine.get(m.name)
    layer_ms = m.num_experts * cost.copy_ms(m.expert_bytes, "pinned")
    if tables is not None and tables.prefill:
        layer_ms += curve_ms(tables.prefill, min(prompt, per_chunk) * B)
    sim = project(one, trace, prof)
    steps_s = sum(sim) / 1e3
    if budget_s is not None:    # the first step past the budget still runs
        done, n = 0.0, 0
        for n, ms in enumerate(sim, 1):
            done += ms / 1e3
            if n >= warm + MIN_TIMED_STEPS and done > budget_s:
                break
        steps_s = done
    return steps_s + chunks * m.num_layers * layer_ms / 1e3


def summary_stats(rows: list[dict], timing: bool) -> dict:
    """The report's medians and worsts of |error| over the rows (plain, now, fast, paired, tokens/s)."""
    def col(key, pred=lambda r: True):
        return np.abs([r[key] for r in rows if r.get(key) is not None and pred(r)])
    errs = col("error_pct") if timing else np.zeros(0)
    now_errs, paired, tok = col("error_now_pct"), col("error_paired_pct"), col("tokens_error_pct")
    fast_errs = col("error_fast_pct", lambda r: r.get("live_fast_steps", 0) >= MIN_FAST_STEPS)

    def med(a):
        return float(np.median(a)) if len(a) else None

    def worst(a):
        return float(a.max()) if len(a) else None
    return {"median_abs_error_pct": med(errs) if timing else None, "worst_abs_error_pct": worst(errs) if timing else None,
            "median_abs_error_now_pct": med(now_errs), "worst_abs_error_now_pct": worst(now_errs),
            "median_abs_tokens_error_pct": med(tok) if timing else None,
            "fast_rows": len(fast_errs), "paired_rows": len(paired),
            "median_abs_error_paired_pct": med(paired), "worst_abs_error_paired_pct": worst(paired),
            "median_abs_error_fast_pct": med(fast_errs), "worst_abs_error_fast_pct": worst(fast_errs)}


def _cpus() -> str:
    """The CPUs this process may run on, as a range list (``0-15``)."""
    import os
    cpus = sorted(os.sched_getaffinity(0))
    runs, start = [], cpus[0]
    for a, b in zip(cpus, cpus[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}-{a}" if a > start else str(a))
            start = b
    return ",".join(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("live", type=Path)
    ap.add_argument("traces", type=Path)
    ap.add_argument("--profile", default="h200")
    ap.add_argument("--style", default="hf-eager")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    live = json.loads(a.live.read_text())
    with np.load(a.traces, allow_pickle=False) as z:
        traces = {int(k[1:]): z[k] for k in z.files}
    rows = compare(live, traces, a.profile, a.style)
    print(f"{live['model']} on {live.get('gpu', '?')}, profile {a.profile}, style {a.style}")
    print(f"{'policy':13s} {'batch':>5s} {'live ms':>9s} {'sim ms':>9s} {'error':>8s}  decisions")
    for r in rows:
        print(f"{r['policy']:13s} {r['batch']:5d} {r['live_ms']:9.2f} {r['sim_ms']:9.2f} {r['error_pct']:+7.1f}%  "
              f"{'identical' if r['decisions_identical'] else 'DIFFER'}")
    errs = np.abs([r["error_pct"] for r in rows])
    print(f"median |error| {np.median(errs):.1f}%, worst {errs.max():.1f}% over {len(rows)} rows")
    if a.json:
        a.json.write_text(json.dumps({"live": live, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
