"""``simmoe calibrate engine``: time the engine around the experts on a real model."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from .options import cpus_option, host_state_option
from rich.console import Console

from simulator.errors import InputError
from simulator.units import fmt_bytes


def _int_list(flag: str, values: tuple[str, ...]) -> list[int] | None:
    """``--batch 1,8 --batch 32`` -> [1, 8, 32]; positive, sorted, distinct."""
    if not values:
        return None
    out = []
    for v in values:
        for part in v.split(","):
            try:
                n = int(part)
            except ValueError:
                raise InputError("command line", flag, f"{part!r} is not a whole number") from None
            if n <= 0:
                raise InputError("command line", flag, f"{n} must be positive")
            out.append(n)
    if len(set(out)) != len(out):
        raise InputError("command line", flag, "values repeat")
    return sorted(out)


@click.command("engine")
@click.option("--model", "-m", "model", required=True,
              help="Model preset with an architecture: olmoe-1b-7b, qwen3-30b-a3b, deepseek-v2-lite, mixtral-8x7b.")
@click.option("--device", "-d", default="cuda", show_default=True, help="cuda, cuda:N or cpu.")
@click.option("--style", "styles", multiple=True, type=click.Choice(["hf-eager", "grouped", "offload", "offload-grouped", "graphs",
                                                              "offload-graphs"]),
              help="Expert dispatch style to time; repeat [default: hf-eager, grouped, offload and offload-grouped]. "
                   "graphs / offload-graphs also time the decode grids replayed from piecewise CUDA graphs.")
@click.option("--batch", "batches", multiple=True, help="Decode batch sizes, e.g. 1,8,32 [default: 1..256, powers of 2].")
@click.option("--context", "contexts", multiple=True, help="KV-cache lengths [default: 128..32768, powers of 2].")
@click.option("--prompt", "prompts", multiple=True, help="Prefill prompt lengths [default: 16,64,256,1024,4096].")
@click.option("--trials", "-n", type=click.IntRange(3, 10_000), help="Timed trials per point [default: 20; --quick: 3].")
@click.option("--max-seconds", type=click.FloatRange(1, 86_400),
              help="Time budget of the tables: the grid is trimmed, coarse to fine, to fit (--in-situ comes "
                   "after, and says how long it will take).")
@click.option("--layers", type=click.IntRange(1, 1000), help="Decoder layers to build [default: up to the first MoE layer].")
@click.option("--tiny", is_flag=True, help="The architecture at small dimensions (CPU tests).")
@click.option("--in-situ", "in_situ", is_flag=True,
              help="Also time whole decode steps of the full model (every layer; experts resident and left out), "
                   "its pageable copies and CPU experts as the executor meets them, and keep how they meet the "
                   "isolated tables (engine.<model>.in_situ). It builds the whole model: on the H200 97-104 s "
                   "for OLMoE and DeepSeek-V2-Lite, then 60-300 s of steps.")
@cpus_option
@host_state_option
@click.option("--quick", is_flag=True, help="A small grid and 3 trials (with --tiny: seconds on the CPU).")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="JSON file to write.")
def engine_cmd(model, device, styles, batches, contexts, prompts, trials, max_seconds, layers, tiny, in_situ, cpus,
               host_state, quick, out):
    """Time the engine around the experts on the real model of a preset (random weights).

    \b
    Per decoder layer: the non-expert work of decode (attention over a KV cache, norms,
    router and top-k, shared experts) over batch x context; prefill by prompt tokens;
    embedding + LM head per step; one layer's routed-expert call per engine style
    (hf-eager: transformers' per-expert loop; grouped: grouped_mm; offload: simmoe's
    real-model executor, every expert resident; graphs: grouped_mm between piecewise
    CUDA-graph replays of the non-expert part, whose decode grid is then timed too). CUDA events on the
    GPU, perf_counter on the CPU; the median of the trials with p10/p90 is kept.
    The file appears only when the run is done.
    """
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise InputError("command line", "calibrate engine", f"needs {e.name}: pip install 'simmoe[models]'") from None
    from calibrate.measurements.engine import QUICK, EnginePlan, measure_engine
    from calibrate.profile_writer import check_writable, write_atomic
    from simulator.models import PRESETS

    spec = PRESETS.get(model)
    if spec is None or spec.arch is None:
        known = ", ".join(n for n, m in PRESETS.items() if m.arch is not None)
        raise InputError("command line", "--model", f"{model!r} has no architecture to build; known: {known}")
    _check_device(device)
    kw = dict(QUICK) if quick else {}
    for key, flag, vals in (("batches", "--batch", batches), ("contexts", "--context", contexts),
                            ("prompts", "--prompt", prompts)):
        got = _int_list(flag, vals)
        if got is not None:
            kw[key] = got
    if trials:
        kw["trials"] = trials
    if styles:
        kw["styles"] = list(dict.fromkeys(styles))
    if layers is not None:
        from calibrate.models.build import keep_layers, tiny_spec
        try:
            keep_layers(tiny_spec(spec) if tiny else spec, layers)
        except ValueError as e:
            raise InputError("command line", "--layers", str(e)) from None
    if cpus:
        from calibrate.measurements.host_speed import apply_cpus
        apply_cpus(cpus)
    check_writable(out)
    from calibrate.measurements import host_state as hs
    gate = hs.enable_for(host_state, device)
    plan = EnginePlan(model, device=device, max_seconds=max_seconds, layers=layers, tiny=tiny, in_situ=in_situ, **kw)
    console = Console(stderr=True)
    doc = measure_engine(plan, progress=lambda t: console.print(f"measuring {t}"))
    doc["host_state"] = gate.summary() if gate is not None else None
    doc["command"] = shlex.join(["simmoe", *sys.argv[1:]]) if "engine" in sys.argv else "simmoe calibrate engine"
    write_atomic(doc, out)
    print_engine_summary(Console(), doc, out)


def _check_device(device: str) -> None:
    import torch
    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise InputError("command line", "--device", f"{device!r}: use cuda, cuda:N or cpu")
    if not torch.cuda.is_available():
        raise InputError("command line", "--device", "no CUDA GPU here; use --device cpu (with --tiny)")


def print_engine_summary(console: Console, doc: dict, out: Path) -> None:
    t = doc["tables"]
    for key, what in (("decode", "decode"), ("decode_graphs", "decode from CUDA graphs")):
        vals = [p["ms"] for row in t[key]["points"] for p in row if p] if key in t else []
        if vals:
            console.print(f"{what}, non-expert per layer: {min(vals):.3f}-{max(vals):.3f} ms over "
                          f"{len(vals)} (batch, context) points")
    for style, e in t["experts"].items():
        pts = e["points"]
        if pts:
            console.print(f"experts {style}: {pts[0]['ms']:.3f} ms at batch {pts[0]['batch']} ({pts[0]['active']} active), "
                          f"{pts[-1]['ms']:.3f} ms at batch {pts[-1]['batch']} ({pts[-1]['active']} active)")
            if "gpu_ms" in pts[0] and "gpu_ms" in pts[-1]:
                console.print(f"  its GPU work alone (host ahead): {pts[0]['gpu_ms']:.3f} / {pts[-1]['gpu_ms']:.3f} ms")
    situ = t.get("in_situ")
    for p in (situ or {}).get("points", []):
        styles = "".join(f", {s} {ms:.1f}" for s, ms in (p.get("styles") or {}).items())
        console.print(f"in situ B={p['batch']} context {p['context']}: step without experts {p['null_ms']:.1f} ms, "
                      f"resident {p['resident_ms']:.1f}{styles} ms")
    for kind in ("pageable", "pinned"):
        pc = (situ or {}).get(f"{kind}_copy")
        if pc:
            console.print(f"in situ {kind} copies: {pc['ms']:.3f} ms per expert of {fmt_bytes(pc['bytes'])} "
                          f"({pc['gbps']:.1f} GB/s, {pc['n']} layers timed)")
    rw = (situ or {}).get("route_wait")
    if rw:
        console.print(f"in situ router read behind a layer's queued copies ({rw['copies_ms']:.1f} ms): "
                      f"waits {rw['fraction']:.2f} of their time (mean of {len(rw['fractions'])})")
    cp = (situ or {}).get("cpu_path")
    if cp and cp.get("tokens"):
        console.print(f"in situ CPU experts ({cp['threads']} threads): {cp['ms'][0]:.3f} ms at {cp['tokens'][0]} "
                      f"token(s), {cp['ms'][-1]:.3f} ms at {cp['tokens'][-1]}")
    if t["head"]["points"]:
        h = t["head"]["points"]
        console.print(f"embed + LM head per step: {h[0]['ms']:.3f} ms at batch {h[0]['batch']}, "
                      f"{h[-1]['ms']:.3f} ms at batch {h[-1]['batch']}")
    console.print(f"{len(doc['skipped'])} point(s) skipped; wrote {out} after {doc['elapsed_s']:.1f}s")


@click.command("engine-merge")
@click.argument("engine_files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--profile", "-p", "profile", required=True, type=click.Path(path_type=Path),
              help="Profile JSON to add the engine tables to.")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Profile to write [default: --profile, in place].")
def engine_merge_cmd(engine_files, profile, out):
    """Merge `simmoe calibrate engine` results into a profile's `engine` section.

    Holes in a decode grid (skipped points) are extrapolated along context and listed in
    `filled`; the grid is made non-decreasing; each point's table error is kept.
    """
    from calibrate.measurements.engine_profile import merge_engine

    out = out or profile
    prof = merge_engine(profile, list(engine_files), out)
    Console().print(f"wrote {out}: engine tables for {', '.join(sorted(prof['engine']))}")
