"""Plots read as intended: the right x axis per sweep, facets, styles past 10 series, log axes
where values span decades, overlapping busy times drawn as overlap (axes properties, not pixels)."""
from __future__ import annotations

import pytest
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from simmoe import plots
from simmoe.report import load_results
from simulator.sweep import sweep

from conftest import scenario_dict

POLICIES = [{"name": "per-item", "load": "per-item", "memory": "pageable"},
            {"name": "lru", "cache": {"kind": "lru", "capacity": 8}},
            {"name": "belady", "cache": {"kind": "belady", "capacity": 8}}]


@pytest.fixture(scope="module")
def batch_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("batch")
    base = scenario_dict(policies=POLICIES, replications=2, batch_sizes=[1])
    sweep({"name": "b", "base": base, "grid": {"batch_sizes": [1, 2, 4, 8]}}, out=out)
    return load_results(out)


@pytest.fixture(scope="module")
def cache_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    more = [{"name": k, "cache": {"kind": k, "capacity": 8}} for k in ("lfu", "fifo")]
    base = scenario_dict(policies=POLICIES + more, replications=1, batch_sizes=[4])
    caps = [2, 8, 32, 64]
    sweep({"name": "c", "base": base, "grid": {"trace.batch_locality": [0.1, 0.9]},
           "zip": [{f"policies[{p}].cache.capacity": caps for p in ("lru", "belady", "lfu", "fifo")}]}, out=out)
    return load_results(out)


def _xticks(ax) -> list[float]:
    return [float(t) for t in ax.get_xticks()]


def test_hit_rate_on_a_batch_sweep_is_against_batch_size(batch_rows):
    fig = plots.plot_hit_rate(batch_rows.ok, batch_rows.axes)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and _xticks(ax) == [1, 2, 4, 8]
    assert "batch size" in fig.get_supxlabel()
    lines = [line for line in ax.get_lines() if line.get_label() in ("lru", "belady")]
    assert len(lines) == 2 and all(sorted(line.get_xdata()) == [1, 2, 4, 8] for line in lines)
    assert ax.get_ylim() == (0, 100)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["1", "2", "4", "8"]            # plain integers, no 2^k, no minor labels
    assert isinstance(ax.xaxis.get_minor_formatter(), NullFormatter)


def test_cache_sweep_is_plotted_against_capacity_in_panels(cache_rows):
    df, axes = cache_rows.ok, cache_rows.axes
    assert plots.plot_latency(df, axes) is None       # one batch size: no latency-vs-batch plot
    assert plots.plot_dedup(df, axes) is None
    fig = plots.plot_latency_capacity(df, axes)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["batch_locality=0.1", "batch_locality=0.9"]
    for ax in panels:
        cached = [line for line in ax.get_lines() if line.get_label() in ("lru", "belady", "lfu", "fifo")]
        assert len(cached) == 4
        assert {tuple(line.get_xdata()) for line in cached} == {(2, 8, 32, 64)}
        ref = [line for line in ax.get_lines() if line.get_label() == "per-item (no cache)"]
        assert len(ref) == 1 and ref[0].get_linestyle() == ":"
        assert _xticks(ax) == [2, 8, 32, 64] and ax.get_xscale() == "log"
    ys = [y for ax in panels for line in ax.get_lines() for y in line.get_ydata()]
    assert (panels[0].get_yscale() == "log") == (max(ys) / min(ys) > plots.LOG_SPAN)
    hit = plots.plot_hit_rate(df, axes)
    assert "capacity" in hit.get_supxlabel() and len([a for a in hit.axes if a.get_visible()]) == 2


def test_time_split_draws_busy_times_overlapping_from_zero_on_a_log_axis(batch_rows):
    fig = plots.plot_time_split(batch_rows.ok, batch_rows.axes)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["B=1", "B=2", "B=4", "B=8"]
    ax = panels[-1]
    bars = ax.patches
    lefts = {round(b.get_x(), 12) for b in bars}
    assert len(lefts) == 1                              # every bar starts at the axis floor: overlaid
    n = len(ax.get_yticks())
    transfer, compute = bars[:n], bars[n:2 * n]
    g = batch_rows.ok[batch_rows.ok["batch_size"] == 8]
    floor = bars[0].get_x()
    assert [b.get_x() + b.get_width() for b in transfer] == pytest.approx(list(g["transfer_ms"].clip(lower=floor)))
    assert [b.get_x() + b.get_width() for b in compute] == pytest.approx(list(g["compute_ms"].clip(lower=floor)))
    times = batch_rows.ok[["compute_ms", "transfer_ms", "cpu_ms", "latency_mean_ms"]].to_numpy().ravel()
    times = times[times > 0]
    assert (ax.get_xscale() == "log") == (times.max() / times.min() > plots.LOG_SPAN)


def test_many_series_change_style_and_marker_past_ten_colours():
    assert plots.style(0)["color"] == plots.style(10)["color"]
    assert plots.style(0)["linestyle"] != plots.style(10)["linestyle"]
    assert plots.style(0)["marker"] != plots.style(10)["marker"]
    from simulator.runner import run_scenario
    from simulator.scenario import parse_scenario
    from simulator.sweep import flatten_summary, policy_context, scenario_context

    pols = [{"name": f"lru{c}", "cache": {"kind": "lru", "capacity": c}} for c in range(1, 13)]
    sc = parse_scenario(scenario_dict(policies=pols, replications=1, batch_sizes=[1, 4]))
    res = run_scenario(sc)
    import pandas as pd

    df = pd.DataFrame([{**scenario_context(sc, res.profile), **policy_context(sc, r["policy"]), **flatten_summary(r)}
                       for r in res.summary])
    fig = plots.plot_latency(df.assign(cache="none"), [])      # 12 policies, no axis to facet by: one panel
    lines = fig.axes[0].get_lines()
    assert len(lines) == 12
    looks = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in lines}
    assert len(looks) == 12


def test_many_configurations_are_faceted(tmp_path):
    base = scenario_dict(policies=POLICIES[:2], replications=1, batch_sizes=[1, 4])
    sweep({"name": "f", "base": base, "grid": {"trace.zipf": [0.0, 0.5, 1.0], "trace.temporal": [0.0, 0.5]}},
          out=tmp_path)
    res = load_results(tmp_path)
    fig = plots.plot_latency(res.ok, res.axes)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) > 1
    assert all(len(ax.get_lines()) <= plots.FACET_SERIES for ax in panels)


def test_validation_log_axes_label_no_minor_ticks():
    from calibrate.validation.validate import _readable_log_ticks

    fig = Figure()
    a, b = fig.subplots(1, 2)
    a.scatter([8, 12, 20], [9, 13, 19])
    a.set(xscale="log", yscale="log")
    b.plot([1, 4, 16, 64], [1, 2, 3, 4])
    _readable_log_ticks(a, b, [1, 4, 16, 64])
    assert isinstance(a.xaxis.get_minor_formatter(), NullFormatter)
    assert isinstance(a.yaxis.get_minor_formatter(), NullFormatter)
    assert b.get_xscale() == "log" and _xticks(b) == [1, 4, 16, 64]
    fig.canvas.draw()
    labels = [t.get_text() for t in a.get_xticklabels() if t.get_text()]
    assert labels and all("^" not in s and "$" not in s for s in labels)
