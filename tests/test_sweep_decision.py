"""A sweep gets the decision summary: per point and batch size, on the terminal, in
OUT/decision.json and OUT/decision.csv, and in the report."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from simmoe.cli import main
from simmoe.report import write_report
from simulator.decision import point_label, sweep_decision, sweep_decision_lines

from conftest import scenario_dict

POLICIES = [{"name": "dedup"}, {"name": "lru-tiny", "cache": {"kind": "lru", "capacity": 2}},
            {"name": "lru", "cache": {"kind": "lru", "capacity": 32}}]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd")
    base = tmp / "base.yaml"
    base.write_text(yaml.safe_dump(scenario_dict(policies=POLICIES, replications=2, batch_sizes=[1, 4])))
    sw = tmp / "sw.yaml"
    sw.write_text(yaml.safe_dump({"name": "sd", "base": str(base), "grid": {"trace.zipf": [0.0, 1.2]}}))
    r = CliRunner().invoke(main, ["sweep", str(sw), "-j", "1", "-o", str(tmp / "out")])
    assert r.exit_code == 0, r.stderr
    return tmp / "out", r.stdout


def test_decision_files_hold_one_decision_per_point_and_batch(swept):
    out, _ = swept
    doc = json.loads((out / "decision.json").read_text())
    assert doc["format"] == "simmoe-sweep-decision" and "provenance" in doc
    per = doc["per_point"]
    assert [(e["point"], e["batch_size"]) for e in per] == [(0, 1), (0, 4), (1, 1), (1, 4)]
    rows = pd.read_parquet(out / "results.parquet")
    for e in per:
        g = rows[(rows["point"] == e["point"]) & (rows["batch_size"] == e["batch_size"])]
        best = g.loc[g["latency_mean_ms"].idxmin()]
        assert e["best"] == best["policy"] and e["trace.zipf"] == best["trace.zipf"]
        base = g[g["policy"] == e["baseline"]].iloc[0]
        assert e["baseline"] == "dedup"               # the only policy without a cache
        assert e["speedup"] == pytest.approx(base["latency_mean_ms"] / best["latency_mean_ms"])
        second = g.nsmallest(2, "latency_mean_ms").iloc[1]
        assert e["runner_up"] == second["policy"]
        assert e["distinguishable"] == bool(best["latency_ci95_hi"] < second["latency_ci95_lo"])
    assert sum(doc["best_counts"].values()) == len(per)
    assert any("lru-tiny" in w and w.startswith("point 0 (zipf=0.0): B=") for w in doc["warnings"])
    csv = pd.read_csv(out / "decision.csv")
    assert list(csv.columns[:3]) == ["point", "trace.zipf", "batch_size"] and len(csv) == len(per)
    assert list(csv["best"]) == [e["best"] for e in per]


def test_sweep_prints_the_decision_and_the_report_opens_with_it(swept):
    out, stdout = swept
    assert "Decision per configuration (speed-up vs each point's baseline: fastest policy without a cache)" in stdout
    assert "  point 1 (zipf=1.2) B=4: " in stdout and "warning: point 0 (zipf=0.0): B=1: a global cache" in stdout
    md = write_report(out)[0].read_text()
    assert md.index("## Decision") < md.index("## Policy comparison")
    assert "| point 1 (zipf=1.2) | 4 |" in md


def test_lines_are_capped_and_labels_name_zip_partners_once():
    entry = {"point": 3, "a.cache.capacity": 8, "b.cache.capacity": 8, "trace.zipf": 0.5}
    assert point_label(entry, ["a.cache.capacity", "b.cache.capacity", "trace.zipf"]) == \
        "point 3 (capacity=8, zipf=0.5)"
    rows = []
    for p in range(20):
        for pol, lat in (("x", 2.0), ("y", 1.0)):
            rows.append({"point": p, "batch_size": 1, "policy": pol, "latency_mean_ms": lat, "latency_ci95_lo": lat - .1,
                         "latency_ci95_hi": lat + .1, "baseline": "x", "baseline_rule": "r", "expert_bytes": 10,
                         "speedup_vs_baseline": 2.0 / lat, "hits": 0, "prefetches_used": 0, "prefetches_wasted": 0,
                         "trace.zipf": p / 10, "decision_warnings": f"w{p}"})
    dec = sweep_decision(rows, ["trace.zipf"])
    assert dec["best_counts"] == {"y": 20}
    lines = sweep_decision_lines(dec, where="OUT/decision.csv")
    assert lines[1] == "  best policy: y in 20 of 20 (configuration x batch size)"
    assert "  ... 8 more configurations in OUT/decision.csv" in lines
    assert lines[-1] == "warning: ... 17 more warnings (of 20) in OUT/decision.json"
