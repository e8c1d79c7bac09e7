"""Answers, not tables (issue 14): the decision summary, the 80-column table, CSV export,
provenance, and the rough edges of the command line."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from rich.console import Console

from simmoe.cli import main
from simulator.decision import decide, decision_lines
from simulator.errors import InputError
from simulator.runner import run_scenario
from simulator.scenario import parse_scenario

from conftest import REPO, scenario_dict

POLICIES = [
    {"name": "per-item-pageable", "load": "per-item", "memory": "pageable"},
    {"name": "dedup-pinned", "load": "dedup"},
    {"name": "dedup-lru-tiny", "cache": {"kind": "lru", "capacity": 2}},
    {"name": "dedup-lru-prefetch", "cache": {"kind": "lru", "capacity": 48}, "prefetch": {"kind": "oracle"}},
]


def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def result():
    return run_scenario(parse_scenario(scenario_dict(policies=POLICIES)))


# ------------------------------------------------------------------------ decision summary
def test_decision_best_baseline_and_speedup(result):
    by = {(r["policy"], r["batch_size"]): r for r in result.summary}
    for d in result.decision["per_batch"]:
        b = d["batch_size"]
        rows = [r for r in result.summary if r["batch_size"] == b]
        best = min(rows, key=lambda r: r["step_latency_ms"]["mean"])
        assert d["best"] == best["policy"]
        # default baseline: the fastest policy without a cache (per-item pageable is slower)
        assert d["baseline"] == "dedup-pinned" and d["baseline_rule"] == "fastest policy without a cache"
        assert d["speedup"] == pytest.approx(by[("dedup-pinned", b)]["step_latency_ms"]["mean"] /
                                             best["step_latency_ms"]["mean"])
        assert by[("per-item-pageable", b)]["speedup_vs_baseline"] < 1
        assert by[("dedup-pinned", b)]["speedup_vs_baseline"] == 1
        assert d["runner_up"] != d["best"] and d["distinguishable"] in (True, False)


def test_demand_and_prefetch_hits_are_separated(result):
    for r in result.summary:
        assert r["demand_hits"] + r["prefetch_hits"] == r["hits"]
        assert r["prefetch_hits"] == r["prefetches_used"]
    pre = [r for r in result.summary if r["policy"] == "dedup-lru-prefetch"]
    assert all(r["prefetch_hits"] > 0 for r in pre)
    assert all(r["prefetch_hits"] == 0 for r in result.summary if r["policy"] != "dedup-lru-prefetch")


def test_thrashing_warning_names_the_small_global_cache(result):
    warns = result.decision["warnings"]
    assert len(warns) == 2 and all("dedup-lru-tiny" in w and "prefetch" not in w for w in warns), warns
    assert warns[0].startswith("B=1: a global cache of 2 experts is smaller than one step's working set")


def test_named_baseline_and_unknown_baseline():
    res = run_scenario(parse_scenario(scenario_dict(policies=POLICIES, baseline="per-item-pageable",
                                                    replications=1, batch_sizes=[4])))
    d = res.decision["per_batch"][0]
    assert d["baseline"] == "per-item-pageable" and d["baseline_rule"] == "scenario key 'baseline'"
    assert d["speedup"] > 1
    with pytest.raises(InputError, match="baseline: 'nope' is not a policy of this scenario"):
        parse_scenario(scenario_dict(policies=POLICIES, baseline="nope"))


def _row(name, mean, lo, hi, b=1):
    return {"policy": name, "batch_size": b, "steps": 1, "hits": 0, "misses": 1, "prefetches_used": 0,
            "prefetches_wasted": 0, "unique_requests": 1, "step_latency_ms": {"mean": mean, "ci95": [lo, hi]}}


@pytest.mark.parametrize("second_lo, verdict", [(2.5, True), (1.5, False)])
def test_ci_verdict(second_lo, verdict):
    sc = parse_scenario(scenario_dict(policies=POLICIES[:2]))
    d = decide([_row("dedup-pinned", 1.0, 0.0, 2.0), _row("per-item-pageable", 3.0, second_lo, 4.0)], sc)
    assert d["per_batch"][0]["distinguishable"] is verdict
    text = " ".join(decision_lines(d))
    assert ("beats per-item-pageable (95% CIs apart)" in text) is verdict
    assert ("not distinguishable from per-item-pageable" in text) is not verdict


def test_every_policy_cached_falls_back_to_the_first_and_says_so():
    pols = [POLICIES[2], POLICIES[3]]
    res = run_scenario(parse_scenario(scenario_dict(policies=pols, replications=1, batch_sizes=[1])))
    d = res.decision["per_batch"][0]
    assert d["baseline"] == "dedup-lru-tiny" and "first policy" in d["baseline_rule"]


# -------------------------------------------------------------------- files and the table
def test_run_writes_decision_provenance_and_csv(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(scenario_dict(policies=POLICIES)))
    r = subprocess.run([sys.executable, "-m", "simmoe", "run", str(p), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"}, timeout=120)
    assert r.returncode == 0, r.stderr               # python -m simmoe works
    out = r.stdout
    assert max(len(line) for line in out.splitlines() if not line.startswith("wrote")) <= 80
    doc = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [d["batch_size"] for d in doc["decision"]["per_batch"]] == [1, 4]
    prov = doc["provenance"]
    assert prov["command"][:3] == ["python -m simmoe", "run", str(p)] and prov["simmoe_version"] == doc["simmoe_version"]
    assert prov["time_utc"].endswith("+00:00")
    assert prov["git_commit"] is None or len(prov["git_commit"]) == 40
    csv = pd.read_csv(tmp_path / "o" / "summary.csv")
    assert list(csv["policy"]) == [r["policy"] for r in doc["results"]]
    assert list(csv["latency_mean_ms"]) == pytest.approx([r["step_latency_ms"]["mean"] for r in doc["results"]])
    assert {"demand_hits", "prefetch_hits", "speedup_vs_baseline", "baseline"} <= set(csv.columns)
    assert "Decision (speed-up vs the baseline: fastest policy without a cache)" in out
    assert "warning: B=" in out


def test_table_fits_80_columns_with_whole_policy_names(result):
    from simmoe.display import LEGEND, summary_table

    buf = io.StringIO()
    Console(file=buf, width=80).print(summary_table(result))
    lines = buf.getvalue().splitlines()
    assert max(map(len, lines)) <= 80
    text = buf.getvalue()
    for p in POLICIES:
        assert p["name"] in text          # not cut to "dedu..."
    assert "…" not in text and "x base" in text and "x base" in LEGEND


def test_report_leads_with_the_decision(tmp_path, result):
    from simmoe.report import write_report
    from simulator.output import write_results

    write_results(result, tmp_path / "run")
    write_report(tmp_path / "run")
    md = (tmp_path / "run" / "report.md").read_text()
    assert md.index("## Decision") < md.index("## Computation")
    for d in result.decision["per_batch"]:
        verdict = "yes" if d["distinguishable"] else "not distinguishable"
        assert f"| {d['batch_size']} | {d['best']} |" in md and f"| {verdict} |" in md
    assert "_Warning: B=" in md and "dedup-lru-tiny" in md


# ------------------------------------------------------------------------------ rough edges
def test_cli_imports_neither_pandas_nor_scipy():
    code = ("import sys, simmoe.cli; heavy = [m for m in ('pandas', 'scipy', 'simulator.runner', 'simpy') "
            "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_profile_show_summary_json_and_unknown_name():
    code, out, _ = invoke("profile", "show", "h100-pcie5")
    assert code == 0 and out.startswith("h100-pcie5: calibrated")
    assert "copy h2d pinned:" in out and "compute gpu 768x3072-fp32-gated:" in out and len(out) < 5000
    code, out, _ = invoke("profile", "show", "h100-pcie5", "--json")
    assert code == 0 and json.loads(out)["name"] == "h100-pcie5"
    code, _, err = invoke("profile", "show", "nope")
    assert code == 2 and err.startswith("error: command line: PROFILE: unknown profile 'nope'") and "--profile" not in err


def test_trace_show_reads_an_import_and_names_other_files(tmp_path):
    from simulator.traces.real import SequenceWriter

    rng = np.random.default_rng(0)
    with SequenceWriter(tmp_path / "seq.npz", num_experts=8) as w:
        for i, n in enumerate((3, 5)):
            w.add(np.stack([rng.permutation(8)[:4].reshape(2, 2) for _ in range(n)]), f"s{i}")
    code, out, err = invoke("trace", "show", tmp_path / "seq.npz")
    assert code == 0, err
    assert "sequence set (from `trace import`) of 2 sequences, 8 tokens (per sequence 3 to 5" in out
    (tmp_path / "r.csv").write_text("Layer ID,Token\n1,a\n")
    code, _, err = invoke("trace", "show", tmp_path / "r.csv")
    assert code == 2 and "r.csv: trace: not a simmoe .npz" in err and "simmoe trace import" in err


def test_real_trace_scenario_outside_the_layout_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("SIMMOE_TRACE_DIR", raising=False)
    p = tmp_path / "scenarios" / "ds.yaml"
    p.parent.mkdir()
    p.write_text((REPO / "scenarios" / "deepseek_v2_lite_real.yaml").read_text())
    code, _, err = invoke("run", p, "-o", tmp_path / "o", "-q")
    assert code == 2 and "trace.sequences.path: not found; get it from https://github.com/ngavhane/moe-beyond" in err
    assert not (tmp_path / "o").exists()


def test_trace_stats_warns_when_the_batch_repeats_sequences(tmp_path):
    from simulator.traces.real import SequenceWriter

    rng = np.random.default_rng(1)
    with SequenceWriter(tmp_path / "seq.npz", num_experts=8) as w:
        for i in range(3):
            w.add(np.stack([rng.permutation(8)[:4].reshape(2, 2) for _ in range(6)]), f"s{i}")
    code, out, err = invoke("trace", "stats", tmp_path / "seq.npz", "-b", "1,8", "--json", tmp_path / "st.json")
    assert code == 0, err
    st = json.loads((tmp_path / "st.json").read_text())
    by = {r["batch_size"]: r for r in st["batch_dedup"]}
    assert by[1]["repeated"] == 0 and by[8]["repeated"] == by[8]["sequences_admitted"] - 3 > 0
    assert st["warnings"] == [w for w in st["warnings"] if w.startswith("batch dedup at B=8")] and st["warnings"]
    assert "warning: batch dedup at B=8: the batch decoded" in out and "B=1:" not in out


# ----------------------------------------------------------------------------- JSON Schema
def test_shipped_schema_is_current_and_checks_the_shipped_scenarios(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from simulator.schema import schema_text

    shipped = (REPO / "docs" / "scenario.schema.json").read_text()
    assert shipped == schema_text(), "regenerate: simmoe schema -o docs/scenario.schema.json"
    code, out, _ = invoke("schema")
    assert code == 0 and out == shipped
    schema = json.loads(shipped)
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    scenarios = [p for p in sorted((REPO / "scenarios").glob("*.yaml")) if "policies" in yaml.safe_load(p.read_text())]
    assert len(scenarios) >= 5
    for p in scenarios:
        assert not list(v.iter_errors(yaml.safe_load(p.read_text()))), p
    good = scenario_dict(policies=POLICIES, baseline="dedup-pinned")
    assert not list(v.iter_errors(good))
    for bad in ({**good, "bogus": 1}, {**good, "model": "gpt-5"},
                {**good, "policies": [{"name": "x", "cache": {"kind": "nope", "capacity": 4}}]},
                {**good, "policies": [{"name": "x", "cache": {"kind": "lru", "capacity": "4 gigs"}}]}):
        assert list(v.iter_errors(bad))
