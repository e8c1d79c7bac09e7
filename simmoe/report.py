"""``simmoe report DIR``: the published study's tables, regenerated from a run or sweep folder.

Sections (Markdown ``report.md`` and self-contained ``report.html`` with the plots embedded):

1. **Computation vs memory transfer** of the per-item baseline (every batch item loads its own
   experts), per MoE layer and step, by batch size and experts per token (the model's top-k),
   with the dominant side and the ratio transfer / computation; the published RTX 3090 figures
   beside them where the profile carries them (``rtx3090-published``) and the expert is the
   study's. The study's grid is batch 1, 2, 4 x experts 1, 10; missing cells are listed.
2. **Deduplication savings** by batch size (1 to 64): memory savings (share of routed expert
   loads that are repeats, ``dedup_savings``), bandwidth savings (1 - bytes copied / bytes a
   per-item load of every routed expert would copy), the maximum reuse factor (the seed's
   column: (requests - unique) / requests of the step where it is largest) and the
   uniform-routing expectation.
3. **Policy comparison**: step latency (mean, 95% CI), throughput, hit rate, bytes per token
   and the speed-up over the per-item baseline at the same batch size and configuration.
4. The plots of :mod:`simmoe.plots`, and for a sweep, its failed points.

A *configuration* is a combination of the sweep axes that vary (other than batch size); each
table has a column per such axis unless the table's own columns already determine it.
"""
from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import math

import numpy as np
import pandas as pd
import pyarrow as pa

from simulator.atomic import write_text
from simulator.units import fmt_bytes
from simulator.errors import InputError
from simulator.profile import builtin_profiles, load_profile, parse_profile
from simulator.safe_load import check_input_file, load_json, load_yaml
from simulator.scenario import parse_scenario
from simulator.sweep import (
    flatten_summary, max_reuse_factors, policy_context, read_results, scenario_context,
)

from .plots import config_columns, make_plots, uniform_dedup_savings

STUDY_GRID = [(1, 1), (1, 10), (2, 1), (2, 10), (4, 1), (4, 10)]
STUDY_EXPERT_BYTES = 3 * 768 * 3072 * 4
DEDUP_BATCHES = [1, 2, 4, 8, 16, 32, 64]


@dataclass
class Results:
    """The flat rows of a run or sweep folder and what is known about them."""

    kind: str                       # "run" or "sweep"
    folder: Path
    rows: pd.DataFrame              # every row, failed points included (status column)
    axes: list[str]
    published: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    decision: dict | None = None    # a run's decision summary (simulator.decision)

    @property
    def ok(self) -> pd.DataFrame:
        return self.rows[self.rows["status"] == "ok"]


def _published(profile) -> dict[tuple[int, int], tuple[float, float]]:
    rows = profile.measurements.get("published_rows", [])
    return {(int(r["batch"]), int(r["experts"])): (float(r["computation_ms"]), float(r["transfer_ms"])) for r in rows}


#: columns every result row needs, by kind (numbers must be finite in rows that succeeded)
ROW_NUMBERS = ("batch_size", "top_k", "num_layers", "num_experts", "expert_bytes", "requests", "bytes_h2d",
               "dedup_savings", "hit_rate", "latency_mean_ms", "latency_ci95_lo", "latency_ci95_hi",
               "compute_ms", "transfer_ms", "cpu_ms", "tokens_per_s", "bytes_per_token")
ROW_TEXT = ("policy", "load", "cache", "prefetch")
#: how a flattened column is named in summary.json
_SUMMARY_NAME = {"latency_mean_ms": "step_latency_ms.mean", "latency_ci95_lo": "step_latency_ms.ci95[0]",
                 "latency_ci95_hi": "step_latency_ms.ci95[1]"}


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and math.isfinite(v)


def check_row(row: dict, source: str, where: str, names: dict | None = None) -> None:
    """One result row has every column the report reads, numbers finite, texts strings."""
    for col in ROW_NUMBERS:
        field = f"{where}.{(names or {}).get(col, col)}"
        if col not in row or row[col] is None:
            raise InputError(source, field, "required field missing")
        if not _is_number(row[col]):
            raise InputError(source, field, f"{row[col]!r} is not a finite number")
    for col in ROW_TEXT:
        if not isinstance(row.get(col), str):
            raise InputError(source, f"{where}.{col}", f"{row.get(col)!r} is not a text")
    mrf = row.get("max_reuse_factor")
    if mrf is not None and not (isinstance(mrf, float) and math.isnan(mrf)) and not _is_number(mrf):
        raise InputError(source, f"{where}.max_reuse_factor", f"{mrf!r} is not a number")


def _summary_rows(summary, sc, src: str) -> list[dict]:
    """summary.json's ``results``, each checked, as dicts with ``step_latency_ms`` flattened."""
    if not isinstance(summary, dict) or not isinstance(summary.get("results"), list):
        raise InputError(src, "results", "required: a list of result rows")
    names = {p.name for p in sc.policies}
    out = []
    for i, r in enumerate(summary["results"]):
        where = f"results[{i}]"
        if not isinstance(r, dict):
            raise InputError(src, where, "must be a mapping")
        if not isinstance(r.get("policy"), str) or r["policy"] not in names:
            raise InputError(src, f"{where}.policy", f"{r.get('policy')!r} is not a policy of scenario.yaml")
        if type(r.get("batch_size")) is not int:
            raise InputError(src, f"{where}.batch_size", f"{r.get('batch_size')!r} is not an integer")
        lat = r.get("step_latency_ms")
        if not isinstance(lat, dict) or not isinstance(lat.get("ci95"), list) or len(lat["ci95"]) != 2:
            raise InputError(src, f"{where}.step_latency_ms", "required: a mapping with mean and ci95 [lo, hi]")
        out.append(flatten_summary(r))
    return out


def _read_steps(path: Path, warmup: int) -> dict:
    check_input_file(path, path.name)
    try:
        steps = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        missing = [c for c in ("policy", "batch_size", "step", "requests", "unique_requests") if c not in steps.columns]
        if missing:
            raise InputError(str(path), missing[0], "required column missing")
        return max_reuse_factors(steps, warmup)
    except InputError:
        raise
    except (pa.ArrowException, OSError, ValueError, TypeError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise InputError(str(path), path.name, f"unreadable or mistyped ({type(e).__name__}: {e})") from None


def _load_run(folder: Path) -> Results:
    sc_path, sum_path, prof_path = folder / "scenario.yaml", folder / "summary.json", folder / "profile.json"
    sc = parse_scenario(load_yaml(sc_path, "scenario.yaml"), str(sc_path))
    summary_doc = load_json(sum_path, "summary.json")
    summary = _summary_rows(summary_doc, sc, str(sum_path))
    profile = parse_profile(load_json(prof_path, "profile.json"), str(prof_path))
    notes = []
    steps_file = next((folder / f for f in ("steps.parquet", "steps.csv") if (folder / f).exists()), None)
    if steps_file is None:
        notes.append("No steps.parquet/steps.csv in the folder: the maximum reuse factor is not available.")
        reuse = {}
    else:
        reuse = _read_steps(steps_file, sc.engine.warmup_steps)
    rows = []
    for i, r in enumerate(summary):
        row = {"status": "ok", **scenario_context(sc, profile), **policy_context(sc, r["policy"]),
               **r, "max_reuse_factor": reuse.get((r["policy"], r["batch_size"]))}
        check_row(row, str(sum_path), f"results[{i}]", _SUMMARY_NAME)
        rows.append(row)
    try:
        published = _published(profile)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(str(prof_path), "measurements.published_rows", f"mistyped ({type(e).__name__}: {e})") from None
    decision = _decision(rows, sc, notes)
    if decision is not None:
        decision["skipped"] = _skipped(summary_doc, str(sum_path))
        decision["warnings"] += [f"policy {s['policy']} skipped: {s['reason']}" for s in decision["skipped"]]
    return Results("run", folder, pd.DataFrame(rows), [], published, notes, decision)


def _skipped(summary_doc: dict, src: str) -> list[dict]:
    """summary.json's ``decision.skipped`` (policies the profile could not time), checked."""
    dec = summary_doc.get("decision")
    skipped = dec.get("skipped", []) if isinstance(dec, dict) else []
    if not isinstance(skipped, list) or not all(
            isinstance(s, dict) and isinstance(s.get("policy"), str) and isinstance(s.get("reason"), str)
            for s in skipped):
        raise InputError(src, "decision.skipped", "must be a list of {policy, reason} texts")
    return skipped


def _decision(rows: list[dict], sc, notes: list[str]) -> dict | None:
    """The run's decision summary from its checked rows (a summary that lacks a count the
    decision needs gets a note instead)."""
    from simulator.decision import decide

    nested = [{**r, "step_latency_ms": {"mean": r["latency_mean_ms"],
                                        "ci95": [r["latency_ci95_lo"], r["latency_ci95_hi"]]}} for r in rows]
    try:
        return decide(nested, sc)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, StopIteration) as e:
        notes.append(f"No decision summary: summary.json lacks what it needs ({type(e).__name__}: {e}).")
        return None


def _load_sweep(folder: Path) -> Results:
    rows, manifest = read_results(folder)
    if rows.empty:
        raise InputError(str(folder), "parts", "this sweep has no finished point yet")
    src = str(folder / "results.parquet")
    for col in ("point", "status", "error"):
        if col not in rows.columns:
            raise InputError(src, col, "required column missing")
    if not rows["status"].isin(["ok", "error"]).all():
        raise InputError(src, "status", "must be 'ok' or 'error' in every row")
    ok = rows[rows["status"] == "ok"]
    for i, r in zip(ok.index, ok.to_dict("records")):
        check_row(r, src, f"row {i + 1}")
    notes = []
    done, total = rows["point"].nunique(), len(manifest["points"])
    if done < total:
        notes.append(f"Partial sweep: {done} of {total} points finished (run the sweep again to finish it).")
    published: dict = {}
    for name in rows["profile_name"].dropna().unique() if "profile_name" in rows.columns else []:
        if name in builtin_profiles():
            published.update(_published(load_profile(name)))
    axes = [a["path"] for a in manifest["axes"]]
    decision = None
    if "baseline" in ok.columns:
        from simulator.decision import sweep_decision

        decision = sweep_decision(ok.to_dict("records"), axes)
    else:
        notes.append("No decision summary: these results predate it (run the sweep again into a new folder).")
    return Results("sweep", folder, rows, axes, published, notes, decision)


def load_results(folder: str | Path) -> Results:
    """A run folder (summary.json, scenario.yaml, profile.json) or a sweep folder (sweep.json)."""
    folder = Path(folder)
    if (folder / "sweep.json").is_file():
        return _load_sweep(folder)
    if (folder / "summary.json").is_file():
        return _load_run(folder)
    raise InputError(str(folder), "DIR", "not a run or sweep folder (no summary.json or sweep.json)")


# --------------------------------------------------------------------------- tables
def fmt_ms(x: float) -> str:
    return f"{x:.2f}"


def fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def fmt_share(x: float | None) -> str:
    return "-" if x is None or pd.isna(x) else f"{x:.3f}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None or pd.isna(x) else f"{x:.2f}x"


@dataclass
class Table:
    title: str
    intro: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str]


def computation_vs_transfer(res: Results) -> Table:
    df = res.ok[res.ok["load"] == "per-item"] if not res.ok.empty else res.ok
    title = "Computation vs memory transfer (per-item baseline)"
    intro = ("Every batch item loads its own experts (the published baseline). Times are per MoE layer "
             "and decode step: stream busy time / layers. Experts = experts per token (top-k).")
    if df.empty:
        return Table(title, intro, [], [], ["No per-item policy in these results: add one "
                                            "(load: per-item, memory: pageable) to regenerate this table."])
    keys = ["batch_size", "top_k"]
    cfg = config_columns(df, res.axes, keys, ["compute_ms", "transfer_ms"])
    cfg += ["policy"] if df["policy"].nunique() > 1 else []
    df = df.drop_duplicates(keys + cfg)
    show_pub = bool(res.published) and (df["expert_bytes"] == STUDY_EXPERT_BYTES).any()
    headers = cfg + ["Batch", "Experts", "Computation (ms)", "Memory transfer (ms)", "Dominant",
                     "Ratio (transfer / computation)"]
    headers += ["Published computation (ms)", "Published transfer (ms)"] if show_pub else []
    rows = []
    for _, r in df.sort_values(["top_k", "batch_size"], kind="stable").iterrows():
        comp, xfer = r["compute_ms"] / r["num_layers"], r["transfer_ms"] / r["num_layers"]
        row = [str(r[c]) for c in cfg] + [str(r["batch_size"]), str(r["top_k"]), fmt_ms(comp), fmt_ms(xfer),
                                          "memory transfer" if xfer > comp else "computation",
                                          fmt_ratio(xfer / comp if comp > 0 else None)]
        if show_pub:
            pub = res.published.get((int(r["batch_size"]), int(r["top_k"])))
            row += [fmt_ms(pub[0]), fmt_ms(pub[1])] if pub and r["expert_bytes"] == STUDY_EXPERT_BYTES else ["", ""]
        rows.append(row)
    present = {(int(b), int(k)) for b, k in zip(df["batch_size"], df["top_k"])}
    missing = [f"batch {b} x {k} expert{'s' if k > 1 else ''}" for b, k in STUDY_GRID if (b, k) not in present]
    notes = [f"Study configurations not in these results: {', '.join(missing)} "
             "(the 'published study' sweep in docs/sweeps.md runs them all)."] if missing else []
    if show_pub:
        notes.append("The study measured its rows differently: its computation ran one expert FFN per batch item "
                     "over 512 tokens whatever the expert count, its transfer one pageable copy of batch x experts "
                     "experts. `python -m calibrate.validation.published` reproduces them as measured (docs/validation.md).")
    return Table(title, intro, headers, rows, notes)


def _dedup_policy(df: pd.DataFrame) -> str:
    """The policy whose bytes show what deduplication alone saves."""
    for cond in ((df["load"] != "per-item") & (df["cache"] == "none") & (df["prefetch"] == "none"),
                 df["load"] != "per-item"):
        if cond.any():
            return str(df.loc[cond, "policy"].iloc[0])
    return str(df["policy"].iloc[0])


def dedup_savings(res: Results) -> Table:
    title = "Deduplication savings by batch size (1 to 64)"
    df = res.ok[res.ok["batch_size"] <= 64] if not res.ok.empty else res.ok
    if df.empty:
        return Table(title, "", [], [], ["No results with batch size 64 or less."])
    pol = _dedup_policy(df)
    df = df[df["policy"] == pol]
    intro = (f"Policy `{pol}`. Memory savings: share of routed expert loads that repeat an expert already "
             "requested in the same layer-step. Bandwidth savings: 1 - bytes copied / bytes per-item loading "
             "would copy. Max reuse factor (the seed's column): (requests - unique) / requests of the "
             "step where it is largest. "
             "Uniform: the expectation 1 - E(1-(1-k/E)^B)/(kB) for uniform routing.")
    cfg = config_columns(df, res.axes, ["batch_size"], ["dedup_savings", "bytes_h2d", "max_reuse_factor"])
    df = df.drop_duplicates(["batch_size"] + cfg)
    headers = cfg + ["Batch", "Memory savings", "Bandwidth savings", "Max reuse factor ((requests - unique) / requests)",
                     "Uniform routing"]
    rows = []
    for _, r in df.sort_values("batch_size", kind="stable").iterrows():
        per_item_bytes = r["requests"] * r["expert_bytes"]
        bw = 1 - r["bytes_h2d"] / per_item_bytes if per_item_bytes else 0.0
        uni = float(uniform_dedup_savings(int(r["num_experts"]), int(r["top_k"]), [r["batch_size"]])[0])
        rows.append([str(r[c]) for c in cfg] + [str(r["batch_size"]), fmt_pct(r["dedup_savings"]), fmt_pct(bw),
                                                fmt_share(r["max_reuse_factor"]), fmt_pct(uni)])
    missing = sorted(set(DEDUP_BATCHES) - set(int(b) for b in df["batch_size"]))
    notes = [f"Batch sizes not in these results: {', '.join(map(str, missing))}."] if missing else []
    return Table(title, intro, headers, rows, notes)


def policy_comparison(res: Results) -> Table:
    title = "Policy comparison"
    df = res.ok
    if df.empty:
        return Table(title, "", [], [], ["No finished points."])
    cfg = config_columns(df, res.axes, ["batch_size", "policy"], ["latency_mean_ms", "bytes_h2d"])
    group = cfg + ["batch_size"]
    base = df[df["load"] == "per-item"].drop_duplicates(group)
    notes = []
    if base.empty:
        first = str(df["policy"].iloc[0])
        base = df[df["policy"] == first].drop_duplicates(group)
        notes.append(f"No per-item policy in these results: speed-up is over `{first}`.")
    base_lat = {tuple(r[group]): r["latency_mean_ms"] for _, r in base.iterrows()}
    headers = cfg + ["Batch", "Policy", "Step latency (ms, mean ± 95% CI)", "Tokens/s", "Hit rate",
                     "Moved / token", "Speed-up vs per-item"]
    rows = []
    for _, r in df.sort_values(group, kind="stable").iterrows():
        half = (r["latency_ci95_hi"] - r["latency_ci95_lo"]) / 2
        b = base_lat.get(tuple(r[group]))
        rows.append([str(r[c]) for c in cfg] + [
            str(r["batch_size"]), str(r["policy"]), f"{fmt_ms(r['latency_mean_ms'])} ± {fmt_ms(half)}",
            f"{r['tokens_per_s']:.1f}", fmt_pct(r["hit_rate"]), fmt_bytes(r['bytes_per_token']),
            fmt_ratio(b / r["latency_mean_ms"] if b and r["latency_mean_ms"] > 0 else None)])
    intro = "Speed-up = per-item baseline latency / policy latency, same batch size and configuration."
    return Table(title, intro, headers, rows, notes)


def decision_table(res: Results) -> Table | None:
    """Per batch size: the policy to use, its speed-up over the stated baseline, the CI verdict."""
    if res.decision is None:
        return None
    if "per_point" in res.decision:
        return sweep_decision_table(res.decision)
    per = res.decision["per_batch"]
    rule = per[0]["baseline_rule"] if per else ""
    headers = ["Batch", "Best policy", "Step latency (ms)", "Speed-up", "Baseline", "Runner-up", "Beyond 95% CIs",
               "Demand hits", "Prefetch hits", "Prefetched in vain"]
    rows = [[str(d["batch_size"]), d["best"], fmt_ms(d["best_latency_ms"]), fmt_ratio(d["speedup"]), d["baseline"],
             d["runner_up"] or "-", "-" if d["runner_up"] is None else "yes" if d["distinguishable"] else
             "not distinguishable", f"{d['demand_hits']:,}", f"{d['prefetch_hits']:,}",
             fmt_bytes(d['wasted_prefetch_bytes'])] for d in per]
    intro = (f"Speed-up = baseline step latency / best policy's, same batch size; baseline: {rule}. "
             "'Beyond 95% CIs': the best's interval lies wholly below the runner-up's.")
    return Table("Decision", intro, headers, rows, [f"Warning: {w}" for w in res.decision["warnings"]])


def sweep_decision_table(dec: dict) -> Table:
    """Per configuration (sweep point) and batch size: the policy to use and by how much."""
    from simulator.decision import point_label

    headers = ["Configuration", "Batch", "Best policy", "Step latency (ms)", "Speed-up", "Baseline", "Runner-up",
               "Beyond 95% CIs"]
    rows = [[point_label(e, dec["axes"]), str(e["batch_size"]), e["best"], fmt_ms(e["best_latency_ms"]),
             fmt_ratio(e["speedup"]), e["baseline"], e["runner_up"] or "-",
             "-" if e["runner_up"] is None else "yes" if e["distinguishable"] else "not distinguishable"]
            for e in dec["per_point"]]
    tally = ", ".join(f"`{p}` in {n}" for p, n in dec["best_counts"].items())
    rules = "; ".join(sorted({e["baseline_rule"] for e in dec["per_point"] if e["baseline_rule"]}))
    intro = (f"Best policy: {tally} of {len(rows)} configurations x batch sizes. Speed-up = the point's "
             f"baseline step latency / the best policy's ({rules}). 'Beyond 95% CIs': the best's interval "
             "lies wholly below the runner-up's.")
    warn = dec["warnings"]
    notes = [f"Warning: {w}" for w in warn[:10]] + ([f"... {len(warn) - 10} more warnings in decision.json."]
                                                    if len(warn) > 10 else [])
    return Table("Decision", intro, headers, rows, notes)


def failures(res: Results) -> Table | None:
    bad = res.rows[res.rows["status"] != "ok"]
    if bad.empty:
        return None
    rows = [[str(r["point"]), ", ".join(f"{a}={r[a]}" for a in res.axes if a in bad.columns), str(r["error"])]
            for _, r in bad.iterrows()]
    return Table("Failed points", "These points raised; the rest of the sweep ran.", ["Point", "Axes", "Error"], rows, [])


# ------------------------------------------------------------------------- rendering
PLOT_CAPTIONS = {
    "latency": "Latency per step vs batch size (95% CI bands)",
    "dedup": "Dedup savings vs batch size, with the uniform-routing formula",
    "latency_capacity": "Latency per step vs cache capacity (95% CI bands; dotted: policies without a cache)",
    "hit_rate": "Hit rate (demand + prefetch hits) vs cache capacity, or vs batch size when capacity is fixed",
    "time_split": "Busy time per step of the compute and copy streams (overlaid, not added) and the step latency",
    "bytes_per_token": "Bytes moved per token",
}


def _header(res: Results) -> list[str]:
    ok = res.ok
    lines = [f"Source: `{res.folder}` ({res.kind})."]
    prof = "profile_source" if "profile_source" in ok.columns else "profile_name"
    for col, what in (("scenario", "Scenario"), ("model", "Model"), (prof, "Profile")):
        if col in ok.columns and not ok.empty:
            lines.append(f"{what}: {', '.join(sorted(map(str, ok[col].unique())))}.")
    if res.kind == "sweep":
        n_fail = res.rows.loc[res.rows["status"] != "ok", "point"].nunique()
        lines.append(f"Points: {res.rows['point'].nunique()} ({n_fail} failed); axes: "
                     f"{', '.join(f'`{a}`' for a in res.axes) or 'none'}.")
    return lines + res.notes


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, header: list[str], tables: list[Table], plots: dict[str, list[Path]], base: Path) -> str:
    out = [f"# {title}", ""] + [f"{line}  " for line in header] + [""]
    for t in tables:
        out += [f"## {t.title}", ""]
        if t.intro:
            out += [t.intro, ""]
        if t.headers:
            out.append("| " + " | ".join(map(_md_cell, t.headers)) + " |")
            out.append("|" + "|".join("---" for _ in t.headers) + "|")
            out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in t.rows]
            out.append("")
        out += [f"_{n}_" for n in t.notes] + ([""] if t.notes else [])
    if plots:
        out += ["## Plots", ""]
        for name, paths in plots.items():
            png, svg = paths
            out += [f"![{PLOT_CAPTIONS[name]}]({png.relative_to(base).as_posix()})",
                    f"_{PLOT_CAPTIONS[name]}_ ([SVG]({svg.relative_to(base).as_posix()}))", ""]
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
        "td:first-child,th:first-child{text-align:left}.note{color:#555;font-style:italic}img{max-width:100%}")


def to_html(title: str, header: list[str], tables: list[Table], plots: dict[str, list[Path]]) -> str:
    e = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{e(title)}</h1>"] + [f"<p>{e(line)}</p>" for line in header]
    for t in tables:
        out.append(f"<h2>{e(t.title)}</h2>")
        if t.intro:
            out.append(f"<p>{e(t.intro)}</p>")
        if t.headers:
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in t.headers) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in t.rows]
            out.append("</table>")
        out += [f"<p class='note'>{e(n)}</p>" for n in t.notes]
    if plots:
        out.append("<h2>Plots</h2>")
        for name, (png, _svg) in plots.items():
            data = base64.b64encode(png.read_bytes()).decode()
            out.append(f"<figure><img alt='{e(PLOT_CAPTIONS[name])}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{e(PLOT_CAPTIONS[name])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def build_tables(res: Results) -> list[Table]:
    tables = [decision_table(res), computation_vs_transfer(res), dedup_savings(res), policy_comparison(res),
              failures(res)]
    return [t for t in tables if t is not None]


def write_report(folder: str | Path, out: str | Path | None = None, progress=None) -> list[Path]:
    """Write ``report.md``, ``report.html`` and ``plots/`` into ``out`` (default: the folder);
    ``progress(done, total, what)`` follows the plots."""
    res = load_results(folder)
    out = Path(out) if out else res.folder
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(str(out), "--out", f"cannot write here: {e.strerror or e}") from None
    plots = make_plots(res.rows, res.axes, out / "plots", progress)
    tables = build_tables(res)
    title = f"simmoe report: {res.folder.name}"
    header = _header(res)
    md, page = out / "report.md", out / "report.html"
    write_text(md, to_markdown(title, header, tables, plots, out))
    write_text(page, to_html(title, header, tables, plots))
    return [md, page] + [p for paths in plots.values() for p in paths]
