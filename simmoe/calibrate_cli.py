"""``simmoe calibrate``: measure this machine into a hardware profile (code in ``calibrate/``)."""
from __future__ import annotations

import shlex
from pathlib import Path

import click

from .options import cpus_option
from rich.console import Console
from rich.table import Table

from simulator.errors import InputError


def register(main: click.Group) -> None:
    from .calibrate_engine_cli import engine_cmd, engine_merge_cmd
    from .calibrate_tiers_cli import tiers_cmd
    calibrate_cmd.add_command(engine_cmd)
    calibrate_cmd.add_command(engine_merge_cmd)
    calibrate_cmd.add_command(tiers_cmd)
    main.add_command(calibrate_cmd)


@click.group("calibrate", invoke_without_command=True)
@click.option("--device", "-d", default="cuda", show_default=True, help="cuda, cuda:N or cpu.")
@click.option("--model", "-m", "models", multiple=True,
              help="Model preset whose expert shape to time; repeat for several "
                   "[default: every preset; with --quick: published-study].")
@click.option("--trials", "-n", type=click.IntRange(3, 100_000),
              help="Timed trials per point [default: 100; with --quick: 10].")
@click.option("--quick", is_flag=True,
              help="Small run for tests and a first look: copies up to 64 MiB, 1-256 tokens, 10 trials "
                   "(49 s measured on a GPU; about 25 s of measuring, 36 s in all, on 2 CPU cores).")
@click.option("--out", "-o", type=click.Path(path_type=Path),
              help="Profile file to write [default: profiles/<gpu>.json in the current folder].")
@click.option("--name", help="Profile name [default: the GPU's, e.g. nvidia-h100-80gb-hbm3].")
@cpus_option
@click.pass_context
def calibrate_cmd(ctx, device, models, trials, quick, out, name, cpus):
    """Measure this machine and write a hardware profile for `simmoe run --profile`.

    \b
    What it measures (CUDA events, warm-ups first, rotating buffers, median kept):
      - host-to-device and device-to-host copies, 4 KiB to 1 GiB, from pinned and
        pageable memory; one copy stream vs two; n experts coalesced vs n copies
      - the expert FFN of each model preset, 1 to 4096 tokens, on the GPU and on
        the host CPU (for the cpu miss policy)
      - host overheads: launching a copy, an expert, dense work; synchronising;
        allocating an expert slot; the rate of the sleep kernel
      - the published study's table: computation vs memory transfer, with
        Welch's t-test and Cohen's d
    Fits: copy time = latency + bytes / bandwidth (95% CIs) plus a table where the
    line misses; compute is interpolated monotonically; every point's error is kept.

    \b
    How long: about 3 to 6 minutes on an H100 with the default 100 trials (the shipped
    h200 profile took 250 s with 50 trials; most of it pageable copies of 256 MiB to
    1 GiB and CPU expert timings); --quick took 49 s on a GPU, and on 2 CPU cores
    (--device cpu) 24 s of measuring (18 s of it the published-study table), 36 s with
    start-up.

    \b
    Where it goes: profiles/<gpu>.json (e.g. profiles/nvidia-h100-80gb-hbm3.json),
    or --out. The file appears only when every measurement is done; an interrupted
    run writes nothing. Without a GPU, use --device cpu (a CPU stand-in profile).

    \b
    `simmoe calibrate engine --model PRESET --out FILE.json` times the engine around the
    experts (attention, norms, router, LM head, expert dispatch) on the preset's real model.
    """
    if ctx.invoked_subcommand is not None:
        if cpus:
            raise InputError("command line", "--cpus", f"give it to the subcommand: simmoe calibrate "
                                                       f"{ctx.invoked_subcommand} --cpus {cpus}")
        return
    try:
        from calibrate.calibrate import make_plan, prepare, run
    except ImportError as e:
        if e.name != "torch":
            raise
        raise InputError("command line", "calibrate", "needs torch: pip install 'simmoe[gpu]'") from None

    from .display import progress_bar

    if cpus:   # CPU expert compute and pageable copies then run on the cores the validation pins
        from calibrate.measurements.host_speed import apply_cpus
        apply_cpus(cpus)
    plan = make_plan(device, list(models), trials, quick)
    argv = ["simmoe", "calibrate", "--device", device] + (["--cpus", cpus] if cpus else [])
    for m in models:
        argv += ["--model", m]
    argv += (["--trials", str(trials)] if trials else []) + (["--quick"] if quick else [])
    argv += (["--out", str(out)] if out else []) + (["--name", name] if name else [])
    job = prepare(plan, out, name)
    with progress_bar(False, "calibrating") as cb:
        outcome = run(job, shlex.join(argv), progress=cb)
    console = Console()
    if not console.is_terminal:  # files, CI logs: wide enough for the table
        console = Console(width=160)
    print_study_table(console, outcome.profile)
    print_fits(console, outcome.profile)
    minutes, seconds = divmod(outcome.elapsed_s, 60)
    console.print(f"wrote {outcome.path} (profile {outcome.profile['name']!r}) "
                  f"after {int(minutes)}m{seconds:04.1f}s of measuring")


def print_study_table(console: Console, profile: dict) -> None:
    """The published study's table, re-measured on this machine."""
    prov = profile["provenance"]
    where = prov["gpu"] if prov["device"].startswith("cuda") else "the host CPU (device cpu)"
    t = Table(title=f"Published-study configurations on {where}: 27.0 MiB fp32 expert, "
                    f"pageable copies, {prov['trials']} trials")
    for col in ("Configuration", "Computation", "Memory transfer", "Dominates", "Ratio", "Welch p", "Cohen's d"):
        t.add_column(col, justify="left" if col in ("Configuration", "Dominates") else "right")
    for r in profile["measurements"]["study_table"]:
        c, m = r["computation_ms"], r["transfer_ms"]
        p, d = r.get("p_value"), r.get("cohens_d")
        t.add_row(
            f"Batch {r['batch']}, {r['experts']} expert{'s' if r['experts'] > 1 else ''}",
            f"{c['mean']:.3f} ± {c['std']:.3f} ms", f"{m['mean']:.3f} ± {m['std']:.3f} ms", r["dominates"],
            f"{r['transfer_over_computation']:.2f}x", "-" if p is None else f"{p:.1e}",
            "-" if d is None else f"{d:.2f}",
        )
    console.print(t)


def print_fits(console: Console, profile: dict) -> None:
    """One line per copy curve and per compute table."""
    for direction in ("h2d", "d2h"):
        for kind, c in (profile["copy"].get(direction) or {}).items():
            ci = c.get("bandwidth_ci95_GBps")
            ci_txt = f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else ""
            console.print(f"copy {direction} {kind}: {c['latency_us']:.1f} us + bytes / {c['bandwidth_GBps']:.2f} GB/s"
                          f"{ci_txt}; {len(c['table'])} table point(s) where the line misses")
    for side, tables in profile["compute"].items():
        for key, pts in tables.items():
            console.print(f"expert {side} {key}: {pts[0][1]:.3f} ms at {pts[0][0]} token(s), "
                          f"{pts[-1][1]:.3f} ms at {pts[-1][0]}")
    stages = profile["measurements"]["stage_seconds"]
    console.print("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
