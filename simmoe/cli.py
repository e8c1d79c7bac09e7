"""The ``simmoe`` command line.

Every command turns bad input into one line ``error: <file>: <field>: <message>`` on stderr and
exit status 2 (never a traceback). Commands of other parts of simmoe (calibration, real
traces, sweeps) live in their own modules and register here.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from simulator import __version__
from simulator.errors import InputError

EXIT_BAD_INPUT = 2


class SimmoeGroup(click.Group):
    """A click group that reports InputError, and a bad flag or argument of a command, on one
    line with exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        except click.UsageError as e:
            usage_error(e, ctx.command_path)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            ctx.exit(130)
        except MemoryError:
            click.echo("error: out of memory: the job needs more memory than this machine could give "
                       "(see the estimate printed at its start)", err=True)
            ctx.exit(EXIT_BAD_INPUT)

    def make_context(self, info_name, args, parent=None, **extra):
        try:                                  # the group's own flags, e.g. ``simmoe --bogus``
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            usage_error(e, info_name or self.name)


NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())   # a bare group: click shows its help


def usage_error(e: click.UsageError, where: str):
    """A bad flag or argument: one line on stderr, exit status 2."""
    if isinstance(e, NO_ARGS):
        raise e
    where = e.ctx.command_path if e.ctx else where
    click.echo(f"error: command line: {e.format_message()} (see '{where} --help')", err=True)
    sys.exit(EXIT_BAD_INPUT)


FORCE_HELP = ("Run even when the estimate says the job needs more memory than is available or more time "
              "than the limit (SIMMOE_MAX_SECONDS, default 3600; SIMMOE_MAX_MEMORY).")


WHAT_IF_HELP = ("Hardware what-if, repeatable: scale the profile's terms (added to the scenario's what_if:). "
                "Keys: pcie_GBps, pcie_scale, copy_latency_us, copy_latency_scale, gpu_compute_scale, "
                "cpu_compute_scale, host_scale; e.g. --what-if pcie_GBps=25 --what-if host_scale=0.5 "
                "(docs/scenarios.md, 'Hardware what-ifs').")


def parse_int_list(value: str | None, flag: str) -> list[int] | None:
    if value is None:
        return None
    try:
        out = [int(x) for x in value.replace(" ", "").split(",") if x]
    except ValueError:
        raise InputError("command line", flag, f"{value!r} is not a comma-separated list of integers") from None
    if not out or any(x <= 0 for x in out):
        raise InputError("command line", flag, "needs positive integers, e.g. 1,4,16")
    return out


@click.group(cls=SimmoeGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="simmoe")
def main():
    """Project MoE inference speed with experts offloaded to host memory.

    \b
    Typical use:
      simmoe run scenarios/locality_high.yaml          project policies x batch sizes
      simmoe trace gen --model mixtral-8x7b -b 16 -o t.npz
      simmoe profile list                              hardware profiles shipped
      simmoe models                                    model presets and expert sizes

    Runs need no GPU: durations come from a hardware profile (default: h100-pcie5).
    """


# --------------------------------------------------------------------------------- run
@main.command("run")
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--profile", "-p", help="Built-in profile name or profile JSON path (overrides the scenario's).")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Results folder [default: results/<scenario name>].")
@click.option("--seed", type=int, help="Override the scenario's seed.")
@click.option("--replications", "-r", type=click.IntRange(1, 1000), help="Override the number of replications.")
@click.option("--batch-sizes", "-b", help="Override batch sizes, e.g. 1,4,16.")
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv"]), default="parquet", show_default=True,
              help="Format of the per-step table.")
@click.option("--timeline", is_flag=True, help="Also write a Perfetto/Chrome trace (timeline.json) of the "
              "first replication of each policy at the smallest batch size.")
@click.option("--what-if", "what_if", multiple=True, metavar="KEY=VALUE", help=WHAT_IF_HELP)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no table.")
@click.option("--force", is_flag=True, help=FORCE_HELP)
def run_cmd(scenario, profile, out, seed, replications, batch_sizes, fmt, timeline, what_if, quiet, force):
    """Simulate SCENARIO (YAML) for every policy and batch size.

    Prints a table (step latency with 95% CI, throughput, speed-up over the baseline, demand
    and prefetch hits, dedup savings, bytes moved) and the decision: per batch size, the best
    policy, its speed-up over the baseline (the scenario's `baseline:`, default the fastest
    policy without a cache) and whether it beats the runner-up beyond the 95% CIs. Writes
    OUT/summary.json (with the decision and the run's provenance), OUT/summary.csv,
    OUT/steps.parquet (or .csv), the effective scenario and the profile used. Same scenario and
    seed give the same numbers, bit for bit.

    Before running, the memory and time the run needs are estimated from the scenario's sizes
    and printed; a run that would not fit in the available memory or exceed the time limit
    (SIMMOE_MAX_SECONDS, default 1 hour) is refused, naming the field (--force runs it anyway).
    """
    from simulator.names import results_dir
    from simulator.estimate import check_scenario
    from simulator.output import write_results
    from simulator.runner import run_scenario
    from simulator.scenario import load_scenario

    from .display import progress_bar, print_summary

    overrides = {}
    if seed is not None:
        overrides["seed"] = seed
    if replications is not None:
        overrides["replications"] = replications
    bs = parse_int_list(batch_sizes, "--batch-sizes")
    if bs:
        overrides["batch_sizes"] = bs
    if what_if:
        from simulator.what_if import parse_what_if_flags

        overrides["what_if"] = parse_what_if_flags(what_if)
    sc, base = load_scenario(scenario, overrides)
    if sc.workload is not None:     # a serving scenario (docs/serving.md)
        from .serve_cli import run_serving

        return run_serving(sc, base, str(scenario), profile, out, fmt, quiet, force, timeline)
    est = check_scenario(sc, str(scenario), force)
    with progress_bar(quiet, "simulating", est) as cb:
        result = run_scenario(sc, profile=profile, base_dir=base, progress=cb)
    out = out or results_dir(sc.name)
    extra_files = {}
    if timeline:   # built before any result is written: all files or none
        from simulator.timeline import dump_timeline, timeline_doc

        doc = timeline_doc(sc, result.profile, base)
        extra_files["timeline.json"] = lambda p: dump_timeline(doc, p)
    written = write_results(result, out, fmt, extra_files=extra_files)
    if not quiet:
        print_summary(result)
        click.echo(f"wrote {', '.join(str(p) for p in written)}")


# ------------------------------------------------------------------------------- trace
@main.group("trace", cls=SimmoeGroup)
def trace_group():
    """Routing traces: generate, inspect, import real ones."""


@trace_group.command("gen")
@click.option("--model", "-m", "model_name", default="published-study", show_default=True, help="Model preset.")
@click.option("--batch", "-b", type=click.IntRange(1), default=8, show_default=True, help="Sequences per step.")
@click.option("--steps", "-s", type=click.IntRange(1), default=64, show_default=True, help="Decode steps.")
@click.option("--generator", "-g", default="mixed", show_default=True,
              help="uniform, zipf, temporal, batch_locality, cross_layer, mixed or item_copy.")
@click.option("--zipf", type=click.FloatRange(0), default=0.0, help="Popularity skew exponent.")
@click.option("--temporal", type=click.FloatRange(0, 1), default=0.0, help="P(re-use previous step's expert).")
@click.option("--batch-locality", type=click.FloatRange(0, 1), default=0.0, help="P(draw from the batch's hot set).")
@click.option("--batch-pool", type=click.IntRange(1), default=None, help="Size of the batch's hot set [top_k].")
@click.option("--cross-layer", type=click.FloatRange(0, 1), default=0.0, help="P(follow the layer-to-layer map).")
@click.option("--locality", type=click.FloatRange(0, 1), default=0.0,
              help="item_copy: share of a later item's experts copied from earlier items (times U[0,1)).")
@click.option("--prefill-tokens", type=click.IntRange(0), default=0, help="Prompt tokens per sequence (a prefill step).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output .npz.")
@click.option("--quiet", "-q", is_flag=True, help="No estimate line and no progress bar.")
@click.option("--force", is_flag=True, help=FORCE_HELP)
def trace_gen(model_name, batch, steps, generator, zipf, temporal, batch_locality, batch_pool, cross_layer,
              locality, prefill_tokens, seed, out, quiet, force):
    """Write a seeded synthetic routing trace (.npz, see docs/traces.md)."""
    from pydantic import ValidationError

    from simulator.models import PRESETS
    from simulator.scenario import TraceSpec
    from simulator.traces import generate

    if model_name not in PRESETS:
        raise InputError("command line", "--model", f"unknown preset {model_name!r}; known: {', '.join(PRESETS)}")
    m = PRESETS[model_name]
    try:
        spec = TraceSpec(generator=generator, steps=steps, zipf=zipf, temporal=temporal,
                         batch_locality=batch_locality, batch_pool=batch_pool, cross_layer=cross_layer,
                         locality=locality, prefill_tokens=prefill_tokens)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        loc = [str(x) for x in err["loc"]]
        flag = "--" + loc[0].replace("_", "-") if loc and loc[0] in TraceSpec.model_fields else "--generator"
        raise InputError("command line", flag, msg) from None
    from simulator.estimate import check_call, estimate_generate

    from .display import timed_bar

    shape = dict(num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k, batch_size=batch,
                 steps=steps, prefill_tokens=prefill_tokens)
    est = check_call(estimate_generate, shape, GEN_SMALL, "--batch", force=force)
    with timed_bar(quiet, "generating", est):
        tr = generate(**shape, seed=seed, generator=generator, **spec.knobs)
    tr.meta["model"] = m.name
    try:
        tr.save(out)
    except OSError as e:
        raise InputError(str(out), "--out", f"cannot write: {e.strerror or e}") from None
    click.echo(f"wrote {out}: {tr.num_steps} steps, {tr.num_tokens} tokens, {tr.num_requests} routed requests")


#: per flag of ``trace gen``, the value that makes it small (to name the flag that makes a job big)
GEN_SMALL = {"--batch": {"batch_size": 1}, "--steps": {"steps": 1}, "--prefill-tokens": {"prefill_tokens": 0},
             "--model": {"num_layers": 1, "num_experts": 2, "top_k": 1}}


@trace_group.command("show")
@click.argument("trace", type=click.Path(dir_okay=False, path_type=Path))
def trace_show(trace):
    """Print the shape and metadata of a trace (from `trace gen`) or of a sequence set (from
    `trace import`)."""
    import json
    import zipfile

    import numpy as np

    from simulator.safe_load import check_input_file
    from simulator.traces import load_trace
    from simulator.traces.real import SEQUENCES_FORMAT, _npz_format, load_sequences

    if not zipfile.is_zipfile(check_input_file(trace, "trace")):
        raise InputError(str(trace), "trace", "not a simmoe .npz (a trace from `simmoe trace gen` or sequences "
                                              "from `simmoe trace import`); recorded routing in CSV, JSONL or "
                                              "Parquet is read by `simmoe trace import`")
    if _npz_format(trace) == SEQUENCES_FORMAT:
        ss = load_sequences(trace)
        n = ss.lengths
        click.echo(f"{trace}: sequence set (from `trace import`) of {ss.num_sequences} sequences, {ss.num_tokens} "
                   f"tokens (per sequence {int(n.min())} to {int(n.max())}, median {float(np.median(n)):g}; "
                   f"{int(ss.prompt_lengths.sum())} prompt tokens), {ss.num_layers} layers, top-{ss.top_k} of "
                   f"{ss.num_experts}. Scenarios read it under trace.sequences.path.")
        meta = ss.meta
    else:
        tr = load_trace(trace)
        click.echo(f"{trace}: trace of {tr.num_steps} steps ({int(tr.phase.sum())} prefill), {tr.num_tokens} tokens, "
                   f"{tr.num_layers} layers, top-{tr.top_k} of {tr.num_experts}")
        meta = tr.meta
    click.echo(json.dumps(meta, indent=1, sort_keys=True))


# ---------------------------------------------------------------------- profiles/models
@main.group("profile", cls=SimmoeGroup)
def profile_group():
    """Hardware profiles: the measured costs the simulator runs on."""


@profile_group.command("list")
def profile_list():
    """List the hardware profiles shipped inside simmoe.

    Each line: the name to pass to --profile (or `profile:` in a scenario), where its numbers
    come from (calibrated on a real GPU, a one-off probe, published measurements, or "from
    specs": the h200 calibration scaled to a GPU's public specifications, not measured), the GPU,
    and the expert shapes it has compute timings for. A scenario whose model has another
    expert shape needs a profile calibrated for it: simmoe calibrate --model PRESET.
    """
    from simulator.profile import DEFAULT_PROFILE, builtin_profiles, load_profile

    for name in builtin_profiles():
        p = load_profile(name)
        mark = " (default)" if name == DEFAULT_PROFILE else ""
        kind = p.provenance.get("kind")
        kind = f"{kind} (not measured)" if p.provenance.get("source") == "from specs" else kind
        click.echo(f"{name}{mark}: {kind}, {p.provenance.get('gpu', '?')}, "
                   f"shapes: {', '.join(sorted(p.compute.gpu))}")


@profile_group.command("show")
@click.argument("profile")
@click.option("--json", "as_json", is_flag=True, help="Print the whole profile as JSON (every measured point).")
def profile_show(profile, as_json):
    """Summarise PROFILE (a built-in name or a profile JSON path): where it comes from, copy
    bandwidth and latency, host overheads, and the expert shapes and engines it has timings for."""
    import json

    from simulator.profile import load_profile, profile_summary

    p = load_profile(profile, source="PROFILE")
    click.echo(json.dumps(p.to_json(), indent=1) if as_json else "\n".join(profile_summary(p)))


@main.command("models")
def models_cmd():
    """List the model presets a scenario can name under `model:`.

    Each line: MoE layers, routed experts per layer, top-k, the expert's shape and dtype,
    its size in bytes (a gated FFN has 3 matrices: gate, up, down) and the key of its shape in
    profile compute tables. Any field can be overridden in a scenario
    (model: {preset: mixtral-8x7b, num_layers: 8}) or a model written out in full.
    """
    from simulator.models import PRESETS
    from simulator.units import fmt_bytes

    for m in PRESETS.values():
        click.echo(f"{m.name:18s} {m.num_layers:3d} layers  {m.num_experts:4d} experts  top-{m.top_k}  "
                   f"{m.hidden}x{m.ffn} {m.dtype} {'gated' if m.gated else 'plain'}  "
                   f"{fmt_bytes(m.expert_bytes):>10s}/expert  key {m.shape_key}")


@main.command("schema")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Write it to this file [default: stdout].")
def schema_cmd(out):
    """Print the JSON Schema of a scenario file, for editors (docs/scenario.schema.json holds a
    copy; docs/scenarios.md says how to point an editor at it)."""
    from simulator.schema import schema_text

    if out is None:
        click.echo(schema_text(), nl=False)
        return
    from simulator.atomic import write_text

    write_text(out, schema_text())
    click.echo(f"wrote {out}")


# -------------------------------------------------------- commands from other modules
# Each module exposes register(main) and adds its commands; a module not yet present is
# skipped so the core CLI works on its own.
for _mod in ("simmoe.calibrate_cli", "simmoe.validate_cli", "simmoe.trace_cli", "simmoe.sweep_cli",
             "simmoe.serve_cli"):
    try:
        importlib.import_module(_mod).register(main)
    except ModuleNotFoundError as _e:
        if _e.name != _mod:
            raise


if __name__ == "__main__":
    sys.exit(main())
