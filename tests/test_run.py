"""`simmoe run` end to end: outputs, reproducibility, the shipped scenarios, help texts."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from simmoe.cli import main
from simulator.scenario import load_scenario

from conftest import REPO, scenario_dict

SUMMARY_KEYS = {"requests", "unique_requests", "dedup_savings", "transfers", "bytes_h2d", "hits", "misses",
                "hit_rate", "prefetches_issued", "prefetches_used", "step_latency_ms", "compute_ms",
                "transfer_ms", "stall_ms", "tokens_per_s"}


def run_cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.stderr + r.stdout
    return r


def small(tmp_path, **over):
    d = scenario_dict(policies=[
        {"name": "per-item", "load": "per-item", "memory": "pageable"},
        {"name": "dedup", "load": "dedup"},
        {"name": "lru-prefetch", "cache": {"kind": "lru", "capacity": 24}, "prefetch": {"kind": "predicted", "accuracy": 0.7}},
    ], **over)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_outputs(tmp_path):
    out = tmp_path / "out"
    r = run_cli("run", small(tmp_path), "-o", out)
    assert "lru-prefetch" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["results"]
    assert len(rows) == 3 * 2
    for row in rows:
        assert SUMMARY_KEYS <= set(row)
        lat = row["step_latency_ms"]
        assert lat["ci95"][0] <= lat["mean"] <= lat["ci95"][1]
        assert lat["p50"] <= lat["p99"]
        assert row["bytes_h2d"] == row["transfers"] * summary["model"]["expert_bytes"]
    steps = pd.read_parquet(out / "steps.parquet")
    assert set(steps["policy"]) == {"per-item", "dedup", "lru-prefetch"}
    assert len(steps) == 3 * 2 * 2 * 6       # policies x batch sizes x replications x steps
    eff = yaml.safe_load((out / "scenario.yaml").read_text())
    assert eff["model"]["expert_bytes"] if "expert_bytes" in eff["model"] else eff["model"]["hidden"] == 768
    assert eff["policies"][2]["prefetch"]["accuracy"] == 0.7
    assert json.loads((out / "profile.json").read_text())["format"] == "simmoe-profile"


def test_same_seed_same_bits_other_seed_other_numbers(tmp_path):
    s = small(tmp_path)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run_cli("run", s, "-o", tmp_path / name, "--seed", seed, "-q")
    # bit for bit, all but the provenance (time, command line)
    a, b, c = (json.dumps({k: v for k, v in json.loads((tmp_path / n / "summary.json").read_text()).items()
                           if k != "provenance"}) for n in "abc")
    assert a == b
    assert a != c
    assert (tmp_path / "a" / "summary.csv").read_bytes() == (tmp_path / "b" / "summary.csv").read_bytes()
    pa, pb = (pd.read_parquet(tmp_path / n / "steps.parquet") for n in "ab")
    pd.testing.assert_frame_equal(pa, pb, check_exact=True)


def test_csv_format_and_overrides(tmp_path):
    out = tmp_path / "o"
    run_cli("run", small(tmp_path), "-o", out, "--format", "csv", "-b", "2,3", "-r", "1", "-q")
    steps = pd.read_csv(out / "steps.csv")
    assert sorted(steps["batch_size"].unique()) == [2, 3]
    assert steps["replication"].max() == 0


@pytest.mark.parametrize("name", ["locality_high", "locality_low", "mixtral_8x7b"])
def test_shipped_scenarios_validate(name):
    sc, _ = load_scenario(REPO / "scenarios" / f"{name}.yaml")
    assert sc.name == name and len(sc.policies) >= 4


def test_locality_high_runs_and_dedup_helps(tmp_path):
    out = tmp_path / "lh"
    run_cli("run", REPO / "scenarios" / "locality_high.yaml", "-o", out, "-r", "2", "-b", "1,16", "-q")
    rows = {(r["policy"], r["batch_size"]): r for r in json.loads((out / "summary.json").read_text())["results"]}
    base, dedup = rows[("per-item-pageable", 16)], rows[("dedup-pageable", 16)]
    assert dedup["bytes_h2d"] < base["bytes_h2d"]
    assert dedup["step_latency_ms"]["mean"] < base["step_latency_ms"]["mean"]
    assert rows[("per-item-pageable", 1)]["dedup_savings"] == 0
    assert rows[("dedup-lru-oracle", 16)]["hit_rate"] > rows[("dedup-lru", 16)]["hit_rate"]


@pytest.mark.parametrize("cmd", [[], ["run"], ["trace"], ["trace", "gen"], ["profile", "list"], ["models"]])
def test_help_explains(cmd):
    r = CliRunner().invoke(main, cmd + ["--help"])
    assert r.exit_code == 0 and len(r.stdout) > 200


def test_trace_gen_and_show(tmp_path):
    out = tmp_path / "t.npz"
    run_cli("trace", "gen", "-m", "mixtral-8x7b", "-b", "4", "-s", "5", "-g", "zipf", "--zipf", "1.2", "-o", out)
    r = run_cli("trace", "show", out)
    assert "5 steps" in r.stdout and "top-2 of 8" in r.stdout
    bad = CliRunner().invoke(main, ["trace", "gen", "-g", "uniform", "--zipf", "1", "-o", str(out)])
    assert bad.exit_code == 2 and "has no knob 'zipf'" in bad.stderr


def test_profile_and_models_listing():
    r = run_cli("profile", "list")
    assert "h100-pcie5 (default)" in r.stdout and "rtx3090-published: published measurements" in r.stdout
    r = run_cli("models")
    assert "27.0 MiB" in r.stdout and "336.0 MiB" in r.stdout
