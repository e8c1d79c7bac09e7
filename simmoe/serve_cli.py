"""Serving commands: ``simmoe run`` of a scenario with a ``workload:`` section (dispatched
here) and ``simmoe serve-sweep`` (the highest arrival rate meeting the SLO). docs/serving.md."""
from __future__ import annotations

import json
from pathlib import Path

import click

from simulator.errors import InputError
from simulator.units import fmt_bytes


def run_serving(sc, base: Path, source: str, profile, out, fmt: str, quiet: bool, force: bool,
                timeline: bool = False) -> None:
    """Simulate a serving scenario; print its table; write its results folder (with
    ``timeline``, also timeline.json: :func:`simulator.timeline.serving_timeline_doc`)."""
    from simulator.names import results_dir
    from simulator.serving.estimate import check_serving
    from simulator.serving.output import write_serving_results
    from simulator.serving.runner import serve_scenario

    from .display import progress_bar

    est = check_serving(sc, source, force)
    with progress_bar(quiet, "serving", est) as cb:
        result = serve_scenario(sc, profile=profile, base_dir=base, progress=cb)
    from .serve_plots import plot_latency_cdf

    extra = {"latency_cdf.png": lambda p: plot_latency_cdf(result.requests, p)}
    if timeline:   # built before any result is written: all files or none
        from simulator.timeline import dump_timeline, serving_timeline_doc

        doc = serving_timeline_doc(sc, result.profile, base)
        extra["timeline.json"] = lambda p: dump_timeline(doc, p)
    written = write_serving_results(result, out or results_dir(sc.name), fmt, extra_files=extra)
    if not quiet:
        print_serving(result)
        click.echo(f"wrote {', '.join(str(p) for p in written)}")


def serving_table(rows: list[dict], title: str, narrow: bool = False):
    """One row per (policy, max batch). ``narrow`` (a terminal under 100 columns): the TTFT's
    CI and the tokens/s column are left out, so policy names stay whole at 80 columns."""
    from rich import box
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0, 0, 1), pad_edge=False)
    cols = ["policy", "B", "TTFT", "p90", "TPOT", "p90", "e2e90", "tok/s", "pr/s", "good", "SLO", "hit p/d"]
    if narrow:
        cols.remove("tok/s")
    for c in cols:
        t.add_column(c, justify="left" if c == "policy" else "right", no_wrap=True)
    for r in rows:
        hp, hd = r["hit_rate_prefill_steps"], r["hit_rate_decode_steps"]
        hits = f"{hp * 100:.0f}%/{hd * 100:.0f}%" if hp is not None and hd is not None else "-"
        ci = r["ttft_ms"]["mean_ci95"]
        ttft = f"{r['ttft_ms']['mean']:.0f}" + ("" if narrow else f"±{(ci[1] - ci[0]) / 2:.0f}")
        cells = [r["policy"], str(r["max_batch"]), ttft, f"{r['ttft_ms']['p90']:.0f}", f"{r['tpot_ms']['mean']:.1f}",
                 f"{r['tpot_ms']['p90']:.1f}", f"{r['e2e_ms']['p90']:.0f}", f"{r['tokens_per_s']:.0f}",
                 f"{r['prompt_tokens_per_s']:.0f}" if r["prompt_tokens_per_s"] is not None else "-",
                 f"{r['goodput_rps']:.2f}", f"{r['slo_attainment'] * 100:.0f}%", hits]
        if narrow:
            del cells[7]
        t.add_row(*cells)
    return t


LEGEND = ("TTFT: time to first token, ms (mean ± half its 95% CI; p90); TPOT: time per output token "
          "after the first, ms; e2e90: arrival to last token, ms, p90; tok/s: output tokens per second; "
          "pr/s: prompt tokens per second of the steps holding them; good: requests per second meeting "
          "the SLO; SLO: share meeting it; hit p/d: cache hit rate in steps with prefill tokens / "
          "decode-only steps")
NARROW = " (under 100 columns the TTFT's CI and tok/s are left out: summary.csv has them)"


def print_serving(result) -> None:
    from .display import _console

    sc = result.scenario
    w = sc.workload
    c = _console()
    a = w.arrivals
    arr = f"{a.kind} {a.rate:g}/s" if a.rate is not None else f"file {a.path}"
    narrow = c.width < 100
    c.print(serving_table(result.summary, f"{sc.name}: {w.requests} requests ({arr}) on {result.profile.name}; "
                                          f"{sc.replications} replication(s)", narrow))
    c.print(LEGEND + (NARROW if narrow else ""), style="dim", highlight=False)
    c.print(f"SLO: TTFT <= {w.slo.ttft_ms:g} ms and TPOT <= {w.slo.tpot_ms:g} ms for "
            f"{w.slo.attainment * 100:g}% of requests", highlight=False)
    for r in result.summary:
        mem = r["memory"]
        if mem["kv_tokens"] is not None:
            c.print(f"  {r['policy']} B={r['max_batch']}: {mem['expert_slots']:,} expert slots "
                    f"({fmt_bytes(mem['expert_slot_bytes'])}) + KV cache of {mem['kv_tokens']:,} tokens "
                    f"({fmt_bytes(mem['kv_bytes'])}); peak {r['peak_kv_tokens']:,} KV tokens, "
                    f"batch {r['peak_batch']}", highlight=False)
    for n in sorted({n for r in result.summary for n in r["notes"]}):
        c.print(f"note: {n}", style="dim", highlight=False)


def parse_rates(rates: str | None) -> list[float] | None:
    """``--rates 0.5,1,2`` as a list of requests/s (None when not given)."""
    if not rates:
        return None
    try:
        grid = [float(x) for x in rates.split(",") if x.strip()]
    except ValueError:
        raise InputError("command line", "--rates", f"{rates!r} is not a list of numbers") from None
    if not grid or any(not 0 < r <= 1e6 for r in grid):
        raise InputError("command line", "--rates", "needs rates in (0, 1e6] requests/s")
    return grid


def validate_serving_cmd(sc, path, base, *, profile, device, out, tiny, layers, rates, quiet,
                         max_seconds=None) -> None:
    """``simmoe validate`` of a serving scenario: live vs projected per-request latency."""
    from calibrate.validation.serving import validate_serving, write_serving_validation
    from simulator.names import results_dir

    from .display import progress_bar
    from .validate_cli import check_model_executor, not_run_line

    check_model_executor(device)
    with progress_bar(quiet, "validating") as cb:
        report = validate_serving(sc, rates=rates, profile=profile, device=device, tiny=tiny, layers=layers,
                                  base_dir=base, source=str(path), progress=cb, max_seconds=max_seconds)
    written = write_serving_validation(report, out or results_dir(sc.name, "-serving-validation"))
    if not quiet:
        print_serving_validation(report)
        if report.get("rows_not_run"):
            click.echo(not_run_line(report))
        click.echo(f"wrote {', '.join(str(p) for p in written)}")
    if not report["decisions_identical"]:
        bad = [r["mismatch"] for r in report["rows"] if r["mismatch"]]
        raise click.ClickException(f"decisions differ from the simulator's: {bad[0]}")


SERVING_COLS = (("ttft_ms", "mean", "TTFT"), ("tpot_ms", "mean", "TPOT"), ("tpot_ms", "p90", "TPOT90"),
                ("e2e_ms", "mean", "e2e"), ("e2e_ms", "p90", "e2e90"))


def print_serving_validation(report: dict) -> None:
    """Per (policy, max batch, rate): the live latencies (ms), and with timing the error of the
    projection made end to end and of the step latency replayed on the live schedule; fits 80
    columns (validation.json holds every value)."""
    timing = report["timing"]
    click.echo(f"{report['scenario']}: {report['model']} ({report['moe_layers']} MoE layers) on "
               f"{report['environment']['gpu'] if timing else report['device']}, style {report['style']}, "
               f"profile {report['profile']}")
    rows = report["rows"]
    w = max([6] + [len(r["policy"]) for r in rows])

    def key(r) -> str:
        rate = "-" if r["rate"] is None else format(r["rate"], "g")
        return f"{r['policy']:{w}s} {r['max_batch']:3d} {rate:>5s}"

    names = "".join(f" {n:>7s}" for _, _, n in SERVING_COLS)
    click.echo(f"live, ms (mean; p90 where named; same: decisions identical to the simulator's):\n"
               f"{'policy':{w}s} {'B':>3s} {'rate':>5s} {'steps':>5s}{names}  same")
    for r in rows:
        cells = "".join(f" {_ms(r['live'][c][q]):>7s}" for c, q, _ in SERVING_COLS)
        click.echo(f"{key(r)} {r['steps']:5d}{cells}  {'yes' if r['decisions_identical'] else 'NO'}")
    if not timing:
        click.echo("on the CPU only the decisions are checked: CPU step times are not a GPU's,\n"
                   "so nothing is projected")
        return
    click.echo(f"error, projected end to end vs live (step: median step latency replayed on\n"
               f"the live schedule):\n{'policy':{w}s} {'B':>3s} {'rate':>5s}{names} {'step':>7s}")
    for r in rows:
        cells = "".join(f" {_pct(r['latency'][c][q]):>7s}" for c, q, _ in SERVING_COLS)
        click.echo(f"{key(r)}{cells} {r['step_ms']['all']['error_pct']:+6.1f}%")
    for k, v in report["errors"].items():
        click.echo(f"  {k}: median |error| {v['median_abs_pct']:.2f}%, worst {v['worst_abs_pct']:.2f}%")
    factors = [r.get("host_factor") for r in rows]
    if any(f is not None for f in factors):   # replayed_now: the host terms scaled by these
        import textwrap
        click.echo(textwrap.fill("host factor now, by row (its steps' probes over the in situ steps'; "
                                 "*_replayed_now: the replay with it): "
                                 + " ".join("-" if f is None else f"{f:.2f}" for f in factors), 80))


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _pct(v: dict) -> str:
    return f"{v['error_pct']:+.1f}%" if v.get("live") else "-"


def register(main) -> None:
    @main.command("serve-sweep")
    @click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--rates", help="Arrival rates (requests/s), e.g. 0.5,1,2,4 [default: workload.rates].")
    @click.option("--bisect", type=click.IntRange(0, 30), default=4, show_default=True,
                  help="Bisection steps between the highest passing and the first failing grid rate.")
    @click.option("--profile", "-p", help="Built-in profile name or profile JSON path.")
    @click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
                  help="Results folder [default: results/<scenario name>-rates].")
    @click.option("--quiet", "-q", is_flag=True)
    @click.option("--force", is_flag=True, help="Run even when the estimate exceeds the limits.")
    def serve_sweep(scenario, rates, bisect, profile, out, quiet, force):
        """Find the highest arrival rate whose requests meet the SLO, per policy and max batch.

        Runs SCENARIO (with a workload: section) at every rate of a grid, then bisects between
        the highest passing rate and the first failing one (a rate passes when at least
        workload.slo.attainment of the requests meet TTFT and TPOT). Writes OUT/rates.json
        (every run's latency and throughput, the best rate per policy),
        OUT/throughput_latency.png and OUT/attainment.png.
        """
        from simulator.atomic import atomic_files
        from simulator.estimate import Estimate, check
        from simulator.names import results_dir
        from simulator.output import provenance
        from simulator.scenario import load_scenario
        from simulator.serving.estimate import estimate_serving
        from simulator.serving.sweep import search_rate

        from .display import progress_bar
        from .serve_plots import plot_attainment, plot_throughput_latency

        sc, base = load_scenario(scenario)
        if sc.workload is None:
            raise InputError(str(scenario), "workload", "serve-sweep needs a serving scenario (a workload: section)")
        grid = parse_rates(rates)
        n = len(grid or sc.workload.rates or [1]) + bisect
        one = estimate_serving(sc)
        est = Estimate(seconds=one.seconds * n, bytes=one.bytes, size=f"{n} rates x ({one.size})")
        check(est, str(scenario), lambda over: "workload.requests", force)
        with progress_bar(quiet, "rates", est) as cb:
            res = search_rate(sc, grid, bisect, profile=profile, base_dir=base, progress=cb)
        res["provenance"] = provenance()
        res["scenario"] = sc.name
        folder = out or results_dir(sc.name + "-rates")
        with atomic_files(folder, "--out") as tmp:
            (tmp / "rates.json").write_text(json.dumps(res, indent=1) + "\n")
            plot_throughput_latency(res["rows"], tmp / "throughput_latency.png")
            plot_attainment(res["rows"], sc.workload.slo.attainment, tmp / "attainment.png")
        if not quiet:
            slo = sc.workload.slo
            click.echo(f"highest rate meeting the SLO ({slo.attainment * 100:g}% within TTFT {slo.ttft_ms:g} ms, "
                       f"TPOT {slo.tpot_ms:g} ms):")
            for b in res["best"]:
                rate = "none of the grid" if b["max_rate"] is None else f"{b['max_rate']:.3g} req/s"
                click.echo(f"  {b['policy']} B={b['max_batch']}: {rate}")
                click.echo(f"    {b['method']}{'' if b['monotone'] else '; attainment not monotone over the grid'}")
            click.echo(f"wrote {folder}/rates.json, throughput_latency.png, attainment.png")
