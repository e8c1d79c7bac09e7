"""`simmoe report`: the study's tables from a run or sweep folder, plots, Markdown and HTML."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

import simmoe
from simmoe.cli import main
from simmoe.plots import uniform_dedup_savings
from simmoe.report import fmt_ms, fmt_pct, fmt_ratio, fmt_share, write_report
from simulator.sweep import sweep

RUN = {
    "name": "rep",
    "model": {"preset": "published-study", "num_layers": 2, "num_experts": 16},
    "replications": 2,
    "batch_sizes": [1, 4, 8],
    "trace": {"generator": "mixed", "steps": 6, "zipf": 0.5, "batch_locality": 0.5, "batch_pool": 4},
    "engine": {"warmup_steps": 1},
    "policies": [
        {"name": "per-item", "load": "per-item", "memory": "pageable"},
        {"name": "dedup", "load": "dedup"},
        {"name": "lru", "cache": {"kind": "lru", "capacity": 8}},
    ],
}
SECTIONS = ["## Computation vs memory transfer (per-item baseline)", "## Deduplication savings by batch size (1 to 64)",
            "## Policy comparison", "## Plots"]
PLOTS = ["latency", "dedup", "hit_rate", "time_split", "bytes_per_token"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    simmoe.run(RUN).save(out)
    write_report(out)
    return out


def _row(md: str, *cells: str) -> str:
    """The one table line of ``md`` that starts with ``cells``."""
    start = "| " + " | ".join(cells) + " |"
    lines = [line for line in md.splitlines() if line.startswith(start)]
    assert len(lines) == 1, f"{start!r}: {lines}"
    return lines[0]


def test_report_has_the_sections_and_numbers_from_summary_json(run_folder):
    md = (run_folder / "report.md").read_text()
    for s in SECTIONS:
        assert s in md
    md = md[md.index("## Computation"):]      # the study's tables (the decision table is tests/test_ux.py's)
    summary = {(r["policy"], r["batch_size"]): r for r in json.loads((run_folder / "summary.json").read_text())["results"]}
    steps = pd.read_parquet(run_folder / "steps.parquet")
    for b in (1, 4, 8):
        base = summary[("per-item", b)]
        comp, xfer = base["compute_ms"] / 2, base["transfer_ms"] / 2          # per MoE layer (2 layers)
        line = _row(md, str(b), "2")
        assert f"| {fmt_ms(comp)} | {fmt_ms(xfer)} | memory transfer | {fmt_ratio(xfer / comp)} |" in line
        d = summary[("dedup", b)]
        bw = 1 - d["bytes_h2d"] / (d["requests"] * 28311552)
        uni = uniform_dedup_savings(16, 2, [b])[0]
        g = steps[(steps["policy"] == "dedup") & (steps["batch_size"] == b) & (steps["step"] >= 1)]
        reuse = ((g["requests"] - g["unique_requests"]) / g["requests"]).max()   # the seed's definition
        assert 0 <= reuse < 1
        _row(md, str(b), fmt_pct(d["dedup_savings"]), fmt_pct(bw), fmt_share(reuse), fmt_pct(uni))
        for pol in ("per-item", "dedup", "lru"):
            r = summary[(pol, b)]
            lat = r["step_latency_ms"]
            half = (lat["ci95"][1] - lat["ci95"][0]) / 2
            line = _row(md, str(b), pol)
            assert f"| {fmt_ms(lat['mean'])} ± {fmt_ms(half)} |" in line
            assert line.endswith(f"| {fmt_ratio(base['step_latency_ms']['mean'] / lat['mean'])} |")
            assert f"| {fmt_pct(r['hit_rate'])} |" in line
    assert "Study configurations not in these results: batch 1 x 1 expert" in md
    assert "Batch sizes not in these results: 2, 16, 32, 64." in md


def test_plots_are_written_and_embedded(run_folder):
    for name in PLOTS:
        assert (run_folder / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (run_folder / "plots" / f"{name}.svg").read_bytes()[:400]
        assert f"](plots/{name}.png)" in (run_folder / "report.md").read_text()
    page = (run_folder / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == len(PLOTS)
    assert "<h2>Policy comparison</h2>" in page and "plots/" not in page      # self-contained


def test_report_says_what_a_run_folder_lacks(tmp_path):
    out = tmp_path / "run"
    simmoe.run({**RUN, "policies": RUN["policies"][1:]}).save(out, fmt="csv")
    (out / "steps.csv").unlink()
    write_report(out)
    md = (out / "report.md").read_text()
    assert "No per-item policy in these results" in md
    assert "the maximum reuse factor is not available" in md
    assert "speed-up is over `dedup`" in md


STUDY = {
    "name": "study",
    "base": {
        "name": "study", "model": {"preset": "published-study", "num_layers": 1}, "profile": "rtx3090-published",
        "replications": 1, "batch_sizes": [1], "trace": {"generator": "uniform", "steps": 4},
        "policies": [{"name": "per-item-pageable", "load": "per-item", "memory": "pageable"},
                     {"name": "dedup-pageable", "load": "dedup", "memory": "pageable"}],
    },
    "grid": {"model.top_k": [1, 10], "batch_sizes": [1, 2, 4]},
}


def test_sweep_of_the_study_grid_fills_table_one_with_published_figures(tmp_path):
    df = sweep(STUDY, workers=1, out=tmp_path / "s")
    write_report(tmp_path / "s")
    md = (tmp_path / "s" / "report.md").read_text()
    assert "Study configurations not in these results" not in md
    assert "Points: 6 (0 failed)" in md
    for b, k, pub_c, pub_t in [(1, 1, 4.72, 3.47), (4, 10, 12.41, 146.60)]:
        r = df[(df["batch_size"] == b) & (df["top_k"] == k) & (df["policy"] == "per-item-pageable")].iloc[0]
        line = _row(md, str(b), str(k), fmt_ms(r["compute_ms"]), fmt_ms(r["transfer_ms"]))
        assert line.endswith(f"| {fmt_ms(pub_c)} | {fmt_ms(pub_t)} |")


def test_partial_sweep_and_failures_are_reported(tmp_path):
    bad = {**STUDY, "grid": {"batch_sizes": [1, 2], "trace": [STUDY["base"]["trace"], {"path": "missing.npz"}]}}
    sweep(bad, workers=1, out=tmp_path / "s", chunk=1)
    (tmp_path / "s" / "results.parquet").unlink()
    sorted((tmp_path / "s" / "parts").glob("part-*"))[0].unlink()            # point 0 lost
    write_report(tmp_path / "s")
    md = (tmp_path / "s" / "report.md").read_text()
    assert "Partial sweep: 3 of 4 points finished" in md
    assert "## Failed points" in md and "missing.npz" in md


def test_cli_report(tmp_path, run_folder):
    res = CliRunner().invoke(main, ["report", str(run_folder), "-o", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "report.html").is_file() and (tmp_path / "r" / "plots" / "dedup.svg").is_file()
    res = CliRunner().invoke(main, ["report", str(tmp_path / "nothing")])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [f"error: {tmp_path / 'nothing'}: DIR: not a run or sweep folder "
                                               "(no summary.json or sweep.json)"]
