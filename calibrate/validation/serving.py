"""Live serving vs its projection (``simmoe validate SCENARIO --executor model`` of a scenario
with a ``workload:`` section; docs/serving.md, "Validation").

Per (arrival rate, policy, max batch), replication 0's requests are served live
(:func:`calibrate.executors.serving.serve_live`: the scheduler, driver, planner and policy
objects of a simulated run, on the real transformers model, the clock on the measured step
times) and projected two ways:

- **replayed**: the live run's own schedule (the same steps, each with the same requests'
  tokens) through the planner and the engine. The schedule depends on time (who has arrived
  when a step is built), so only on the live schedule does a step-by-step comparison compare
  like with like: each step's projected latency against its measured one (median and mean,
  over all steps, the steps holding prompt tokens and the decode-only ones), and each
  request's TTFT, TPOT and end-to-end latency with the live steps' composition and the
  projected durations (a step starts when the one before ends, or when the last of its
  requests that first appears in it arrived, whichever is later).
- **projected**: the workload end to end as ``simmoe run`` projects it (the same arrivals,
  lengths and routing; the scheduler on projected step times, so its schedule may differ from
  the live one: ``schedule_identical`` says whether it did).

Decisions (hits, misses, transfers, bytes, prefetches, CPU experts) of the live run are
checked step by step against the replay's planner, and the executor's own count of what it
ran against them. Error % = (projected - live) / live. On the CPU only the decisions are
checked (``timing`` off): CPU step times say nothing of a GPU's.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from simulator.errors import InputError
from simulator.profile import Profile, load_profile
from simulator.serving.runner import Driver, latency_table, make_engine, serve_one, setup_run
from simulator.serving.scheduler import DECODE, Finished
from simulator.serving.workload import make_requests

from .validate import DECISION_FIELDS

LATENCY_COLS = ("ttft_ms", "tpot_ms", "e2e_ms")
STATS = ("mean", "p90")


def rate_scenarios(sc, rates: list[float] | None, source: str) -> list[tuple[float | None, object]]:
    """``(rate, scenario at that rate)`` for each rate of ``rates`` (else ``workload.rates``,
    else the scenario's own rate); a file of arrivals has its own times and takes no rate."""
    w = sc.workload
    if w.arrivals.kind == "file":
        if rates:
            raise InputError("command line", "--rates", "the scenario's arrivals come from a file, which has its own "
                                                        "times: remove --rates")
        return [(None, sc)]
    out = []
    for r in rates or w.rates or [w.arrivals.rate]:
        wr = w.model_copy(update={"arrivals": w.arrivals.model_copy(update={"rate": float(r)})})
        out.append((float(r), sc.model_copy(update={"workload": wr})))
    return out


def scaled_serving_policy(policy, full, built):
    """:func:`~calibrate.validation.model_rows.scaled_policy` with the serving knobs counted in
    experts (``upload_budget`` and ``staging`` over the whole model, ``keep_top`` per layer)
    scaled by the same shares, rounded up."""
    from calibrate.validation.model_rows import scaled_policy

    out = scaled_policy(policy, full, built)
    if out is policy:
        return policy
    ph = policy.serving
    total = built.num_experts * built.num_layers / (full.num_experts * full.num_layers)
    per_layer = built.num_experts / full.num_experts
    up = {}
    if ph.upload_budget:
        up["upload_budget"] = max(1, math.ceil(ph.upload_budget * total))
    if ph.staging:
        up["staging"] = max(1, math.ceil(ph.staging * per_layer))
    if ph.keep_top != type(ph)().keep_top:
        up["keep_top"] = max(1, math.ceil(ph.keep_top * per_layer))
    return out.model_copy(update={"serving": ph.model_copy(update=up)}) if up else out


def replay(sc, policy, max_batch: int, index: int, schedule: list[list], profile: Profile | None, base_dir=None):
    """The recorded ``schedule`` (each step's items, as the live run ran them) through a fresh
    planner: ``(decisions per step, projected latency per step or None)``. With ``profile``
    the engine times each step; without it the planner alone plans them (decisions only)."""
    run = setup_run(sc, policy, max_batch, 0, index=index, base_dir=base_dir)
    if profile is None:
        drive = Driver(run.sched, run.trace, run.routing)
        return [run.planner.plan_step(drive.append(list(items)))[1] for items in schedule], None
    engine, mixed = make_engine(sc, policy, profile)
    drive = Driver(run.sched, run.trace, run.routing, mixed)       # no fit: the schedule is the live one
    engine.run(run.planner, (drive.append(list(items)) for items in schedule))
    return [r.decisions for r in engine.records], [r.latency_ms for r in engine.records]


def replay_requests(requests: list, schedule: list[list], step_ms: list[float], slo):
    """Each request's latency with the live schedule's steps and ``step_ms`` durations: a step
    starts when the one before ends or when the last request first appearing in it arrived,
    whichever is later (the per-request table of :func:`~simulator.serving.runner.latency_table`)."""
    by_id = {r.rid: r for r in requests}
    admit, first, prefilled, produced = {}, {}, {}, {}
    done, end = [], 0.0
    for items, ms in zip(schedule, step_ms):
        new = [it.rid for it in items if it.rid not in admit]
        start = max([end] + [by_id[rid].arrival_ms for rid in new])
        for rid in new:
            admit[rid] = start
        end = start + ms
        for it in items:
            r = by_id[it.rid]
            if it.kind == DECODE:
                produced[it.rid] += 1
            else:
                prefilled[it.rid] = prefilled.get(it.rid, 0) + it.count
                if prefilled[it.rid] == r.prompt:
                    produced[it.rid], first[it.rid] = 1, end
            if produced.get(it.rid) == r.output:
                done.append(Finished(r, admit[it.rid], first[it.rid], end))
    return latency_table(done, slo)


def latency_stats(df) -> dict:
    """``{column: {mean, p90}}`` of TTFT, TPOT (requests of more than one output token, as
    the run's summary has it) and end-to-end latency."""
    out = {}
    for col in LATENCY_COLS:
        v = df[col].to_numpy()
        if col == "tpot_ms":
            v = v[df["output_tokens"].to_numpy() > 1]
        out[col] = {"mean": float(v.mean()) if len(v) else None,
                    "p90": float(np.percentile(v, 90)) if len(v) else None}
    return out


def _err(proj, live):
    return None if proj is None or not live else (proj - live) / live * 100


def step_block(live_ms: list[float], proj_ms: list[float], mask: np.ndarray) -> dict | None:
    """Median and mean step latency, live vs replayed, over the steps ``mask`` selects."""
    lv, pv = np.asarray(live_ms)[mask], np.asarray(proj_ms)[mask]
    if not len(lv):
        return None
    lm, pm = float(np.median(lv)), float(np.median(pv))
    return {"steps": int(len(lv)), "live_median_ms": lm, "replay_median_ms": pm, "error_pct": _err(pm, lm),
            "live_mean_ms": float(lv.mean()), "replay_mean_ms": float(pv.mean()),
            "mean_error_pct": _err(float(pv.mean()), float(lv.mean()))}


def prompt_rate(prefill_tokens: np.ndarray, ms: np.ndarray) -> float | None:
    """Prompt tokens per second over the steps holding them (as the run's summary has it)."""
    keep = prefill_tokens > 0
    return float(prefill_tokens[keep].sum() / ms[keep].sum() * 1e3) if keep.any() and ms[keep].sum() > 0 else None


def check_decisions(live_steps, decisions, what: str) -> str | None:
    """The first difference between the live run's decisions and executed work and the
    replay's decisions, or None."""
    if len(live_steps) != len(decisions):
        return f"{what}: {len(live_steps)} live steps, {len(decisions)} replayed"
    for (_, st, dec), ref in zip(live_steps, decisions):
        a, b = dec.as_dict(), ref.as_dict()
        for f in DECISION_FIELDS:
            if a[f] != b[f]:
                return f"{what} step {st.step}: {f} live {a[f]} != replayed {b[f]}"
        for f in ("transfers", "cpu_computes"):
            if st.executed[f] != b[f]:
                return f"{what} step {st.step}: executed {f} {st.executed[f]} != planned {b[f]}"
        if st.executed["computed_tokens"] != b["requests"]:
            return f"{what} step {st.step}: computed tokens {st.executed['computed_tokens']} != routed {b['requests']}"
    return None


def serving_row(sc, pol, index: int, rate, b: int, reqs, live_req, live_steps, prof, timing: bool, base_dir) -> dict:
    """One (rate, policy, max batch): decisions checked; with ``timing`` the replayed and the
    end-to-end projections beside the live run."""
    schedule = [items for items, _, _ in live_steps]
    live_ms = np.array([st.latency_ms for _, st, _ in live_steps])
    pre_tok = np.array([sum(it.count for it in items if it.kind != DECODE) for items in schedule])
    decisions, rep_ms = replay(sc, pol, b, index, schedule, prof if timing else None, base_dir)
    what = f"{pol.name} B={b}" + (f" rate {rate:g}" if rate is not None else "")
    mismatch = check_decisions(live_steps, decisions, what)
    live_stats = latency_stats(live_req)
    row = {"policy": pol.name, "rate": rate, "max_batch": b, "requests": len(live_req), "steps": len(schedule),
           "prefill_steps": int((pre_tok > 0).sum()), "decisions_identical": mismatch is None, "mismatch": mismatch,
           "live": live_stats, "live_prompt_tokens_per_s": prompt_rate(pre_tok, live_ms),
           "live_steps_ms": [round(float(x), 4) for x in live_ms],
           "cdf": {"live": {c: sorted(map(float, live_req[c])) for c in LATENCY_COLS}}}
    if not timing:
        return row
    rep_ms = np.asarray(rep_ms)
    proj = serve_one(sc, pol, b, 0, prof, index=index, base_dir=base_dir, requests=reqs)
    live_shape = [(len(items), int(p), sum(it.count for it in items if it.kind == DECODE))
                  for items, p in zip(schedule, pre_tok)]
    proj_shape = list(zip(proj.steps["sequences"].astype(int), proj.steps["prefill_tokens"].astype(int),
                          proj.steps["decode_tokens"].astype(int)))
    replayed = latency_stats(replay_requests(reqs, schedule, rep_ms.tolist(), sc.workload.slo))
    projected = latency_stats(proj.requests)
    row["latency"] = {col: {q: {"live": live_stats[col][q], "projected": projected[col][q],
                                "error_pct": _err(projected[col][q], live_stats[col][q]),
                                "replayed": replayed[col][q], "replayed_error_pct": _err(replayed[col][q], live_stats[col][q])}
                            for q in STATS} for col in LATENCY_COLS}
    row["step_ms"] = {"all": step_block(live_ms, rep_ms, np.ones(len(live_ms), bool)),
                      "prefill": step_block(live_ms, rep_ms, pre_tok > 0),
                      "decode": step_block(live_ms, rep_ms, pre_tok == 0)}
    pp = prompt_rate(proj.steps["prefill_tokens"].to_numpy(), proj.steps["latency_ms"].to_numpy())
    row.update(schedule_identical=live_shape == proj_shape, projected_steps=len(proj_shape),
               replay_steps_ms=[round(float(x), 4) for x in rep_ms],
               projected_prompt_tokens_per_s=pp,
               prompt_tokens_per_s_error_pct=_err(pp, row["live_prompt_tokens_per_s"]))
    row["cdf"]["projected"] = {c: sorted(map(float, proj.requests[c])) for c in LATENCY_COLS}
    row.update(host_now(sc, pol, b, index, schedule, reqs, live_steps, live_stats, live_ms, prof, base_dir))
    return row


def host_now(sc, pol, b: int, index: int, schedule, reqs, live_steps, live_stats, live_ms, prof, base_dir) -> dict:
    """The replay again with the profile's host terms scaled by the host's speed the row's
    steps met (their probes' median over the in situ steps', as ``validate --executor model``'s
    "now" column): ``probe_dispatch_us``, ``host_factor`` and, with a factor, the latency
    errors of that replay (``latency_now``: per column and statistic, its value and error) and
    its decode steps' (``step_ms_now``). On the H200 the host has two states (~7 and ~9.5 us
    per op issued): a host-bound decode step meets one or the other."""
    from calibrate.validation.model_rows import host_scaled, probe_factor
    probes = [st.probe for _, st, _ in live_steps]
    now, factor = probe_factor(probes, prof, sc.model.name)
    out = {"probe_dispatch_us": now, "host_factor": factor}
    if factor is None or sc.model.name not in prof.engine:
        return out
    _, now_ms = replay(sc, pol, b, index, schedule, host_scaled(prof, sc.model.name, factor), base_dir)
    now_ms = np.asarray(now_ms)
    stats = latency_stats(replay_requests(reqs, schedule, now_ms.tolist(), sc.workload.slo))
    pre_tok = np.array([sum(it.count for it in items if it.kind != DECODE) for items in schedule])
    out["latency_now"] = {col: {q: {"replayed_now": stats[col][q], "error_pct": _err(stats[col][q], live_stats[col][q])}
                                for q in STATS} for col in LATENCY_COLS}
    out["step_ms_now"] = {"all": step_block(live_ms, now_ms, np.ones(len(live_ms), bool)),
                          "decode": step_block(live_ms, now_ms, pre_tok == 0)}
    return out


def error_summary(rows: list[dict]) -> dict:
    """Per latency statistic, the median and worst |error| over the rows, end to end and
    replayed; and the step latency's."""
    out = {}
    for col in LATENCY_COLS:
        for q in STATS:
            for kind, key in (("projected", "error_pct"), ("replayed", "replayed_error_pct")):
                e = [abs(r["latency"][col][q][key]) for r in rows if r["latency"][col][q][key] is not None]
                if e:
                    out[f"{col}_{q}_{kind}"] = {"median_abs_pct": float(np.median(e)), "worst_abs_pct": float(max(e))}
    e = [abs(r["step_ms"]["all"]["error_pct"]) for r in rows]
    if e:
        out["step_median_replayed"] = {"median_abs_pct": float(np.median(e)), "worst_abs_pct": float(max(e))}
    for col in LATENCY_COLS:     # the replay with the host terms now (host_now)
        for q in STATS:
            e = [abs(v) for r in rows if r.get("latency_now")
                 if (v := r["latency_now"][col][q]["error_pct"]) is not None]
            if e:
                out[f"{col}_{q}_replayed_now"] = {"median_abs_pct": float(np.median(e)), "worst_abs_pct": float(max(e))}
    return out


def validate_serving(sc, *, rates: list[float] | None = None, profile: str | Profile | None = None,
                     device: str = "cuda", tiny: bool = False, layers: int | None = None, base_dir: Path | None = None,
                     source: str = "scenario", progress: Callable[[int, int, str], None] | None = None,
                     timing: bool | None = None, warmup: bool = True, max_seconds: float | None = None) -> dict:
    """Every (rate, policy, max batch) of a serving scenario, live on the real model and
    projected (module docstring). ``timing``: project (default: not on the CPU; tests force
    it with a profile that prices the tiny model). ``warmup``: one untimed run of the first
    two requests before the rows (the first CUDA kernels of a process are slow).
    ``max_seconds``: no row starts once the live rows (warm-up included) took that long (the
    first always runs); the rows left are named in ``rows_not_run``."""
    from calibrate.validation.model_rows import EXECUTOR_STYLES, _cpus, built_spec, check_host_memory, host_pools
    from calibrate.validation.validate import check_device
    from simulator.engine_costs import require_style
    from simulator.engine_styles import GRAPHED_STYLES

    timing = not device.startswith("cpu") if timing is None else timing
    spec = built_spec(sc, tiny, layers, source)
    style = sc.engine.style
    if style not in EXECUTOR_STYLES or style in GRAPHED_STYLES:
        why = ("replays one batch size's decode step from CUDA graphs; a serving run's steps vary"
               if style in GRAPHED_STYLES else "does not price what the model executor runs")
        raise InputError(source, "engine.style", f"{style} {why}; set engine.style to offload (its per-expert "
                                                 "loop) or offload-grouped")
    cells = rate_scenarios(sc, rates, source)
    prof = profile if isinstance(profile, Profile) else load_profile(profile or sc.profile)
    prof_name = profile if isinstance(profile, str) else (sc.profile or prof.name)
    if timing:
        require_style(prof, spec.name, style, f"profile {prof_name}")
    check_device(device)
    policies = [scaled_serving_policy(p, sc.model, spec) for p in sc.policies]
    check_host_memory(spec, policies, device, source)
    import torch

    from calibrate.executors.serving import serve_live
    from calibrate.models.build import build_model

    t0 = time.perf_counter()
    built = build_model(sc.model, tiny=tiny, layers=layers, device=device, seed=sc.seed)
    sc = sc.model_copy(update={"model": built.spec, "policies": policies})
    cells = [(r, c.model_copy(update={"model": built.spec, "policies": policies})) for r, c in cells]
    hosts = host_pools(built, policies, device)
    dispatch = EXECUTOR_STYLES[style]
    if timing:                    # the compute tables of the built shape, before the long live part
        make_engine(cells[0][1], policies[0], prof)
    build_s = time.perf_counter() - t0

    def live(csc, pol, b, reqs):
        out = serve_live(csc, pol, b, 0, built, device=device, base_dir=base_dir, requests=reqs,
                         host=hosts[pol.memory], dispatch=dispatch, probe=timing)
        deferred = out[2].planner.deferred
        del out[2].pool
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return out[0], out[1], deferred

    live_t0 = time.perf_counter()
    if warmup:
        csc = cells[0][1]
        live(csc, policies[0], csc.batch_sizes[0], make_requests(csc.workload, csc.seed, 0, base_dir)[:2])
    rows, total, done, not_run = [], len(cells) * len(policies) * len(sc.batch_sizes), 0, []
    for rate, csc in cells:
        reqs = make_requests(csc.workload, csc.seed, 0, base_dir)
        for i, pol in enumerate(policies):
            for b in csc.batch_sizes:
                label = f"{pol.name} B={b}" + (f" rate {rate:g}/s" if rate is not None else "")
                if max_seconds is not None and rows and time.perf_counter() - live_t0 >= max_seconds:
                    not_run.append(label)
                    continue
                if progress:
                    progress(done, total, label)
                began = time.perf_counter()
                live_req, live_steps, deferred = live(csc, pol, b, reqs)
                wall = time.perf_counter() - began
                row = serving_row(csc, pol, i, rate, b, reqs, live_req, live_steps, prof, timing, base_dir)
                row.update(live_wall_s=wall, deferred_prompt_tokens=deferred)
                rows.append(row)
                done += 1
    if progress:
        progress(total, total, "done")
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "none"
    return {"format": "simmoe-serving-validation", "version": 1, "scenario": sc.name, "executor": "model",
            "model": built.spec.name, "tiny": tiny, "layers": len(built.decoder_layers),
            "moe_layers": built.spec.num_layers, "profile": prof_name, "style": style, "device": device,
            "timing": timing, "routing": "forced (the scenario's per-request routing)",
            "rates": [r for r, _ in cells], "requests": sc.workload.requests,
            "environment": {"gpu": gpu, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": _cpus()},
            "build_s": build_s, "live_s": time.perf_counter() - live_t0, "max_seconds": max_seconds,
            "rows_not_run": not_run, "decisions_identical": all(r["decisions_identical"] for r in rows),
            "errors": error_summary(rows) if timing else None, "rows": rows}


def write_serving_validation(report: dict, out_dir: Path) -> list[Path]:
    """validation.json and validation.png (the latency CDFs, live solid and projected dashed,
    one column per arrival rate, one row per latency), written atomically."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simulator.atomic import atomic_files

    rows = report["rows"]
    rates = list(dict.fromkeys(r["rate"] for r in rows))
    pols = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(len(LATENCY_COLS), len(rates), figsize=(4.2 * len(rates), 9), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, rate in enumerate(rates):
        for i, col in enumerate(LATENCY_COLS):
            ax = axes[i][j]
            for r in (r for r in rows if r["rate"] == rate):
                c = colors[pols.index(r["policy"]) % len(colors)]
                lv = r["cdf"]["live"][col]
                if lv:
                    ax.step(lv, np.arange(1, len(lv) + 1) / len(lv), where="post", color=c,
                            label=f"{r['policy']} B={r['max_batch']} live")
                if "projected" in r["cdf"]:
                    pv = r["cdf"]["projected"][col]
                    ax.step(pv, np.arange(1, len(pv) + 1) / len(pv), where="post", color=c, ls="--",
                            label=f"{r['policy']} projected")
            ax.set(xlabel=col.replace("_ms", " (ms)"), ylabel="share of requests",
                   title=f"rate {rate:g}/s" if rate is not None else "arrivals from the file")
            ax.title.set_fontsize(9)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{report['scenario']}: {report['model']} on {report['environment']['gpu']} "
                 f"(live solid, projected dashed)", fontsize=10)
    fig.tight_layout()
    try:
        with atomic_files(Path(out_dir), "--out") as tmp:   # both files or none
            (tmp / "validation.json").write_text(json.dumps(report, indent=1) + "\n")
            fig.savefig(tmp / "validation.png", dpi=110)
    finally:
        plt.close(fig)
    return [Path(out_dir) / "validation.json", Path(out_dir) / "validation.png"]
