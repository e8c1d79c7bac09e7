"""``simmoe trace import | stats | fit | predictors | record``: real routing traces.

Registered into the ``trace`` group of :mod:`simmoe.cli`. TRACE arguments accept an imported
``.npz`` (``trace import``), a batched simmoe trace, or a source folder/file read directly
(``--format``). See docs/traces.md.
"""
from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from simulator.atomic import write_text
from simulator.errors import InputError
from simulator.trace_formats import FORMATS

#: tables print at full width into files and logs too
console = Console() if Console().is_terminal else Console(width=160)

_FORMAT = click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True,
                       help="Source layout (auto: from the extension and the CSV header).")


_QUIET = click.option("--quiet", "-q", is_flag=True, help="No estimate line and no progress bar.")
_FORCE = click.option("--force", is_flag=True, help="Run even when the estimate says the job needs more memory than "
                      "is available or more time than the limit (SIMMOE_MAX_SECONDS, default 3600; SIMMOE_MAX_MEMORY).")


def _corpus(ss) -> dict:
    """A routing corpus's sizes, as the estimates of stats and fit take them."""
    return dict(tokens=ss.num_tokens, sequences=ss.num_sequences, num_layers=ss.num_layers,
                num_experts=ss.num_experts, top_k=ss.top_k)


def _int_list(value: str, flag: str) -> list[int]:
    from .cli import parse_int_list

    return parse_int_list(value, flag)


def _write_json(doc: dict, path: Path) -> None:
    write_text(path, json.dumps(doc, indent=1, sort_keys=True), "--json")


def _pct(x: float) -> str:
    return f"{x:.1%}"


# ---------------------------------------------------------------------------------- import
@click.command("import")
@click.argument("src", type=click.Path(path_type=Path))
@_FORMAT
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output .npz (a simmoe sequences file).")
@click.option("--num-experts", type=click.IntRange(1), default=None,
              help="Experts per layer [default: largest id seen + 1]; ids beyond it are errors.")
@_QUIET
@_FORCE
def trace_import(src, fmt, out, num_experts, quiet, force):
    """Convert recorded routing SRC (folder or file) into a simmoe sequences file, streaming
    (memory holds one sequence at a time)."""
    from simulator.estimate import check, estimate_import
    from simulator.traces.real import import_sequences

    from .display import timed_bar

    est = estimate_import(src)
    check(est, str(src), lambda over: "source", force)
    try:
        with timed_bar(quiet, "importing", est):
            ss = import_sequences(src, out, fmt, num_experts)
    except OSError as e:
        raise InputError(str(out), "--out", f"cannot write: {e.strerror or e}") from None
    lengths = ss.lengths
    click.echo(f"wrote {out}: {ss.num_sequences} sequences, {ss.num_tokens} tokens "
               f"(length {int(lengths.min())}-{int(lengths.max())}), {ss.num_layers} layers, "
               f"top-{ss.top_k} of {ss.num_experts} experts")


# ----------------------------------------------------------------------------------- stats
@click.command("stats")
@click.argument("trace", type=click.Path(path_type=Path))
@_FORMAT
@click.option("--batch-sizes", "-b", default="1,2,4,8,16,32,64", show_default=True,
              help="Batch sizes for the dedup table.")
@click.option("--lru-batch", type=click.IntRange(1), default=1, show_default=True,
              help="Batch size of the request stream replayed through LRU.")
@click.option("--per-layer", is_flag=True, help="Also print per-layer skew, re-use and cross-layer tables.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write all statistics as JSON.")
@click.option("--plots", type=click.Path(file_okay=False, path_type=Path), help="Write PNG plots into this folder.")
@_QUIET
@_FORCE
def trace_stats_cmd(trace, fmt, batch_sizes, lru_batch, per_layer, json_out, plots, quiet, force):
    """Routing statistics of TRACE: popularity skew, temporal re-use, re-use distance,
    cross-layer predictability, batch dedup vs the uniform formula, LRU hit rate by capacity."""
    from simulator.estimate import check_call, estimate_stats
    from simulator.traces.real import open_sequences
    from simulator.traces.stats import trace_stats, write_stats_plots

    from .display import timed_bar

    bs = _int_list(batch_sizes, "--batch-sizes")
    ss = open_sequences(trace, fmt)
    est = check_call(estimate_stats, {**_corpus(ss), "batch_sizes": bs, "lru_batch": lru_batch},
                     {"--batch-sizes": {"batch_sizes": [1]}, "--lru-batch": {"lru_batch": 1}}, "TRACE", force=force)
    with timed_bar(quiet, "statistics", est):
        st = trace_stats(ss, batch_sizes=bs, lru_batch=lru_batch)
    st["source"] = str(trace)
    print_stats(st, per_layer)
    for w in st["warnings"]:
        console.print(f"[yellow]warning: {w}[/]", highlight=False)
    written = []
    if json_out:
        _write_json(st, json_out)
        written.append(json_out)
    if plots:
        written += write_stats_plots(st, plots)
    if written:
        click.echo(f"wrote {', '.join(str(p) for p in written)}")


def print_stats(st: dict, per_layer: bool = False) -> None:
    """The statistics as rich tables."""
    E, k = st["num_experts"], st["top_k"]
    console.print(f"[bold]{st['source']}[/]: {st['sequences']} sequences, {st['tokens']} tokens, "
                  f"{st['layers']} layers, top-{k} of {E} experts")
    sk, tp, xl = st["skew"], st["temporal"], st["cross_layer"]
    t = Table(title="routing locality (mean over layers)")
    for col in ("statistic", "measured", "min layer", "max layer", "uniform routing"):
        t.add_column(col, justify="left" if col == "statistic" else "right")
    for key, label in (("top1_share", "top-1 expert share"), ("top8_share", "top-8 experts share"),
                       ("entropy_norm", "entropy / log2 E")):
        vals = [r[key] for r in sk["per_layer"]]
        t.add_row(label, f"{sk['mean'][key]:.3f}", f"{min(vals):.3f}", f"{max(vals):.3f}", f"{sk['uniform'][key]:.3f}")
    reuse = [r["reuse"] for r in tp["per_layer"]]
    t.add_row("re-use, consecutive tokens", f"{tp['mean']:.3f}", f"{min(reuse):.3f}", f"{max(reuse):.3f}",
              f"{tp['uniform']:.3f}")
    prec = [r["precision"] for r in xl["per_layer"]] or [0.0]
    t.add_row("cross-layer precision (affinity)", f"{xl['precision']:.3f}", f"{min(prec):.3f}", f"{max(prec):.3f}",
              f"{xl['uniform']:.3f}")
    t.add_row("cross-layer precision (popularity)", f"{xl['popularity_precision']:.3f}", "", "", f"{xl['uniform']:.3f}")
    console.print(t)
    if xl.get("in_sample"):
        console.print("[yellow]cross-layer: fewer than 5 sequences, measured in sample (optimistic)[/]")

    rd = st["reuse_distance"]
    t = Table(title="re-use distance: tokens since the sequence last used (layer, expert)")
    for b in rd["bins"]:
        t.add_column(b, justify="right")
    t.add_row(*[_pct(f) for f in rd["fraction"]])
    console.print(t)

    t = Table(title="distinct experts per layer-step (batch dedup)")
    for col in ("batch", "measured", "uniform formula", "independent (measured skew)", "dedup saves",
                "uniform formula saves"):
        t.add_column(col, justify="right")
    for r in st["batch_dedup"]:
        t.add_row(str(r["batch_size"]), f"{r['unique']:.2f}", f"{r['uniform_formula']:.2f}",
                  f"{r['independent_formula']:.2f}", _pct(r["dedup_savings"]), _pct(r["uniform_savings"]))
    console.print(t)

    lru = st["lru"]
    t = Table(title=f"LRU hit rate by capacity (batch {lru['batch_size']}, {lru['requests']} deduplicated requests)")
    for col in ("capacity (experts)", "share of all experts", "hit rate"):
        t.add_column(col, justify="right")
    for r in lru["table"]:
        t.add_row(str(r["capacity"]), _pct(r["fraction"]), _pct(r["hit_rate"]))
    console.print(t)

    if per_layer:
        t = Table(title="per layer")
        for col in ("layer", "top-1", "top-8", "entropy", "re-use", "-> next layer precision"):
            t.add_column(col, justify="right")
        xl_of = {r["layer"]: r["precision"] for r in xl["per_layer"]}
        for s, r in zip(sk["per_layer"], tp["per_layer"]):
            nxt = xl_of.get(s["layer"])
            t.add_row(str(s["layer"]), f"{s['top1_share']:.3f}", f"{s['top8_share']:.3f}", f"{s['entropy_norm']:.3f}",
                      f"{r['reuse']:.3f}", "-" if nxt is None else f"{nxt:.3f}")
        console.print(t)


# ------------------------------------------------------------------------------------- fit
@click.command("fit")
@click.argument("trace", type=click.Path(path_type=Path))
@_FORMAT
@click.option("--batch", "-b", type=click.IntRange(1), default=16, show_default=True,
              help="Batch size the dedup statistic is matched at (and the synthetic traces' batch).")
@click.option("--steps", type=click.IntRange(8), default=128, show_default=True, help="Steps of each synthetic trace.")
@click.option("--seeds", type=click.IntRange(1, 8), default=2, show_default=True,
              help="Synthetic traces averaged per evaluation.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the fitted scenario 'trace:' section (YAML).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the fit as JSON.")
@_QUIET
@_FORCE
def trace_fit(trace, fmt, batch, steps, seeds, seed, out, json_out, quiet, force):
    """Fit the 'mixed' synthetic generator to TRACE's statistics; print real vs fitted."""
    import yaml

    from simulator.estimate import check_call, estimate_fit
    from simulator.traces.fit import fit_generator
    from simulator.traces.real import open_sequences

    from .display import timed_bar

    ss = open_sequences(trace, fmt)
    est = check_call(estimate_fit, {**_corpus(ss), "batch_size": batch, "steps": steps, "seeds": seeds},
                     {"--batch": {"batch_size": 1}, "--steps": {"steps": 8}, "--seeds": {"seeds": 1}}, "--batch",
                     force=force)
    with timed_bar(quiet, "fitting (a few dozen synthetic traces)", est):
        res = fit_generator(ss, batch_size=batch, steps=steps, seeds=seeds, seed=seed)
    t = Table(title=f"{trace}: real vs fitted generator (fitted checked on a fresh seed)")
    for col in ("statistic", "real", "fitted", "difference", "tolerance", "ok"):
        t.add_column(col, justify="left" if col == "statistic" else "right")
    labels = {"entropy_norm": "entropy / log2 E", "top1_share": "top-1 expert share", "top8_share": "top-8 share",
              "reuse": "re-use, consecutive tokens", "reuse_lift": "  re-use beyond skew",
              "cross_layer": "cross-layer precision", "cross_layer_lift": "  beyond popularity",
              "unique_ratio": f"distinct experts at B={batch} / uniform", "batch_lift": "  / independent formula"}
    within = res.within
    for key, label in labels.items():
        tol = res.tolerances.get(key)
        ok = "" if tol is None else ("yes" if within[key] else "[red]no[/]")
        t.add_row(label, f"{res.target[key]:.4f}", f"{res.fitted[key]:.4f}", f"{res.fitted[key] - res.target[key]:+.4f}",
                  "" if tol is None else f"{tol:.3f}", ok)
    console.print(t)
    spec = res.trace_spec()
    console.print("scenario trace section:\n" + yaml.safe_dump({"trace": spec}, sort_keys=False))
    written = []
    if out:
        write_text(out, f"# fitted to {trace} by simmoe trace fit (batch {batch}, seed {seed})\n"
                   + yaml.safe_dump({"trace": spec}, sort_keys=False), "--out")
        written.append(out)
    if json_out:
        _write_json(res.as_dict(), json_out)
        written.append(json_out)
    if written:
        click.echo(f"wrote {', '.join(str(p) for p in written)}")


# ------------------------------------------------------------------------------ predictors
@click.command("predictors")
@click.argument("trace", type=click.Path(path_type=Path))
@_FORMAT
@click.option("--batch-sizes", "-b", default="1,4,16", show_default=True)
@click.option("--policies", default="popularity,history,affinity", show_default=True,
              help="Prefetch policies to score.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the scores as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def trace_predictors(trace, fmt, batch_sizes, policies, seed, json_out, quiet):
    """Precision and recall of prefetch predictors on TRACE's held-out sequences (test split:
    every 5th), trained on the others (train split)."""
    from simulator.models import ModelSpec
    from simulator.policies import PREFETCH_POLICIES
    from simulator.policies.learned import prefetch_quality
    from simulator.traces.real import batch_set, detect_format, open_sequences, split_indices

    fmt = detect_format(trace) if fmt == "auto" else fmt
    ss = open_sequences(trace, fmt)
    names = [p for p in policies.replace(" ", "").split(",") if p]
    for n in names:
        if n not in PREFETCH_POLICIES:
            raise InputError("command line", "--policies", f"unknown prefetch policy {n!r}; known: {', '.join(PREFETCH_POLICIES)}")
    model = ModelSpec(name="trace", num_layers=ss.num_layers, num_experts=ss.num_experts, top_k=ss.top_k,
                      hidden=1, ffn=1)
    test = split_indices(ss.num_sequences, "test")
    n_test = int(ss.lengths[test].sum())
    train = {"path": str(trace), "format": fmt, "split": "train"}
    rows = []
    t = Table(title=f"{trace}: prefetch predictions on held-out sequences ({len(test)} test sequences)")
    for col in ("batch", "policy", "precision", "recall", "next-layer P / R", "next-step P / R", "per layer-step"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    from .display import progress_bar

    batches = _int_list(batch_sizes, "--batch-sizes")
    with progress_bar(quiet, "scoring predictors") as cb:
        scores = []
        for B in batches:
            tr = batch_set(ss, test, batch_size=B, steps=max(1, n_test // B), seed=seed)
            for n in names:
                if cb:
                    cb(len(scores), len(batches) * len(names), f"{n} B={B}")
                opts = {"train": train} if n in ("history", "affinity") else {}
                scores.append((B, n, tr, prefetch_quality(PREFETCH_POLICIES[n](budget=None, **opts), tr, model, seed)))
    for B, n, tr, q in scores:
        rows.append({"batch_size": B, "policy": n, **q})
        a, nl, ns = q["all"], q["next_layer"], q["next_step"]
        targets = tr.num_steps * tr.num_layers - 1        # every layer-step but the first
        t.add_row(str(B), n, f"{a['precision']:.3f}", f"{a['recall']:.3f}",
                  f"{nl['precision']:.3f} / {nl['recall']:.3f}", f"{ns['precision']:.3f} / {ns['recall']:.3f}",
                  f"{a['predicted'] / targets:.1f} of {a['needed'] / targets:.1f}")
    console.print(t)
    if json_out:
        _write_json({"source": str(trace), "test_sequences": int(len(test)), "rows": rows}, json_out)
        click.echo(f"wrote {json_out}")


# ---------------------------------------------------------------------------------- record
@click.command("record")
@click.option("--model", "model_path", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Local Hugging Face checkpoint folder (Mixtral, OLMoE, Qwen-MoE, DeepSeek style).")
@click.option("--prompts", type=click.Path(dir_okay=False, path_type=Path),
              help="Prompts: a text file (one per line) or JSON lines with 'text' or 'input_ids'.")
@click.option("--random", "random_n", type=click.IntRange(1), default=None,
              help="Instead of prompts: this many random token sequences (smoke tests).")
@click.option("--length", type=click.IntRange(1), default=32, show_default=True, help="Tokens per random sequence.")
@click.option("--max-new-tokens", type=click.IntRange(0), default=0, show_default=True,
              help="Greedy-generate this many tokens after each prompt (their routing is recorded too).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output .npz.")
def trace_record(model_path, prompts, random_n, length, max_new_tokens, device, seed, out):
    """Record the routing of a local MoE checkpoint through its router outputs (needs the
    optional extra: pip install 'simmoe[record]')."""
    from calibrate.models.record import record_routing

    if (prompts is None) == (random_n is None):
        raise InputError("command line", "--prompts", "give exactly one of --prompts and --random")
    ss = record_routing(model_path, out, prompts=prompts, random_sequences=random_n, length=length,
                        max_new_tokens=max_new_tokens, device=device, seed=seed)
    click.echo(f"wrote {out}: {ss.num_sequences} sequences, {ss.num_tokens} tokens, {ss.num_layers} MoE layers, "
               f"top-{ss.top_k} of {ss.num_experts} experts")


def register(main: click.Group) -> None:
    """Add the real-trace commands to ``simmoe trace``."""
    group = main.commands["trace"]
    for cmd in (trace_import, trace_stats_cmd, trace_fit, trace_predictors, trace_record):
        group.add_command(cmd)
