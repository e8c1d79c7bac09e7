"""Projection vs measurement: run a scenario live (calibrate.executors.twin) and simulated, side by side.

For every (policy, batch size) of the scenario, replication 0's trace is run by the live
executor and by the simulator with the same planner. Decisions must agree exactly (hits,
misses, transfers, bytes, CPU experts: checked step by step, and the executor's own count of
what it executed); latency is compared as the median step latency over the measured steps
(after ``engine.warmup_steps``): error % = (simulated - live) / live. Each row is replayed
live several times (``repeats``, within a time budget) and each step's live latency is its
median over the replays, so a passing spike on the shared host does not decide a row.

With ``host_now`` (the default on CUDA) the host terms are also measured beside each row, by
calibration's own probes interleaved with the replays (before each, after the last, and every
``PROBE_EVERY_S`` between the steps of a long one: :mod:`calibrate.measurements.host_now`), and the row
is simulated a second time with them: ``error_now_pct`` is the model's error once the host's
drift since calibration is taken out; ``error_pct`` stays the profile's, as a user meets it.

The host's speed also swings by 10-20% from one second to the next (``bench/probe_pageable.py``:
a 27 MiB pageable copy read 3.1 to 5.7 ms in rounds seconds apart, the same in every variant).
A row whose pace the host sets (pageable loads, the CPU-miss path) that lasts a second is one
draw of that swing, and so is a probe beside it. So with ``host_now`` such a row alternates
replays and probes for at least ``host_window_s`` (up to ``MAX_REPEATS`` replays): both sides
then average over the same swings. Rows paced by the copy engine keep ``repeats``.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from simulator.atomic import atomic_files
from simulator.errors import InputError
from simulator.profile import Profile, load_profile
from simulator.runner import build_trace, cost_model, derive_seed, simulate
from simulator.scenario import Scenario

PROBE_EVERY_S = 3.0   # host-now probes: before each replay, after the last, and this often within one
HOST_WINDOW_S = 15.0  # host-now: a host-bound row alternates replays and probes for at least this long
MAX_REPEATS = 20      # ... but no more replays than this

DECISION_FIELDS = ("requests", "unique_requests", "hits", "misses", "transfers", "copies", "bytes_h2d",
                   "prefetches_issued", "prefetches_used", "prefetches_wasted", "cpu_computes")


class DecisionMismatch(AssertionError):
    pass


def check_device(device: str):
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("command line", "--device", f"{device} requested but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


@dataclass
class Row:
    policy: str
    batch_size: int
    steps: int
    live_median_ms: float
    sim_median_ms: float
    error_pct: float
    live_mean_ms: float
    sim_mean_ms: float
    live_gpu_median_ms: float | None
    copy_GBps: float | None          # achieved on the copy stream in copy-bound steps
    copy_bound_steps: int
    decisions_equal: bool
    transfers: int
    bytes_h2d: int
    hits: int
    misses: int
    live_steps_ms: list
    sim_steps_ms: list
    repeats: int
    sim_copy_GBps: float | None      # the rate the profile gives one expert copy of the row's memory kind
    host_us: dict                    # per call kind: live mean us per call vs the profile's (and now)
    sim_now_median_ms: float | None = None   # simulated with host terms measured beside the row
    error_now_pct: float | None = None
    host_now: dict | None = None     # those terms (medians over the probes) and the probe count
    live_spread_pct: float | None = None     # replay to replay: std / mean of each replay's median step


def _compare_decisions(sim_df, live_steps, policy, b):
    for (st, dec), (_, srow) in zip(live_steps, sim_df.iterrows()):
        d = dec.as_dict()
        for f in DECISION_FIELDS:
            if d[f] != srow[f]:
                raise DecisionMismatch(f"{policy} B={b} step {st.step}: {f} live {d[f]} != simulated {srow[f]}")
        ex = st.executed
        for f in ("transfers", "copies", "bytes_h2d", "cpu_computes", "dequants", "direct_computes",
                  "bytes_direct", "disk_reads", "bytes_disk"):
            if ex[f] != srow[f]:
                raise DecisionMismatch(f"{policy} B={b} step {st.step}: executed {f} {ex[f]} != simulated {srow[f]}")
        if ex["computed_tokens"] != srow["requests"]:
            raise DecisionMismatch(f"{policy} B={b} step {st.step}: computed tokens {ex['computed_tokens']}")


HOST_CALLS = {"compute": "computes", "load": "copies", "dense": "denses", "route": "denses",
              "cpu": "cpu_computes"}


def host_costs(runs, warm: int, sim_meas, cost, blocking: bool) -> dict:
    """Host time per call, live (mean over every replay's measured steps) and as the model
    has it: ``{kind: {"live": us, "sim": us or None, "calls": n}}`` for the kinds the row issued.
    A blocking (pageable) load's host time is its copy; the route wait has no single model value
    (it is the host waiting for the layer's dense work)."""
    copies = int(sim_meas["copies"].sum())
    cpus = int(sim_meas["cpu_computes"].sum())
    sim = {"compute": cost.launch_expert + (cost.pageable_tail if blocking else 0.0),
           "dense": cost.launch_dense, "route": None,
           "load": cost.launch_copy + (float(sim_meas["transfer_ms"].sum()) / copies if blocking and copies else 0.0),
           "cpu": float(sim_meas["cpu_ms"].sum()) / cpus if cpus else None}
    out = {}
    for kind, counter in HOST_CALLS.items():
        ms = sum(st.host_ms.get(kind, 0.0) for run in runs for st, _ in run if st.step >= warm)
        n = sum(st.executed.get(counter, 0) for run in runs for st, _ in run if st.step >= warm)
        if n:
            out["pageable copy" if kind == "load" and blocking else kind] = {"live": ms / n * 1e3, "sim": None if sim[kind] is None else sim[kind] * 1e3,
                         "calls": n}
    return out


def validate(sc: Scenario, *, profile: Profile | str | None, device: str = "cuda", base_dir: Path | None = None,
             progress: Callable[[int, int, str], None] | None = None, repeats: int = 3,
             row_budget_s: float = 15.0, host_now: bool | None = None,
             host_window_s: float = HOST_WINDOW_S, tier_dir: str | None = None) -> dict:
    """Live vs simulated for every (policy, batch size). Each row's trace is replayed live up
    to ``repeats`` times while the row has spent less than ``row_budget_s``; a step's live
    latency is its median over the replays (the shared host has occasional spikes).
    ``tier_dir``: where a disk tier's expert file is written (default: the temporary folder).
    ``host_now`` (default: on CUDA) also measures the host terms beside each row and reports
    the error with them; a host-bound row then alternates replays and probes for at least
    ``host_window_s`` seconds (at most ``MAX_REPEATS`` replays)."""
    import torch

    from calibrate.measurements.host_now import HostProbe, cpu_probe_tokens, profile_now
    from calibrate.executors.twin import LiveExecutor, host_experts
    from calibrate.measurements.provenance import host_identity

    dev = check_device(device)
    if not isinstance(profile, Profile):
        profile = load_profile(profile or sc.profile)
    rows: list[Row] = []
    warm = sc.engine.warmup_steps
    total = len(sc.batch_sizes) * len(sc.policies)
    hosts: dict[tuple, list] = {}

    def pool(pinned: bool, expert_dtype: str | None = None) -> list:
        if (pinned, expert_dtype) not in hosts:
            hosts[pinned, expert_dtype] = host_experts(sc.model, pinned, seed=sc.seed, expert_dtype=expert_dtype)
        return hosts[pinned, expert_dtype]

    probe = HostProbe(dev, sc.model, pool) if (dev.type == "cuda" if host_now is None else host_now) else None
    done = 0
    for b in sc.batch_sizes:
        trace = build_trace(sc, b, 0, base_dir)
        cost = cost_model(sc, profile, trace.max_step_tokens)   # raises if the shape is not in the profile
        if any(p.miss.kind == "cpu" for p in sc.policies):
            cost.require_cpu()
        cpu_tokens = cpu_probe_tokens(profile, cost.shape_key, trace.max_step_tokens)
        for pol in sc.policies:
            if progress:
                progress(done, total, f"{pol.name} B={b}")
            seed = derive_seed(sc.seed, 0, b, 7)
            sim = simulate(sc, pol, trace, cost, seed=seed)
            pinned = pol.memory == "pinned" and dev.type == "cuda"
            # paced by the host (a blocking pageable copy, the CPU path): averaged over a window
            window = host_window_s if probe and (pol.memory == "pageable" or pol.miss.kind == "cpu") else None
            runs, samples = [], []
            began = time.perf_counter()
            while True:   # repeat the replay while the row's time budget lasts: spikes on a shared host
                if probe:                # the host terms now, between replays
                    samples.append(probe.sample(pol, cpu_tokens))
                ex = LiveExecutor(sc.model, pol, trace, device=device, dense_ms=sc.dense_ms, seed=seed,
                                  host=pool(pinned, pol.expert_dtype), cost=cost, tier_dir=tier_dir)
                ex.warm_up()
                live, probed = [], time.perf_counter()
                for step in range(trace.num_steps):
                    live.append(ex.run_step(step))
                    # a long replay (pageable rows: seconds a step) is probed along the way, between steps
                    if probe and step + 1 < trace.num_steps and time.perf_counter() - probed > PROBE_EVERY_S:
                        samples.append(probe.sample(pol, cpu_tokens))
                        probed = time.perf_counter()
                one = sum(st.latency_ms for st, _ in live) * 1e-3
                ex.close()
                del ex
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                _compare_decisions(sim, live, pol.name, b)
                runs.append(live)
                spent = time.perf_counter() - began
                if window is not None:
                    if spent >= window or len(runs) >= MAX_REPEATS:
                        break
                elif len(runs) >= repeats or spent + one > row_budget_s:
                    break
            live = runs[0]
            meas = [(st, dec) for st, dec in live if st.step >= warm]
            sim_meas = sim[sim["step"] >= warm]
            blocking = pol.memory == "pageable" and cost.pageable_blocks_host
            host_us = host_costs(runs, warm, sim_meas, cost, blocking)
            now_ms = now_terms = None
            if probe:
                samples.append(probe.sample(pol, cpu_tokens))        # and one after the last replay
                prof_now, now_terms = profile_now(profile, sc.model, samples)
                cost_now = cost_model(sc, prof_now, trace.max_step_tokens)
                sim_now = simulate(sc, pol, trace, cost_now, seed=seed)
                now_meas = sim_now[sim_now["step"] >= warm]
                now_ms = float(now_meas["latency_ms"].median())
                now_terms = dict(now_terms, probes=len(samples))
                for kind, v in host_costs(runs, warm, now_meas, cost_now, blocking).items():
                    host_us[kind]["now"] = v["sim"]
            # each step's latency: the median over the repeats
            live_lat = [statistics.median(run[i][0].latency_ms for run in runs)
                        for i, (st, _) in enumerate(live) if st.step >= warm]
            lm, sm = statistics.median(live_lat), float(sim_meas["latency_ms"].median())
            # copy-bound steps: the copy stream busy for most of the step
            cb = [(st.copied_bytes, st.copy_ms) for st, _ in meas
                  if st.copy_ms and st.gpu_ms and st.copy_ms >= 0.8 * st.gpu_ms and st.copied_bytes]
            gbps = (sum(x for x, _ in cb) / (sum(y for _, y in cb) * 1e-3) / 1e9) if cb else None
            gpu = [st.gpu_ms for st, _ in meas if st.gpu_ms is not None]
            rows.append(Row(
                policy=pol.name, batch_size=b, steps=len(meas), live_median_ms=lm, sim_median_ms=sm,
                error_pct=(sm - lm) / lm * 100, live_mean_ms=float(np.mean(live_lat)),
                sim_mean_ms=float(sim_meas["latency_ms"].mean()),
                live_gpu_median_ms=statistics.median(gpu) if gpu else None, copy_GBps=gbps,
                copy_bound_steps=len(cb), decisions_equal=True,
                transfers=int(sim_meas["transfers"].sum()), bytes_h2d=int(sim_meas["bytes_h2d"].sum()),
                hits=int(sim_meas["hits"].sum()), misses=int(sim_meas["misses"].sum()),
                live_steps_ms=[round(x, 4) for x in live_lat],
                sim_steps_ms=[round(float(x), 4) for x in sim_meas["latency_ms"]],
                repeats=len(runs),
                sim_copy_GBps=sc.model.expert_bytes / cost.copy_ms(sc.model.expert_bytes, pol.memory) / 1e6,
                host_us=host_us, sim_now_median_ms=now_ms,
                error_now_pct=None if now_ms is None else (now_ms - lm) / lm * 100, host_now=now_terms,
                live_spread_pct=replay_spread(runs, warm),
            ))
            done += 1
    if progress:
        progress(done, total, "done")
    if probe:
        probe.close()
    errs = [abs(r.error_pct) for r in rows]
    now_errs = [abs(r.error_now_pct) for r in rows if r.error_now_pct is not None]
    env = {"device": str(dev), **host_identity()}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
    env["torch"] = torch.__version__
    # host-bound costs move from machine to machine: say whether this is where the profile was made
    made = profile.provenance.get("boot_id")
    env["same_host_as_profile"] = None if made in (None, "unknown") else made == env["boot_id"]
    return {
        "format": "simmoe-validation", "version": 1, "scenario": sc.name, "profile": profile.name,
        "profile_kind": profile.provenance.get("kind"), "environment": env,
        "median_abs_error_pct": float(np.median(errs)), "worst_abs_error_pct": float(np.max(errs)),
        "decisions_identical": all(r.decisions_equal for r in rows),
        "host_now": {"median_abs_error_pct": float(np.median(now_errs)), "worst_abs_error_pct": float(np.max(now_errs)),
                     "note": "simulated with the host terms measured beside each row (calibrate.measurements.host_now)"}
        if now_errs else None,
        "host_drift": host_drift(rows),
        "rows": [r.__dict__ for r in rows],
    }


def replay_spread(runs: list, warm: int) -> float | None:
    """How much the live side moved from one replay to the next: std / mean (%) of each
    replay's median step latency; None for a single replay."""
    med = [statistics.median(st.latency_ms for st, _ in run if st.step >= warm) for run in runs]
    return statistics.stdev(med) / statistics.mean(med) * 100 if len(med) > 1 else None


def host_drift(rows: list[Row]) -> dict:
    """Per host call kind, the median over rows of live / profile time per call: how far this
    host's issue costs, pageable copies and CPU path are from the machine and moment the
    profile was calibrated on (1.0: the same)."""
    ratios: dict[str, list] = {}
    for r in rows:
        for kind, v in r.host_us.items():
            if v["sim"]:
                ratios.setdefault(kind, []).append(v["live"] / v["sim"])
    return {k: float(np.median(v)) for k, v in ratios.items()}


def _readable_log_ticks(scatter, errors, batches: list[int]) -> None:
    """Log axes whose labels never overlap: the scatter's at 1, 2, 5 x 10^k (no minor labels),
    the error panel's at the batch sizes run (base 2)."""
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, NullLocator

    for axis in (scatter.xaxis, scatter.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
        axis.set_major_formatter(lambda v, _pos: f"{v:g}")
        axis.set_minor_formatter(NullFormatter())
    if len(batches) > 1:
        errors.set_xscale("log", base=2)
    step = max(1, -(-len(batches) // 10))
    errors.xaxis.set_major_locator(FixedLocator(batches[::step]))
    errors.xaxis.set_major_formatter(lambda v, _pos: f"{v:g}")
    errors.xaxis.set_minor_locator(NullLocator())


def write_validation(report: dict, out_dir: Path, extra: dict | None = None) -> list[Path]:
    """validation.json and validation.png (live vs simulated), written atomically; ``extra``:
    more files of the same folder, name -> a function writing it at the path it is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    rows = report["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    pols = sorted({r["policy"] for r in rows}, key=[r["policy"] for r in rows].index)
    prompts = sorted({r["prompt"] for r in rows if r.get("prompt") is not None})
    # the "now" projection: host terms probed beside the rows (--host-now) or in situ per row
    hn = report.get("host_now") or {}
    now_med = hn.get("median_abs_error_pct", report.get("median_abs_error_now_pct"))
    now_worst = hn.get("worst_abs_error_pct", report.get("worst_abs_error_now_pct"))
    now = now_med is not None and all(r.get("error_now_pct") is not None for r in rows)
    marks = "os^Dv"
    for p in pols:
        rr = [r for r in rows if r["policy"] == p]
        pts = a.scatter([r["live_median_ms"] for r in rr], [r["sim_median_ms"] for r in rr], label=p, s=22)
        colour = pts.get_facecolor()[0]
        # one error line per (policy, context): joining two contexts' rows in one line zigzags
        for i, prompt in enumerate(prompts or [None]):
            rp = [r for r in rr if r.get("prompt") == prompt] if prompts else rr
            if not rp:
                continue
            b.plot([r["batch_size"] for r in rp], [r["error_pct"] for r in rp], marker=marks[i % len(marks)],
                   color=colour, ls=("-", "--", "-.", ":")[i % 4] if len(prompts) > 1 else "-")
            if now:
                b.plot([r["batch_size"] for r in rp], [r.get("error_now_pct") for r in rp], marker="x", ls=":",
                       color=colour, alpha=0.7)
    if len(prompts) > 1:
        from matplotlib.lines import Line2D
        b.legend([Line2D([], [], color="0.3", marker=marks[i % len(marks)], ls=("-", "--", "-.", ":")[i % 4])
                  for i in range(len(prompts))], [f"context {p}" for p in prompts], fontsize=7)
    lim = [min(min(r["live_median_ms"], r["sim_median_ms"]) for r in rows) * 0.8,
           max(max(r["live_median_ms"], r["sim_median_ms"]) for r in rows) * 1.2]
    a.plot(lim, lim, "k--", lw=0.8)
    a.set(xscale="log", yscale="log", xlabel="live median step latency (ms)", ylabel="simulated (ms)",
          title=f"{report['scenario']}: projection vs measurement")
    b.axhspan(-5, 5, color="g", alpha=0.1)
    b.axhline(0, color="k", lw=0.6)
    title = f"profile: median |err| {report['median_abs_error_pct']:.1f}%, worst {report['worst_abs_error_pct']:.1f}%"
    if now:
        title += f"\nhost terms now (x, dotted): {now_med:.1f}%, {now_worst:.1f}%"
    b.set(xlabel="batch size", ylabel="error % (sim - live) / live", title=title)
    b.title.set_fontsize(9)
    _readable_log_ticks(a, b, sorted({r["batch_size"] for r in rows}))
    a.legend(fontsize=7)
    fig.tight_layout()
    try:
        with atomic_files(out_dir, "--out") as tmp:   # both files or none
            (tmp / "validation.json").write_text(json.dumps(report, indent=1) + "\n")
            fig.savefig(tmp / "validation.png", dpi=120)
            for name, write in (extra or {}).items():
                write(tmp / name)
    finally:
        plt.close(fig)
    return [out_dir / "validation.json", out_dir / "validation.png"] + [out_dir / n for n in (extra or {})]
