"""Plots of run and sweep results (matplotlib, no display needed; PNG and SVG).

Every plot reads the flat rows of :func:`simmoe.report.load_results` (one row per policy x
batch size x sweep point). Lines are grouped into *series*: the policy plus every sweep axis
that changes the plotted value (other than the plot's x axis). More than ``FACET_SERIES``
series are split into panels (*facets*): one per value of a configuration axis, or one per
policy, so no panel holds more than a few lines; past 10 series in a panel, line styles and
markers change as well as colours. A y axis whose values span more than ``LOG_SPAN`` x is
logarithmic.

- ``latency``: mean step latency vs batch size per series, with the 95% CI as a band;
- ``latency_capacity``: mean step latency vs cache capacity (GPU expert slots), cached
  policies, with the policies without a cache as dotted reference lines (when capacity varies);
- ``dedup``: deduplication savings vs batch size, with the uniform-routing expectation
  ``1 - E (1 - (1 - k/E)^B) / (k B)`` overlaid for each (experts E, top-k k) in the results;
- ``hit_rate``: cache hit rate (demand and prefetch hits; dotted: demand hits alone, where
  they differ) vs cache capacity when capacity varies, else vs batch size; cached policies;
- ``time_split``: per configuration, the compute stream's, copy stream's and CPU's busy time
  per step as overlaid bars from zero (they run at the same time: not a sum) and the step
  latency as a tick; one panel per batch size;
- ``bytes_per_token``: bytes copied host-to-device per token vs batch size (or vs capacity).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

from simulator.atomic import write_with
from simulator.traces import expected_unique_uniform
from simulator.units import MIB

MAX_BARS = 120
FACET_SERIES = 6          # more series than this in one panel: split into panels
MAX_PANELS = 9
LOG_SPAN = 20.0           # max / min beyond which a y axis is logarithmic
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_SAVE = {"png": {"dpi": 110}, "svg": {"metadata": {"Date": None}}}
CAPACITY_AXES = ("cache", "policies")   # axis paths containing these words set capacities


# ------------------------------------------------------------------------- series
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


def config_columns(df: pd.DataFrame, axes: list[str], keys: list[str], metrics: list[str],
                   exclude: tuple[str, ...] = ("batch_sizes",)) -> list[str]:
    """The varying axes (not in ``exclude``) that a table or plot needs beside its ``keys``:
    those the keys do not determine and that change at least one of the ``metrics``."""
    cols = distinct_axes(df, axes, keys, exclude)
    for c in list(cols):
        others = list(keys) + [k for k in cols if k != c]
        if others and df.groupby(others, dropna=False)[metrics].nunique(dropna=False).max().max() <= 1:
            cols.remove(c)
    return cols


def short_names(cols: list[str]) -> dict[str, str]:
    """``trace.batch_locality`` -> ``batch_locality``, unless two columns would share a name."""
    last = {c: c.rsplit(".", 1)[-1] for c in cols}
    return {c: s if list(last.values()).count(s) == 1 else c for c, s in last.items()}


def _labels(df: pd.DataFrame, cols: list[str], policy: bool) -> pd.Series:
    """A label per row: the policy and the given axes (``dedup-lru, zipf=0.6``)."""
    names = short_names(cols)
    parts = [df["policy"].astype(str)] if policy else []
    parts += [f"{names[c]}=" + df[c].astype(str) for c in cols]
    if not parts:
        return pd.Series("simulated", index=df.index)
    out = parts[0]
    for p in parts[1:]:
        out = out + ", " + p
    return out


def series_labels(df: pd.DataFrame, axes: list[str], exclude: tuple[str, ...] = (), policy: bool = True) -> pd.Series:
    """A label per row: the policy and the varying axes (``dedup-lru, zipf=0.6``)."""
    return _labels(df, distinct_axes(df, axes, ["policy"] if policy else [], exclude), policy)


def style(i: int) -> dict:
    """The i-th series' look: ten colours, then the next line style and marker."""
    return {"color": f"C{i % 10}", "linestyle": LINESTYLES[(i // 10) % len(LINESTYLES)],
            "marker": MARKERS[(i // 10) % len(MARKERS)]}


def split(df: pd.DataFrame, cols: list[str], policy: bool) -> tuple[pd.Series, pd.Series | None]:
    """Series labels and, when there are more than FACET_SERIES series, panel labels: the
    configuration axis with the fewest values that brings each panel to FACET_SERIES series
    or fewer (lines = the rest), else, past 10 series (one colour each), one panel per policy."""
    labels = _labels(df, cols, policy)
    if labels.nunique() <= FACET_SERIES:
        return labels, None
    choices = [c for c in cols if 2 <= df[c].nunique() <= MAX_PANELS]
    if policy and cols and labels.nunique() > 10 and 2 <= df["policy"].nunique() <= MAX_PANELS:
        choices.append("policy")
    best = None
    for c in choices:
        rest = [k for k in cols if k != c]
        per_panel = _labels(df, rest, policy and c != "policy").groupby(df[c]).nunique().max()
        score = (per_panel > FACET_SERIES, df[c].nunique())
        if best is None or score < best[0]:
            best = (score, c, rest)
    if best is None:
        return labels, None
    _, c, rest = best
    panel = ("policy " if c == "policy" else f"{short_names([c])[c]}=") + df[c].astype(str)
    return _labels(df, rest, policy and c != "policy"), panel


# ---------------------------------------------------------------------------- axes
def uniform_dedup_savings(num_experts: int, top_k: int, batch: np.ndarray) -> np.ndarray:
    """Expected dedup savings of a layer-step under uniform routing."""
    b = np.asarray(batch, dtype=float)
    return 1.0 - expected_unique_uniform(num_experts, top_k, b) / (top_k * b)


def int_log_axis(ax, values, which: str = "x") -> None:
    """A base-2 log axis with a tick at each value (labelled as plain integers, thinned so that
    labels never overlap) and no minor labels."""
    vals = sorted({int(v) for v in values if v > 0})
    axis = ax.xaxis if which == "x" else ax.yaxis
    if len(vals) > 1:
        (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=2)
    step = max(1, math.ceil(len(vals) / 10))
    shown = vals[::step]
    axis.set_major_locator(FixedLocator(shown))
    axis.set_major_formatter(lambda v, _pos: f"{v:g}")
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def auto_log(ax, values, which: str = "y") -> bool:
    """Log scale when every value is positive and they span more than LOG_SPAN x."""
    v = np.asarray([x for x in values if x == x], dtype=float)
    if len(v) and (v > 0).all() and v.max() / v.min() > LOG_SPAN:
        (ax.set_yscale if which == "y" else ax.set_xscale)("log")
        return True
    return False


def _panels(n: int, width: float = 5.0, height: float = 3.6):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols + 2.6, height * rows + 0.8), layout="constrained")
    axs = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax in axs[n:]:
        ax.set_visible(False)
    return fig, axs[:n]


def _figure_legend(fig, axs) -> None:
    """One legend for the figure: right of the panels (labels in first-seen order)."""
    seen: dict[str, object] = {}
    for ax in axs:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    if not seen:
        return
    if len(axs) == 1 and len(seen) <= FACET_SERIES:
        axs[0].legend(list(seen.values()), list(seen), fontsize="small")
    else:
        fig.legend(list(seen.values()), list(seen), fontsize="x-small", loc="outside right upper")


def _save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    """PNG and SVG. The constrained layout (which fits labels, titles and the outside legend in
    the figure) runs once, then is frozen: each save would otherwise run it again."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    fig.set_layout_engine("none")
    paths = []
    for ext, opts in _SAVE.items():
        p = out_dir / f"{name}.{ext}"
        write_with(p, lambda tmp: fig.savefig(tmp, format=ext, **opts), "--out")
        paths.append(p)
    return paths


# ------------------------------------------------------------------------ line plots
def line_plot(df: pd.DataFrame, *, x: str, y: str, cols: list[str], policy: bool, title: str, xlabel: str,
              ylabel: str, scale: float = 1.0, band: tuple[str, str] | None = None,
              ylim: tuple[float, float] | None = None, extra=None, second: tuple[str, str] | None = None) -> Figure:
    """``y`` (times ``scale``) against ``x`` (a log-2 integer axis), one line per series, split
    into panels when series are many; ``extra(ax, panel_rows)`` draws more in each panel;
    ``second = (column, suffix)`` also draws that column, dotted in the series' colour, for the
    series where it differs from ``y``."""
    labels, panel = split(df, cols, policy)
    order = {lab: i for i, lab in enumerate(dict.fromkeys(labels))}
    keys = list(dict.fromkeys(panel)) if panel is not None else [None]
    fig, axs = _panels(len(keys))
    for ax, key in zip(axs, keys):
        rows = df if key is None else df[panel == key]
        for lab, g in rows.groupby(labels[rows.index], sort=False):
            g = g.sort_values(x)
            st = style(order[lab])
            ax.plot(g[x], g[y] * scale, label=lab, markersize=4, **st)
            if second and second[0] in g.columns and (g[second[0]] != g[y]).any():
                ax.plot(g[x], g[second[0]] * scale, label=f"{lab} {second[1]}", color=st["color"], linestyle=":",
                        marker=st["marker"], markersize=3, markerfacecolor="none")
            if band:
                ax.fill_between(g[x], g[band[0]] * scale, g[band[1]] * scale, color=st["color"], alpha=0.15)
        if extra:
            extra(ax, rows)
        if key is not None:
            ax.set_title(key, fontsize="small")
        ax.grid(True, alpha=0.3)
    int_log_axis(axs[0], df[x])
    if ylim:
        axs[0].set_ylim(*ylim)
    else:
        drawn = [v for ax in axs for line in ax.get_lines() for v in np.atleast_1d(line.get_ydata())]
        auto_log(axs[0], drawn)
    for ax in axs:
        ax.tick_params(labelsize="small", labelbottom=True)   # every panel labels its x ticks
    fig.supxlabel(xlabel)
    fig.supylabel(ylabel)
    fig.suptitle(title)
    _figure_legend(fig, axs)
    return fig


def _varies(df: pd.DataFrame, col: str) -> bool:
    return col in df.columns and df[col].nunique() > 1


def _capacity_rows(df: pd.DataFrame) -> pd.DataFrame | None:
    """The rows of cached policies when the cache capacity varies among them, else None."""
    cached = df[df["cache"] != "none"]
    return cached if not cached.empty and _varies(cached, "gpu_slots") else None


def _capacity_cols(df: pd.DataFrame, axes: list[str], metrics: list[str]) -> list[str]:
    """The axes that set a series beside capacity (capacity axes are the x axis)."""
    skip = tuple(a for a in axes if any(w in a for w in CAPACITY_AXES))
    batch = ["batch_size"] if _varies(df, "batch_size") else []
    return batch + config_columns(df, axes, ["policy", "gpu_slots"] + batch, metrics, ("batch_sizes",) + skip)


def plot_latency(df: pd.DataFrame, axes: list[str]) -> Figure | None:
    if not _varies(df, "batch_size") and _capacity_rows(df) is not None:
        return None          # one batch size: latency_capacity is the plot
    cols = config_columns(df, axes, ["batch_size", "policy"], ["latency_mean_ms"])
    return line_plot(df, x="batch_size", y="latency_mean_ms", cols=cols, policy=True,
                     band=("latency_ci95_lo", "latency_ci95_hi"), title="Latency per decode step vs batch size",
                     xlabel="batch size", ylabel="step latency (ms, mean, 95% CI band)")


def plot_latency_capacity(df: pd.DataFrame, axes: list[str]) -> Figure | None:
    cached = _capacity_rows(df)
    if cached is None:
        return None
    cols = _capacity_cols(cached, axes, ["latency_mean_ms"])
    uncached = df[df["cache"] == "none"]

    def references(ax, rows):        # the policies without a cache, at the panel's configuration
        sel = uncached
        for c in cols:
            if c in uncached.columns and rows[c].nunique() == 1:
                sel = sel[sel[c] == rows[c].iloc[0]]
        for pol, g in sel.groupby("policy", sort=False):
            ax.axhline(g["latency_mean_ms"].mean(), color="0.4", linestyle=":", linewidth=1.2,
                       label=f"{pol} (no cache)")

    return line_plot(cached, x="gpu_slots", y="latency_mean_ms", cols=cols, policy=True,
                     band=("latency_ci95_lo", "latency_ci95_hi"), extra=references,
                     title="Latency per decode step vs cache capacity", xlabel="cache capacity (GPU expert slots)",
                     ylabel="step latency (ms, mean, 95% CI band)")


def plot_dedup(df: pd.DataFrame, axes: list[str]) -> Figure | None:
    """Dedup savings is a property of the routing, not the policy: one line per configuration."""
    if not _varies(df, "batch_size"):
        return None
    first = df.drop_duplicates(["point", "batch_size"]) if "point" in df.columns else df.drop_duplicates("batch_size")
    cols = config_columns(first, axes, ["batch_size"], ["dedup_savings"])

    def uniform(ax, rows):
        bmax = int(rows["batch_size"].max())
        bs = np.unique(np.geomspace(1, max(bmax, 2), 200).round())
        for (e, k), _ in rows.groupby(["num_experts", "top_k"]):
            ax.plot(bs, 100 * uniform_dedup_savings(int(e), int(k), bs), color="k", linestyle="--", linewidth=1,
                    marker=None, label=f"uniform routing, E={e}, k={k}")

    return line_plot(first, x="batch_size", y="dedup_savings", scale=100, cols=cols, policy=False,
                      ylim=(0, 100), extra=uniform, title="Deduplication savings vs batch size "
                      "(dashed: uniform routing, 1 - E(1-(1-k/E)^B)/(kB))", xlabel="batch size",
                      ylabel="dedup savings (% of routed expert loads)")


def plot_hit_rate(df: pd.DataFrame, axes: list[str]) -> Figure | None:
    cached = df[df["cache"] != "none"]
    if cached.empty:
        return None
    common = dict(y="hit_rate", scale=100, policy=True, ylim=(0, 100), second=("demand_hit_rate", "(demand hits only)"),
                  ylabel="hit rate (% served; dotted: demand hits only)")
    if _capacity_rows(df) is not None:
        return line_plot(cached, x="gpu_slots", cols=_capacity_cols(cached, axes, ["hit_rate"]),
                         title="Cache hit rate vs cache capacity", xlabel="cache capacity (GPU expert slots)",
                         **common)
    cols = config_columns(cached, axes, ["batch_size", "policy"], ["hit_rate"])
    return line_plot(cached, x="batch_size", cols=cols, title="Cache hit rate vs batch size",
                     xlabel="batch size", **common)


def plot_bytes_per_token(df: pd.DataFrame, axes: list[str]) -> Figure | None:
    common = dict(y="bytes_per_token", scale=1 / MIB, policy=True,
                  ylabel="MiB copied host-to-device per token")
    cached = _capacity_rows(df)
    if not _varies(df, "batch_size") and cached is not None:
        return line_plot(cached, x="gpu_slots", cols=_capacity_cols(cached, axes, ["bytes_per_token"]),
                         title="Bytes moved per token vs cache capacity",
                         xlabel="cache capacity (GPU expert slots)", **common)
    cols = config_columns(df, axes, ["batch_size", "policy"], ["bytes_per_token"])
    return line_plot(df, x="batch_size", cols=cols, title="Bytes moved per token vs batch size",
                     xlabel="batch size", **common)


# --------------------------------------------------------------------------- bars
def plot_time_split(df: pd.DataFrame, axes: list[str]) -> Figure | None:
    """Busy time of each stream per step, overlaid from zero (the streams overlap in time), and
    the step latency; one panel per batch size, log axis when the times span decades."""
    rows = df.head(MAX_BARS)
    cols = config_columns(df, axes, ["batch_size", "policy"], ["compute_ms", "transfer_ms", "cpu_ms"])
    facet = "batch_size" if _varies(rows, "batch_size") else next(
        (c for c in cols if 2 <= rows[c].nunique() <= 4 and not any(w in c for w in CAPACITY_AXES)), None)
    rows = rows.assign(label=_labels(rows, [c for c in cols if c != facet], True))
    keys = list(dict.fromkeys(rows[facet])) if facet else [None]
    per = max(len(rows[rows[facet] == k]) if facet else len(rows) for k in keys)
    n = len(keys)
    ncols = min(2, n)
    fig = Figure(figsize=(6.2 * ncols + 2.5, max(3.0, 0.22 * per + 1.4) * math.ceil(n / ncols) + 0.6),
                 layout="constrained")
    axs = fig.subplots(math.ceil(n / ncols), ncols, squeeze=False, sharex=True).ravel()
    for ax in axs[n:]:
        ax.set_visible(False)
    times = pd.concat([rows[c] for c in ("compute_ms", "transfer_ms", "cpu_ms", "latency_mean_ms")])
    positive = times[times > 0]
    log = not positive.empty and positive.max() / positive.min() > LOG_SPAN
    floor = 10 ** math.floor(math.log10(positive.min())) if log else 0.0
    parts = [("transfer_ms", "copy stream busy (memory transfer)", 0.8, "C1", 0.55),
             ("compute_ms", "compute stream busy", 0.45, "C0", 0.9)]
    if (rows["cpu_ms"] > 0).any():
        parts.append(("cpu_ms", "CPU experts", 0.2, "C2", 0.9))
    for ax, key in zip(axs, keys):
        g = rows if key is None else rows[rows[facet] == key]
        y = np.arange(len(g))
        for col, name, h, color, alpha in parts:
            vals = g[col].to_numpy(dtype=float)
            ax.barh(y, np.maximum(vals - floor, 0), left=floor, height=h, color=color, alpha=alpha, label=name)
        ax.plot(g["latency_mean_ms"], y, linestyle="none", marker="|", markersize=12, markeredgewidth=2,
                color="k", label="step latency")
        ax.set_yticks(y, list(g["label"]), fontsize="x-small")
        ax.invert_yaxis()
        if key is not None:
            ax.set_title(f"B={key}" if facet == "batch_size" else f"{short_names([facet])[facet]}={key}",
                         fontsize="small")
        ax.grid(True, axis="x", alpha=0.3)
    if log:
        axs[0].set_xscale("log")
        axs[0].set_xlim(left=floor)
    for ax in axs[:n]:
        ax.tick_params(axis="x", labelbottom=True)
    fig.supxlabel("ms per step (bars from zero, overlaid: the streams run at the same time)")
    more = f" (first {MAX_BARS} of {len(df)})" if len(df) > MAX_BARS else ""
    fig.suptitle(f"Busy time per step: computation vs transfer{more}")
    _figure_legend(fig, list(axs[:n]))
    return fig


PLOTS = {"latency": plot_latency, "latency_capacity": plot_latency_capacity, "dedup": plot_dedup,
         "hit_rate": plot_hit_rate, "time_split": plot_time_split, "bytes_per_token": plot_bytes_per_token}


def make_plots(df: pd.DataFrame, axes: list[str], out_dir: str | Path, progress=None) -> dict[str, list[Path]]:
    """Write every plot that the rows support; returns plot name -> [PNG, SVG] paths.
    ``progress(done, total, what)`` is called before each plot."""
    out_dir = Path(out_dir)
    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    if ok.empty:
        return {}
    written = {}
    for i, (name, fn) in enumerate(PLOTS.items()):
        if progress:
            progress(i, len(PLOTS), name)
        fig = fn(ok, axes)
        if fig is not None:
            written[name] = _save(fig, out_dir, name)
    return written
