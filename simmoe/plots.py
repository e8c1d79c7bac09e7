"""Plots of run and sweep results (matplotlib, no display needed; PNG and SVG).

Every plot reads the flat rows of :func:`simmoe.report.load_results` (one row per policy x
batch size x sweep point). Lines are grouped into *series*: the policy plus every sweep axis
that takes more than one value (other than the plot's x axis).

- ``latency``: mean step latency vs batch size per series, with the 95% CI as a band;
- ``dedup``: deduplication savings vs batch size, with the uniform-routing expectation
  ``1 - E (1 - (1 - k/E)^B) / (k B)`` overlaid for each (experts E, top-k k) in the results;
- ``hit_rate``: cache hit rate vs cache capacity (GPU expert slots), policies with a cache;
- ``time_split``: mean computation, transfer (and CPU) time per step, stacked, per configuration;
- ``bytes_per_token``: bytes copied host-to-device per token vs batch size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from simulator.atomic import write_with
from simulator.traces import expected_unique_uniform

MAX_BARS = 80
_SAVE = {"png": {"dpi": 110}, "svg": {"metadata": {"Date": None}}}


def distinct_axes(df: pd.DataFrame, axes: list[str], keys: list[str] = (), exclude: tuple[str, ...] = ()) -> list[str]:
    """The sweep axes that take several values in ``df``, leaving out any that ``keys`` and the
    axes kept before it already determine (the partners of a zip group)."""
    kept: list[str] = []
    for a in axes:
        if a not in df.columns or a in exclude or df[a].nunique(dropna=False) < 2:
            continue
        by = list(keys) + kept
        if not by or df.groupby(by, dropna=False)[a].nunique(dropna=False).max() > 1:
            kept.append(a)
    return kept


def short_names(cols: list[str]) -> dict[str, str]:
    """``trace.batch_locality`` -> ``batch_locality``, unless two columns would share a name."""
    last = {c: c.rsplit(".", 1)[-1] for c in cols}
    return {c: s if list(last.values()).count(s) == 1 else c for c, s in last.items()}


def series_labels(df: pd.DataFrame, axes: list[str], exclude: tuple[str, ...] = (), policy: bool = True) -> pd.Series:
    """A label per row: the policy and the varying axes (``dedup-lru, zipf=0.6``)."""
    cols = distinct_axes(df, axes, ["policy"] if policy else [], exclude)
    names = short_names(cols)
    parts = [df["policy"].astype(str)] if policy else []
    parts += [f"{names[c]}=" + df[c].astype(str) for c in cols]
    if not parts:
        return pd.Series("all", index=df.index)
    out = parts[0]
    for p in parts[1:]:
        out = out + ", " + p
    return out


def _legend(ax) -> None:
    """Inside the plot for a few lines, to its right for many."""
    if len(ax.get_legend_handles_labels()[1]) > 8:
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize="small")


def uniform_dedup_savings(num_experts: int, top_k: int, batch: np.ndarray) -> np.ndarray:
    """Expected dedup savings of a layer-step under uniform routing."""
    b = np.asarray(batch, dtype=float)
    return 1.0 - expected_unique_uniform(num_experts, top_k, b) / (top_k * b)


def _save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    paths = []
    for ext, opts in _SAVE.items():
        p = out_dir / f"{name}.{ext}"
        write_with(p, lambda tmp: fig.savefig(tmp, format=ext, bbox_inches="tight", **opts), "--out")
        paths.append(p)
    return paths


def _batch_axis(ax, df: pd.DataFrame) -> None:
    ax.set_xlabel("batch size")
    if df["batch_size"].nunique() > 1:
        ax.set_xscale("log", base=2)
    ticks = sorted(df["batch_size"].unique())
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.grid(True, alpha=0.3)


def plot_latency(df: pd.DataFrame, axes: list[str], out_dir: Path) -> list[Path]:
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for label, g in df.groupby(series_labels(df, axes, ("batch_sizes",)), sort=False):
        g = g.sort_values("batch_size")
        ax.plot(g["batch_size"], g["latency_mean_ms"], marker="o", label=label)
        ax.fill_between(g["batch_size"], g["latency_ci95_lo"], g["latency_ci95_hi"], alpha=0.2)
    _batch_axis(ax, df)
    ax.set_yscale("log")
    ax.set_ylabel("step latency (ms, mean, 95% CI band)")
    ax.set_title("Latency per decode step vs batch size")
    _legend(ax)
    return _save(fig, out_dir, "latency")


def plot_dedup(df: pd.DataFrame, axes: list[str], out_dir: Path) -> list[Path]:
    """Dedup savings is a property of the routing, not the policy: one line per configuration."""
    first = df.drop_duplicates(["point", "batch_size"]) if "point" in df.columns else df.drop_duplicates("batch_size")
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for label, g in first.groupby(series_labels(first, axes, ("batch_sizes",), policy=False), sort=False):
        g = g.sort_values("batch_size")
        ax.plot(g["batch_size"], 100 * g["dedup_savings"], marker="o",
                label="simulated" if label == "all" else f"simulated: {label}")
    bmax = int(df["batch_size"].max())
    bs = np.unique(np.geomspace(1, max(bmax, 2), 200).round())
    for (e, k), _ in df.groupby(["num_experts", "top_k"]):
        ax.plot(bs, 100 * uniform_dedup_savings(int(e), int(k), bs), "k--", linewidth=1,
                label=f"uniform routing, E={e}, k={k}: 1 - E(1-(1-k/E)^B)/(kB)")
    _batch_axis(ax, df)
    ax.set_ylabel("dedup savings (% of routed expert loads)")
    ax.set_ylim(0, 100)
    ax.set_title("Deduplication savings vs batch size")
    _legend(ax)
    return _save(fig, out_dir, "dedup")


def plot_hit_rate(df: pd.DataFrame, axes: list[str], out_dir: Path) -> list[Path]:
    cached = df[df["cache"] != "none"]
    if cached.empty:
        return []
    capacity_axes = tuple(a for a in axes if "cache" in a or a == "policies")
    labels = series_labels(cached, axes, capacity_axes)
    if cached["batch_size"].nunique() > 1:
        labels = labels + ", B=" + cached["batch_size"].astype(str)
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for label, g in cached.groupby(labels, sort=False):
        g = g.sort_values("gpu_slots")
        ax.plot(g["gpu_slots"], 100 * g["hit_rate"], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cache capacity (GPU expert slots)")
    ax.set_ylabel("hit rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.set_title("Cache hit rate vs cache capacity")
    _legend(ax)
    return _save(fig, out_dir, "hit_rate")


def plot_time_split(df: pd.DataFrame, axes: list[str], out_dir: Path) -> list[Path]:
    labels = series_labels(df, axes, ("batch_sizes",)) + ", B=" + df["batch_size"].astype(str)
    rows = df.assign(label=labels)
    shown = rows.head(MAX_BARS)
    parts = [("compute_ms", "computation"), ("transfer_ms", "memory transfer")]
    if (rows["cpu_ms"] > 0).any():
        parts.append(("cpu_ms", "CPU experts"))
    fig = Figure(figsize=(9, max(3.0, 0.24 * len(shown) + 1.2)))
    ax = fig.subplots()
    y = np.arange(len(shown))
    left = np.zeros(len(shown))
    for col, name in parts:
        ax.barh(y, shown[col], left=left, label=name)
        left += shown[col].to_numpy()
    ax.set_yticks(y, shown["label"], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (stream busy time; they overlap in time)")
    more = f" (first {MAX_BARS} of {len(rows)})" if len(rows) > MAX_BARS else ""
    ax.set_title(f"Computation vs transfer per configuration{more}")
    _legend(ax)
    return _save(fig, out_dir, "time_split")


def plot_bytes_per_token(df: pd.DataFrame, axes: list[str], out_dir: Path) -> list[Path]:
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for label, g in df.groupby(series_labels(df, axes, ("batch_sizes",)), sort=False):
        g = g.sort_values("batch_size")
        ax.plot(g["batch_size"], g["bytes_per_token"] / 1e6, marker="o", label=label)
    _batch_axis(ax, df)
    if (df["bytes_per_token"] > 0).all():
        ax.set_yscale("log")
    ax.set_ylabel("MB copied host-to-device per token")
    ax.set_title("Bytes moved per token vs batch size")
    _legend(ax)
    return _save(fig, out_dir, "bytes_per_token")


PLOTS = {"latency": plot_latency, "dedup": plot_dedup, "hit_rate": plot_hit_rate,
         "time_split": plot_time_split, "bytes_per_token": plot_bytes_per_token}


def make_plots(df: pd.DataFrame, axes: list[str], out_dir: str | Path) -> dict[str, list[Path]]:
    """Write every plot that the rows support; returns plot name -> [PNG, SVG] paths."""
    out_dir = Path(out_dir)
    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    if ok.empty:
        return {}
    written = {}
    for name, fn in PLOTS.items():
        paths = fn(ok, axes, out_dir)
        if paths:
            written[name] = paths
    return written
