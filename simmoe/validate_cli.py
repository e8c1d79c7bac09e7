"""`simmoe validate`: projection vs a live run on a GPU."""
from __future__ import annotations

from pathlib import Path

import click

from .options import cpus_option, host_state_option


def register(main: click.Group) -> None:
    main.add_command(validate_cmd)


@click.command("validate")
@click.argument("scenario", type=click.Path(path_type=Path))
@click.option("--profile", "-p", help="Profile the simulation uses (name or path) [default: the scenario's].")
@click.option("--device", default="cuda", show_default=True, help="cuda, cuda:N, or cpu (decisions only: CPU timing is not a GPU's).")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for validation.json and validation.png [default: results/<scenario>-validation].")
@click.option("--batch-sizes", "-b", help="Override batch sizes, e.g. 1,4.")
@click.option("--repeats", type=click.IntRange(1, 50),
              help="Twin: live replays per row (within --row-budget), a step's latency its median over them "
                   "[default: 3]. --executor model: passes over all rows, interleaved (row 1..N, then again), "
                   "a row's latency the median of every pass's timed steps [default: 1].")
@click.option("--row-budget", type=click.FloatRange(0),
              help="Twin: seconds a row may spend on further replays [default: 15]. --executor model: a row "
                   "stops its steps once they took this long, after the warm-up and 3 timed steps (a pageable "
                   "layer-baseline step of OLMoE takes ~2 s on the H200) [default: every step].")
@click.option("--max-seconds", type=click.FloatRange(0),
              help="--executor model: start no row once this many seconds have passed since the command "
                   "began (the model's build included; a serving scenario: since its live rows began); the rows "
                   "left are listed (validation.json: rows_not_run) and the rows that ran reported; a SIGTERM "
                   "stops the rows the same way [default: no limit].")
@click.option("--skip-unfit", is_flag=True,
              help="--executor model: leave out the rows that would not fit the GPU's free memory and list "
                   "them (validation.json: rows_not_run) [default: one error before any row].")
@click.option("--host-now/--no-host-now", default=None,
              help="Also measure the host terms (issue costs, pageable copy, CPU path) beside each row, with "
                   "calibration's probes between the replays, and report the error with them  [default: on for cuda].")
@click.option("--host-window", type=click.FloatRange(0), default=15.0, show_default=True,
              help="With --host-now, a row paced by the host (pageable loads, CPU-miss) alternates replays and "
                   "probes for at least this many seconds (at most 20 replays), so both sides average over the "
                   "host's second-to-second swings.")
@click.option("--executor", type=click.Choice(["twin", "model"]), default="twin", show_default=True,
              help="twin: simmoe's twin executor (any model); model: the preset's real transformers model with its "
                   "experts offloaded (needs a preset with an architecture and transformers).")
@click.option("--tiny", is_flag=True, help="--executor model: the architecture at small dimensions (CPU tests).")
@click.option("--layers", type=click.IntRange(1, 1000), help="--executor model: keep the first N decoder layers.")
@click.option("--routing", type=click.Choice(["own", "trace"]), default="own", show_default=True,
              help="--executor model: the model's own router (recorded per batch size), or the scenario's trace forced.")
@click.option("--prompt", "prompts", help="--executor model: prompt tokens (the context), e.g. 256,4096 "
                                          "[default: the scenario's trace.prompt_tokens].")
@click.option("--resident/--no-resident", default=True, show_default=True,
              help="--executor model: add a first row with every expert resident (the engine alone).")
@click.option("--in-situ", "in_situ", is_flag=True,
              help="--executor model: first time the in situ terms on the model just built (whole decode steps, "
                   "the executor's pageable and pinned pools, how far the router read waits behind copies, its "
                   "CPU experts; as `calibrate engine --in-situ` does) and project the rows with them: one build, "
                   "one host state for the terms and the rows; the profile used is written beside the rows "
                   "(profile.json, in_situ.json). On the H200 about 3 min for OLMoE-1B-7B.")
@click.option("--live-timeline", "live_timeline", is_flag=True,
              help="--executor model: each row's step after its timed ones runs under torch.profiler (not among "
                   "the timed steps); its GPU work and the same step projected go to timelines/POLICY-bB-pP.json "
                   "(open in ui.perfetto.dev), and the copy engine's busy and idle time, live and projected, "
                   "to the row (live_timeline).")
@click.option("--rates", help="Serving scenarios (a workload: section): arrival rates (requests/s) to validate at, "
                               "e.g. 0.5,1,2 [default: workload.rates, else the scenario's rate].")
@click.option("--reproject", is_flag=True,
              help="SCENARIO is then the folder an --executor model run wrote (validation.json, routing.npz): "
                   "project its live rows again with this code and --profile, on the routing each row ran "
                   "(no GPU, no model); writes to --out [default: that folder's name + '-reprojected'].")
@cpus_option
@host_state_option
@click.option("--quiet", "-q", is_flag=True)
def validate_cmd(scenario, profile, device, out, batch_sizes, repeats, row_budget, max_seconds, skip_unfit, host_now,
                 host_window, cpus,
                 executor, tiny, layers, routing, prompts, resident, in_situ, live_timeline, rates, reproject, host_state,
                 quiet):
    """Run SCENARIO live on a GPU and simulated, and report how far apart they are.

    The live executor runs the same planner with the same policy objects as the simulator:
    real expert weights in pinned or pageable host memory, a GPU slot pool, a copy stream
    and a compute stream with events, real gated FFNs. Decisions (hits, misses, transfers,
    bytes) must be identical, step by step; the command fails otherwise. Latency: per
    (policy, batch size), live median step latency, simulated median, error %, and the
    median and worst |error| overall. Writes validation.json and validation.png.

    Host-bound terms drift on a shared host between calibration and validation; with
    --host-now (the default on cuda) each row is also simulated with the host terms measured
    beside it, so that the table separates the model's error ("err now") from the drift.

    --executor model runs the preset's real transformers model instead (random weights, its
    routed experts offloaded, the same planner and policies), per (policy, batch, --prompt),
    after a first row with every expert resident, and projects each row with the scenario's
    engine.style on the routing it ran (--repeats and the host-now options are the twin's).
    On --device cpu only the decisions are checked.

    A serving scenario (a workload: section) with --executor model serves its requests live
    (the same scheduler, planner and policies driving the real model) at each of --rates, and
    compares per-request TTFT, TPOT and end-to-end latency with the projection: replayed on
    the live run's own schedule, and projected end to end (docs/serving.md, "Validation").
    """

    from calibrate.validation.validate import validate, write_validation
    from simulator.names import results_dir
    from simulator.scenario import load_scenario

    from .cli import parse_int_list
    from .display import progress_bar

    from simulator.errors import InputError

    if reproject:
        return _reproject(scenario, profile=profile, out=out, quiet=quiet)
    if scenario.is_dir():
        raise InputError(str(scenario), "scenario", "is a folder: give a scenario YAML (or --reproject, for the "
                                                    "folder of an --executor model run)")
    bs = parse_int_list(batch_sizes, "--batch-sizes")
    sc, base = load_scenario(scenario, {"batch_sizes": bs} if bs else None)

    if sc.what_if is not None and sc.what_if.given():
        raise InputError(str(scenario), "what_if", "validate measures this machine as it is: a hardware what-if "
                                                   "has nothing live to compare with (remove it, or use simmoe run)")
    if sc.gpus is not None:
        raise InputError(str(scenario), "gpus", "validate runs on one GPU; the live run on several GPUs is not built "
                                                "yet (issue 17): remove gpus, or use simmoe run")
    if cpus:
        from calibrate.measurements.host_speed import apply_cpus
        apply_cpus(cpus)
    if sc.workload is not None:
        if executor != "model":
            raise InputError("command line", "--executor", "a serving scenario is validated on the real model: "
                                                           "give --executor model")
        from .serve_cli import parse_rates, validate_serving_cmd
        if skip_unfit:
            raise InputError("command line", "--skip-unfit", "not for a serving scenario (its memory is the "
                                                             "scheduler's: workload.scheduler.gpu_memory)")
        if in_situ or live_timeline:
            raise InputError("command line", "--in-situ" if in_situ else "--live-timeline",
                             "not yet for a serving scenario" + (": give the profile `calibrate engine --in-situ` "
                                                                 "wrote" if in_situ else ""))
        return validate_serving_cmd(sc, scenario, base, profile=profile, device=device, out=out, tiny=tiny,
                                    layers=layers, rates=parse_rates(rates), quiet=quiet, max_seconds=max_seconds)
    if rates:
        raise InputError("command line", "--rates", "only for a serving scenario (a workload: section)")
    if executor == "model":
        from calibrate.measurements import host_state as hs
        hs.enable_for(host_state, device)
        return _validate_model(sc, scenario, base, profile=profile, device=device, out=out, tiny=tiny, layers=layers,
                               routing=routing, prompts=parse_int_list(prompts, "--prompt"), resident=resident,
                               quiet=quiet, passes=repeats or 1, row_budget=row_budget, max_seconds=max_seconds,
                               skip_unfit=skip_unfit, in_situ=in_situ, live_timeline=live_timeline)
    repeats = repeats or 3
    if tiny or layers or prompts or routing != "own" or host_state or max_seconds is not None or skip_unfit \
            or in_situ or live_timeline:
        from simulator.errors import InputError
        flag = ("--tiny" if tiny else "--layers" if layers else "--prompt" if prompts
                else "--routing" if routing != "own" else "--host-state" if host_state
                else "--max-seconds" if max_seconds is not None else "--skip-unfit" if skip_unfit
                else "--in-situ" if in_situ else "--live-timeline")
        raise InputError("command line", flag, "only with --executor model")
    with progress_bar(quiet, "validating") as cb:
        report = validate(sc, profile=profile, device=device, base_dir=base, progress=cb, repeats=repeats,
                          row_budget_s=15.0 if row_budget is None else row_budget, host_now=host_now,
                          host_window_s=host_window)
    written = write_validation(report, out or results_dir(sc.name, "-validation"))
    if quiet:
        return
    if device == "cpu":
        print_decisions_only(sc, report, written)
        return
    print_twin_validation(sc, report, device, written)


def print_twin_validation(sc, report: dict, device: str, written) -> None:
    """The twin's report at 80 columns: per row live and projected median step ms, the error
    (and with --host-now the error with the host terms measured beside the row), the copy
    rate, the live replays and their spread; transfers and hits are in validation.json."""
    import textwrap

    say = lambda text: click.echo(textwrap.fill(text, 80, subsequent_indent="  "))  # noqa: E731
    now = report["host_now"]
    rows = report["rows"]
    w = max([6] + [len(r["policy"]) for r in rows])
    say(f"{sc.name} on {report['environment'].get('gpu', device)}: live vs {report['profile']}")
    click.echo(f"{'policy':{w}s} {'B':>3s} {'live ms':>9s} {'sim ms':>9s} {'error':>7s}" + (f" {'now':>7s}" if now else "")
               + f" {'GB/s':>5s} {'reps':>4s} {'sd':>6s}")
    for r in rows:
        sd = "-" if r["live_spread_pct"] is None else f"{r['live_spread_pct']:.1f}%"
        gbps = f"{r['copy_GBps']:5.1f}" if r["copy_GBps"] else f"{'-':>5s}"
        click.echo(f"{r['policy']:{w}s} {r['batch_size']:3d} {r['live_median_ms']:9.3f} {r['sim_median_ms']:9.3f} "
                   f"{r['error_pct']:+6.1f}%" + (f" {r['error_now_pct']:+6.1f}%" if now else "")
                   + f" {gbps} {r['repeats']:4d} {sd:>6s}")
    say("error: (projected - live) / live of the median step" + ("; now: with the host terms measured beside the row"
                                                                   if now else "")
        + "; GB/s: live copy rate; reps: live replays; sd: their spread")
    say(f"median |error| {report['median_abs_error_pct']:.2f}%, worst {report['worst_abs_error_pct']:.2f}%; "
        f"decisions identical: {report['decisions_identical']}")
    if now:
        say(f"with the host terms measured beside each row: median |error| {now['median_abs_error_pct']:.2f}%, "
            f"worst {now['worst_abs_error_pct']:.2f}%")
    drift = ", ".join(f"{k} {v:.2f}x" for k, v in report["host_drift"].items())
    same = report["environment"].get("same_host_as_profile")
    say(f"host time per call, live / profile (median over rows): {drift or '-'}; "
        f"same host as the profile: {'unknown' if same is None else same}")
    say(f"wrote {', '.join(str(p) for p in written)}")


def print_decisions_only(sc, report: dict, written) -> None:
    """``--device cpu``: the live run checks decisions; its timings are a CPU's, not a GPU's, so
    no latency or error is shown."""
    from rich.console import Console
    from rich.table import Table

    from simulator.units import fmt_bytes

    t = Table(title=f"{sc.name} on cpu: decisions of the live executor vs the simulator")
    for c in ("policy", "batch", "transfers", "hits", "copied"):
        t.add_column(c, justify="left" if c == "policy" else "right")
    for r in report["rows"]:
        t.add_row(r["policy"], str(r["batch_size"]), str(r["transfers"]), str(r["hits"]),
                  fmt_bytes(r['bytes_h2d']))
    Console().print(t)
    click.echo(f"decisions identical: {report['decisions_identical']} (--device cpu checks decisions only: "
               "CPU timings say nothing of a GPU's, so no latency error is reported)")
    click.echo(f"wrote {', '.join(str(p) for p in written)}")


def check_model_executor(device: str) -> None:
    """--executor model needs a cuda or cpu device, torch and transformers: one line otherwise."""
    from simulator.errors import InputError

    if device != "cpu" and not device.startswith("cuda"):
        raise InputError("command line", "--device", f"{device!r}: use cuda, cuda:N or cpu")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise InputError("command line", "--executor", f"model needs {e.name}: pip install 'simmoe[models]'") from None


def print_model_validation(sc, report: dict, device: str, written) -> None:
    """The --executor model report at 80 columns: per row the copies per step, live and
    projected median step ms, the error, and (when measured) the error with the host's speed
    probed beside each step (now), against the resident row beside (paired) and over the steps
    that ended in the host's fast state (fast); then the medians (validation.json has all)."""
    import textwrap

    from calibrate.validation.model_rows import MIN_FAST_STEPS

    timing = report["timing"]
    say = lambda text: click.echo(textwrap.fill(text, 80, subsequent_indent="  "))  # noqa: E731
    say(f"{sc.name}: {report['model']} ({report['moe_layers']} MoE layers) on "
        f"{report['environment']['gpu'] if timing else device}, style {report['style']}, "
        f"profile {report['profile']}, routing {report['routing']}")
    if report.get("reprojected_from"):
        say(f"re-projected: the live rows of {report['reprojected_from']} (profile then "
            f"{report['profile_then']}), projected with this code on the routing each row ran")
    if not timing:
        say("on the CPU only the decisions are checked: timing is not meaningful there (not a GPU's), so "
            "nothing is projected")
    rows = report["rows"]
    w = max([6] + [len(r["policy"]) for r in rows])
    prompts = len({r["prompt"] for r in rows}) > 1
    extra = [(k, name) for k, name, on in (
        ("error_now_pct", "now", timing and report.get("median_abs_error_now_pct") is not None),
        ("error_paired_pct", "paired", timing and report.get("paired_rows")),
        ("error_fast_pct", "fast", timing and report.get("fast_rows"))) if on]
    head = f"{'policy':{w}s} {'B':>3s}" + (f" {'prompt':>6s}" if prompts else "") + f" {'copies':>7s}"
    if timing:
        head += f" {'live ms':>8s} {'sim ms':>8s} {'error':>7s}" + "".join(f" {n:>7s}" for _, n in extra)
    click.echo(head + "  same")
    for r in rows:
        line = f"{r['policy']:{w}s} {r['batch_size']:3d}" + (f" {r['prompt']:6d}" if prompts else "")
        line += f" {r['copies_per_step']:7.1f}"
        if timing:
            line += f" {r['live_median_ms']:8.2f} {r['sim_median_ms']:8.2f} {r['error_pct']:+6.1f}%"
            for k, _ in extra:
                e = r.get(k)
                if k == "error_fast_pct" and r.get("live_fast_steps", 0) < MIN_FAST_STEPS:
                    e = None   # too few steps ended fast to say
                line += f" {e:+6.1f}%" if e is not None else f" {'-':>7s}"
        click.echo(line + f"  {'yes' if r['decisions_identical'] else 'NO'}")
    legend = "copies: per step; same: decisions identical to the simulator's"
    if not prompts:
        legend += f"; prompt (context) {rows[0]['prompt']} tokens" if rows else ""
    if timing:
        legend += "; error: (projected - live) / live of the median step"
        names = {"now": "the host terms scaled by the host's dispatch speed probed beside each step",
                 "paired": "the host factor that makes the resident row of the same batch, run just before, "
                           "meet its live median", "fast": f"over the steps that ended in the host's fast state (rows with {MIN_FAST_STEPS} or more)"}
        legend += "".join(f"; {n}: with {names[n]}" if n != "fast" else f"; fast: {names[n]}" for _, n in extra)
    say(legend)
    if timing:
        say(f"median |error| {report['median_abs_error_pct']:.2f}%, worst {report['worst_abs_error_pct']:.2f}% over "
            f"{len(rows)} rows; tokens/s median |error| {report['median_abs_tokens_error_pct']:.2f}%")
        for k, n in extra:
            key = {"now": "now", "paired": "paired", "fast": "fast"}[n]
            med, worst = report[f"median_abs_error_{key}_pct"], report[f"worst_abs_error_{key}_pct"]
            say(f"{n}: median |error| {med:.2f}%, worst {worst:.2f}%")
    if report.get("estimate_s") and report.get("live_s") and not report.get("reprojected_from"):
        from simulator.estimate import fmt_seconds
        say(f"the live rows took {fmt_seconds(report['live_s'])} (estimated {fmt_seconds(report['estimate_s'])})")
    for note in report.get("notes") or []:
        say(f"note: {note}")
    if report.get("rows_not_run"):
        say(not_run_line(report))
    say(f"decisions identical: {report['decisions_identical']}; wrote {', '.join(str(p) for p in written)}")


def not_run_line(report: dict) -> str:
    """The rows a report left out (``--max-seconds``, ``--skip-unfit``), in one line."""
    left = report["rows_not_run"]
    timed_out = any(not name.endswith(")") for name in left)   # the others carry their reason
    why = f"--max-seconds {report['max_seconds']:g}: " if timed_out and report.get("max_seconds") is not None else ""
    return f"{why}{len(left)} row(s) not run: " + ", ".join(left)


def _reproject(run_dir: Path, *, profile, out, quiet) -> None:
    """``--reproject``: a real-model run's live rows projected again (no GPU)."""
    from types import SimpleNamespace

    from calibrate.validation.model_rows import reproject, write_model_validation

    report = reproject(run_dir, profile)
    written = write_model_validation(report, out or run_dir.with_name(run_dir.name + "-reprojected"))
    if not quiet:
        print_model_validation(SimpleNamespace(name=report["scenario"]), report, report["device"], written)


def _say_err(text: str) -> None:
    """A line on stderr, folded at 80 columns (the live run's estimate)."""
    import textwrap
    click.echo(textwrap.fill(text, 80, subsequent_indent="  "), err=True)


def _validate_model(sc, path, base, *, profile, device, out, tiny, layers, routing, prompts, resident, quiet,
                    passes=1, row_budget=None, max_seconds=None, skip_unfit=False, in_situ=False,
                    live_timeline=False):
    """``--executor model``: the real model per (policy, batch, prompt), live vs projected."""
    from calibrate.validation.model_rows import validate_model, write_model_validation
    from simulator.errors import InputError
    from simulator.names import results_dir

    from .display import progress_bar

    check_model_executor(device)
    with progress_bar(quiet, "validating") as cb:
        report = validate_model(sc, profile=profile, device=device, tiny=tiny, layers=layers, routing=routing,
                                prompts=prompts, resident=resident, base_dir=base, source=str(path),
                                progress=cb, passes=passes, say=None if quiet else _say_err,
                                row_budget_s=row_budget, max_seconds=max_seconds, skip_unfit=skip_unfit,
                                in_situ=in_situ, live_timeline=live_timeline)
    written = write_model_validation(report, out or results_dir(sc.name, "-model-validation"))
    if not quiet:
        print_model_validation(sc, report, device, written)
    if not report["decisions_identical"]:
        bad = [f"{r['policy']} B={r['batch_size']}" for r in report["rows"] if not r["decisions_identical"]]
        raise click.ClickException(f"decisions differ from the simulator's in {', '.join(bad)}")
