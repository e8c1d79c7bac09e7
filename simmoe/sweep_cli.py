"""The ``simmoe sweep`` and ``simmoe report`` commands (registered by :mod:`simmoe.cli`)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import click


@click.command("sweep")
@click.argument("sweep_file", metavar="SWEEP.yaml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: a process pool on this machine. ray: a Ray cluster (pip install 'simmoe[ray]').")
@click.option("--workers", "-j", type=click.IntRange(1), default=os.cpu_count() or 1, show_default=True,
              help="Local processes (1 runs in this process); with --backend ray and no --address, the CPUs "
                   "of the local Ray instance started for the sweep. Capped by the points to run and the cores.")
@click.option("--address", help="Ray cluster address (host:port, ray://head:10001 or auto); the cluster's CPUs are "
              "used. Without it, a local Ray with token authentication and no dashboard is started.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Results folder [default: results/<sweep name>].")
@click.option("--retry-failed", is_flag=True, help="Run again the points that failed in an earlier run.")
@click.option("--what-if", "what_if", multiple=True, metavar="KEY=VALUE",
              help="Hardware what-if for every point, repeatable (as on `simmoe run`: the sweep's "
                   "set: what_if.KEY), e.g. --what-if pcie_GBps=25.")
@click.option("--quiet", "-q", is_flag=True, help="No estimate line and no progress bar.")
@click.option("--force", is_flag=True, help="Run even when the estimate says the sweep needs more memory than is "
              "available or more time than the limit (SIMMOE_MAX_SECONDS, default 3600; SIMMOE_MAX_MEMORY).")
def sweep_cmd(sweep_file, backend, workers, address, out, retry_failed, what_if, quiet, force):
    """Run every point of SWEEP.yaml: a base scenario with a grid of overrides.

    \b
    SWEEP.yaml:
      name: batch_curve
      base: locality_high.yaml         # scenario file (relative to SWEEP.yaml) or inline mapping
      set: {replications: 2}           # overrides for every point (optional)
      grid:                            # product of the axes
        batch_sizes: [1, 2, 4, 8]      # an integer means [integer]
        trace.batch_locality: [0.1, 0.8]
      zip:                             # axes moving together (optional)
        - policies[dedup-lru].cache.capacity: [16, 64]
          policies[3].cache.capacity: [16, 64]
    Axes are dotted scenario fields; [i] indexes a list, [name] picks a policy by name.
    Every point is checked before anything runs.

    \b
    Output (OUT, default results/<name>):
      OUT/parts/part-*.parquet  finished points, appended as they finish
      OUT/results.parquet       all rows in point order, written at the end
      OUT/sweep.json            the expanded points and their ids

    Resume: run the same command again. Finished points (read from OUT/parts) are skipped,
    the rest run; a kill at any moment (even kill -9) loses only the points in flight.
    A point that raises is recorded with its error and the sweep goes on. Results are the
    same, bit for bit, for any backend and worker count. Then: simmoe report OUT.

    Before anything runs, the sweep's time and memory are estimated from a sample of its
    points (the number of points is counted, not expanded) and printed; a sweep beyond the
    available memory or the time limit is refused, naming the axis or field (--force).
    """
    from simulator.names import results_dir
    from simulator.estimate import check, estimate_sweep
    from simulator.sweep import _read_yaml, expand, sweep

    from .display import announce, progress_bar

    doc = _read_yaml(sweep_file, "sweep")
    if what_if:
        doc = with_what_if(doc, what_if)
    folder = sweep_file.resolve().parent
    est, blame = estimate_sweep(doc, str(sweep_file), folder, workers)
    check(est, str(sweep_file), blame, force)
    console = announce(quiet, "sweep", est)
    with console.status(f"expanding and checking the points of {sweep_file}") if not quiet else _nothing():
        sw = expand(doc, str(sweep_file), folder)
    out = out or results_dir(sw.name)
    try:
        with progress_bar(quiet, "sweep", est, announced=True) as cb:
            df = sweep(sw, backend=backend, workers=workers, address=address, out=out,
                       retry_failed=retry_failed, notice=lambda m: click.echo(m, err=True),
                       progress=(lambda done, total, failed: cb(done, total, f"{failed} failed")) if cb else None)
    except KeyboardInterrupt:
        click.echo(f"interrupted: finished points are kept in {out / 'parts'}; run the same command to finish",
                   err=True)
        raise SystemExit(130) from None
    st = df.attrs["sweep"]
    click.echo(f"{st['points']} points: {st['ran']} run, {st['skipped']} already done, {st['failed']} failed; "
               f"{st['wall_s']:.1f} s on {backend}")
    errors = df[df["status"] == "error"]
    for _, r in errors.head(5).iterrows():
        click.echo(f"  point {r['point']}: {r['error']}", err=True)
    if len(errors) > 5:
        click.echo(f"  ... {len(errors) - 5} more failed points in {out / 'results.parquet'}", err=True)
    if not quiet:
        from simulator.decision import sweep_decision_lines

        for line in sweep_decision_lines(df.attrs["decision"], where=str(out / "decision.csv")):
            click.echo(line)
    click.echo(f"wrote {out / 'results.parquet'}, {out / 'decision.json'}, {out / 'decision.csv'}; "
               f"next: simmoe report {out}")


@click.command("report")
@click.argument("folder", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write the report [default: DIR].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def report_cmd(folder, out, quiet):
    """Write a report of a run or sweep folder: DIR/report.md, DIR/report.html, DIR/plots/.

    \b
    DIR is the folder of `simmoe run` (summary.json, scenario.yaml, profile.json, steps.parquet)
    or of `simmoe sweep` (sweep.json, results.parquet or parts/). The report regenerates the
    published study's tables from the simulation:
      - computation vs memory transfer of the per-item baseline by batch size and experts
        per token, with the dominant side and their ratio (and the published figures when
        the profile carries them);
      - deduplication savings by batch size 1 to 64: memory and bandwidth savings, maximum
        reuse factor, the uniform-routing expectation;
      - the policy comparison, with speed-up over the per-item baseline.
    What the folder cannot give (e.g. study configurations not simulated) is listed.
    The decision comes first: per batch size (for a sweep, per point and batch size), the
    policy to use, its speed-up over the baseline and whether it beats the runner-up beyond
    the 95% CIs. Plots (PNG and SVG): latency vs batch size with CI bands (vs cache capacity
    when capacity is swept), dedup savings vs batch size, hit rate vs capacity (or vs batch
    size), busy time of the compute and copy streams (overlaid, not added), bytes moved per
    token; many series are split into panels. The HTML file embeds them and stands alone.
    """
    from .display import progress_bar
    from .report import write_report

    with progress_bar(quiet, "report (plots)") as cb:
        written = write_report(folder, out, cb)
    click.echo(f"wrote {written[0]} and {written[1]} ({len(written) - 2} plot files in {written[2].parent})"
               if len(written) > 2 else f"wrote {written[0]} and {written[1]}")


def with_what_if(doc, flags: tuple[str, ...]):
    """The sweep document with ``set: {what_if.KEY: VALUE}`` for each ``--what-if`` (and the
    knob's exclusive partner cleared, as on ``simmoe run``)."""
    from simulator.errors import InputError
    from simulator.what_if import PARTNER, parse_what_if_flags

    knobs = parse_what_if_flags(flags)
    if not isinstance(doc, dict):
        return doc                       # expand() reports it
    fixed = doc.get("set") or {}
    if not isinstance(fixed, dict):
        raise InputError("command line", "--what-if", "the sweep's set: is not a mapping")
    fixed = dict(fixed)
    for k, v in knobs.items():
        fixed[f"what_if.{k}"] = v
        if k in PARTNER:
            fixed[f"what_if.{PARTNER[k]}"] = None
    return {**doc, "set": fixed}


@contextlib.contextmanager
def _nothing():
    yield


def register(main: click.Group) -> None:
    """Add ``sweep`` and ``report`` to the ``simmoe`` command group."""
    main.add_command(sweep_cmd)
    main.add_command(report_cmd)
