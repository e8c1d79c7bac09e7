"""The live executor runs the simulator's plans: identical decisions, on the CPU here (CI has
no GPU) and on CUDA where present (`-m gpu`)."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from calibrate.validate import validate  # noqa: E402
from simmoe.cli import main  # noqa: E402
from simulator.profile import load_profile, parse_profile  # noqa: E402
from simulator.scenario import parse_scenario  # noqa: E402

SHAPE = "64x128-fp32-gated"
POLICIES = [
    {"name": "per-item-pageable", "load": "per-item", "memory": "pageable"},
    {"name": "dedup", "load": "dedup"},
    {"name": "coalesced-lru", "load": "coalesced", "cache": {"kind": "lru", "capacity": 5}},
    {"name": "lru-prefetch", "cache": {"kind": "lru", "capacity": 12}, "prefetch": {"kind": "predicted", "accuracy": 0.6}},
    {"name": "belady-1-slot", "cache": {"kind": "belady", "capacity": 1}},
    {"name": "static-hot", "cache": {"kind": "static-hot", "capacity": 10, "scope": "per-layer"}},
    {"name": "cpu-miss", "cache": {"kind": "lfu", "capacity": 6}, "miss": {"kind": "cpu", "max_tokens": 2}},
]


def tiny_profile(tmp_path):
    doc = load_profile("h100-probe").to_json()
    doc["name"] = "tiny"
    doc["compute"]["gpu"][SHAPE] = [[1, 0.02], [64, 0.05]]
    doc["compute"]["cpu"] = {SHAPE: [[1, 0.05], [64, 0.5]]}
    parse_profile(doc, "tiny")
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(doc))
    return p


def tiny_scenario(**over):
    d = {"name": "tiny", "model": {"name": "tiny", "num_layers": 3, "num_experts": 12, "top_k": 2, "hidden": 64,
                                   "ffn": 128, "dtype": "fp32"},
         "replications": 1, "batch_sizes": [1, 5], "seed": 4,
         "trace": {"generator": "mixed", "steps": 4, "zipf": 0.7, "temporal": 0.4},
         "engine": {"warmup_steps": 1}, "policies": POLICIES}
    d.update(over)
    return d


def test_live_cpu_decisions_identical(tmp_path):
    prof = tiny_profile(tmp_path)
    report = validate(parse_scenario(tiny_scenario()), profile=str(prof), device="cpu")
    assert report["decisions_identical"]
    rows = report["rows"]
    assert len(rows) == len(POLICIES) * 2
    by = {(r["policy"], r["batch_size"]): r for r in rows}
    assert by[("per-item-pageable", 5)]["transfers"] > by[("dedup", 5)]["transfers"]
    assert by[("cpu-miss", 5)]["misses"] > 0
    assert all(r["live_median_ms"] > 0 and r["sim_median_ms"] > 0 for r in rows)
    # host time per call kind: every measured step's layers, in every replay
    for r in rows:
        assert r["host_us"]["dense"]["calls"] == 3 * r["steps"] * r["repeats"]
        assert r["host_us"]["dense"]["live"] > 0 and r["host_us"]["dense"]["sim"] == pytest.approx(
            json.loads(prof.read_text())["host"]["launch_us"]["dense"])
    assert "pageable copy" in by[("per-item-pageable", 5)]["host_us"]
    assert "load" in by[("dedup", 5)]["host_us"] and "pageable copy" not in by[("dedup", 5)]["host_us"]
    assert by[("cpu-miss", 5)]["host_us"]["cpu"]["calls"] > 0
    assert set(report["host_drift"]) <= {"compute", "load", "pageable copy", "dense", "cpu"}
    assert report["environment"]["same_host_as_profile"] is None      # the tiny profile is no calibration


def test_validation_knows_its_host(tmp_path):
    from calibrate.provenance import host_identity

    doc = json.loads(tiny_profile(tmp_path).read_text())
    sc = parse_scenario(tiny_scenario(batch_sizes=[1], policies=POLICIES[1:2]))
    for boot, same in ((host_identity()["boot_id"], True), ("another-machine", False)):
        doc["provenance"]["boot_id"] = boot
        report = validate(sc, profile=parse_profile(doc, "tiny"), device="cpu", repeats=1)
        assert report["environment"]["same_host_as_profile"] is same


def test_validate_cli_on_cpu(tmp_path):
    s = tmp_path / "s.yaml"
    s.write_text(yaml.safe_dump(tiny_scenario(policies=POLICIES[:2])))
    out = tmp_path / "v"
    r = CliRunner().invoke(main, ["validate", str(s), "--device", "cpu", "-p", str(tiny_profile(tmp_path)),
                                  "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    rep = json.loads((out / "validation.json").read_text())
    assert rep["decisions_identical"] and (out / "validation.png").stat().st_size > 1000
    assert "median |error|" in r.stdout


def test_validate_errors(tmp_path):
    s = tmp_path / "s.yaml"
    s.write_text(yaml.safe_dump(tiny_scenario()))
    r = CliRunner().invoke(main, ["validate", str(s), "--device", "cpu"])   # default profile lacks the shape
    assert r.exit_code == 2 and "compute.gpu.64x128-fp32-gated" in r.stderr
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, ["validate", str(s), "--device", "cuda", "-p", str(tiny_profile(tmp_path))])
        assert r.exit_code == 2 and "use --device cpu" in r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_live_gpu_decisions_identical_and_latency_close(tmp_path):
    sc = parse_scenario(tiny_scenario(model={"preset": "published-study", "num_layers": 3, "num_experts": 12},
                                      batch_sizes=[1, 8]))
    report = validate(sc, profile=None, device="cuda")
    assert report["decisions_identical"]
    assert report["median_abs_error_pct"] < 25
