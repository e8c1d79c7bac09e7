"""The live executor runs the simulator's plans: identical decisions, on the CPU here (CI has
no GPU) and on CUDA where present (`-m gpu`)."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from calibrate.validation.validate import validate  # noqa: E402
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
    from calibrate.measurements.provenance import host_identity

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
    # a CPU's timings say nothing of a GPU's: decisions only, no latency error
    assert "median |error|" not in r.stdout and "decisions identical: True" in r.stdout
    assert "checks decisions only" in r.stdout


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


def test_host_now_probes_every_row_on_cpu(tmp_path):
    """--host-now: calibration's probes run between the replays (and once after), the row is
    simulated again with their medians, and the report carries both errors."""
    sc = parse_scenario(tiny_scenario(batch_sizes=[5], policies=[POLICIES[0], POLICIES[1], POLICIES[-1]]))
    report = validate(sc, profile=str(tiny_profile(tmp_path)), device="cpu", repeats=2, host_now=True,
                      host_window_s=0.0)
    by = {r["policy"]: r for r in report["rows"]}
    for r in by.values():
        assert r["host_now"]["probes"] == r["repeats"] + 1
        assert r["sim_now_median_ms"] > 0
        assert r["error_now_pct"] == pytest.approx((r["sim_now_median_ms"] - r["live_median_ms"]) / r["live_median_ms"] * 100)
        assert r["host_now"]["compute_us"] > 0 and r["host_us"]["dense"]["now"] == pytest.approx(r["host_now"]["dense_us"])
    assert "pageable_copy_ms" in by["per-item-pageable"]["host_now"] and "pageable_copy_ms" not in by["dedup"]["host_now"]
    cpu_keys = [k for k in by["cpu-miss"]["host_now"] if k.startswith("cpu_ms@")]
    assert cpu_keys == ["cpu_ms@1", "cpu_ms@64"]          # the tiny table's points a 5-token step can look up
    assert by["cpu-miss"]["host_us"]["cpu"]["now"] > 0
    errs = [abs(r["error_now_pct"]) for r in report["rows"]]
    assert report["host_now"]["worst_abs_error_pct"] == pytest.approx(max(errs))
    default = validate(sc, profile=str(tiny_profile(tmp_path)), device="cpu", repeats=1)
    assert default["host_now"] is None and default["rows"][0]["error_now_pct"] is None   # off by default on the CPU


def test_profile_now_replaces_only_the_host_terms(tmp_path):
    from calibrate.measurements.host_now import cpu_probe_tokens, profile_now
    from simulator.models import get_preset
    from simulator.profile import CostModel

    prof = load_profile("h100-pcie5")
    m = get_preset("published-study")
    base = CostModel(prof, m.shape_key, m.expert_bytes, 0, 64)
    # the profile's own host terms, as probes would read them: the profile comes back unchanged
    own = {"load_us": prof.host.launch_us.copy_, "compute_us": prof.host.launch_us.expert,
           "dense_us": prof.host.launch_us.dense,
           "pageable_copy_ms": base.copy_ms(m.expert_bytes, "pageable") + base.launch_copy,
           "pageable_compute_us": prof.host.launch_us.expert + prof.host.pageable_tail_us,
           **{f"cpu_ms@{t}": ms for t, ms in prof.compute.cpu[m.shape_key][:2]}}
    same, _ = profile_now(prof, m, [own])
    c = CostModel(same, m.shape_key, m.expert_bytes, 0, 64)
    for t in (1, 2, 3, 64):
        assert c.cpu_expert_ms(t) == pytest.approx(base.cpu_expert_ms(t)) and c.expert_ms(t) == base.expert_ms(t)
    assert c.copy_ms(m.expert_bytes, "pageable") == pytest.approx(base.copy_ms(m.expert_bytes, "pageable"))
    assert c.pageable_tail == pytest.approx(base.pageable_tail)
    # a slower host: the medians of the samples replace the host terms; GPU terms stay
    slow = [dict(own, **{k: v * f for k, v in own.items()}) for f in (1.5, 2.0, 9.0)]
    now, med = profile_now(prof, m, slow)
    c = CostModel(now, m.shape_key, m.expert_bytes, 0, 64)
    assert med["cpu_ms@1"] == pytest.approx(2 * own["cpu_ms@1"])
    for t in (1, 2, 64):         # past the probed points: the profile's, scaled as the last probed one
        assert c.cpu_expert_ms(t) == pytest.approx(2 * base.cpu_expert_ms(t))
    assert c.launch_expert == pytest.approx(2 * base.launch_expert)
    assert c.copy_ms(m.expert_bytes, "pageable") + c.launch_copy == pytest.approx(2 * own["pageable_copy_ms"])
    assert c.copy_ms(m.expert_bytes, "pinned") == base.copy_ms(m.expert_bytes, "pinned")
    assert c.expert_ms(8) == base.expert_ms(8)
    assert now.provenance["host_terms"].startswith("measured")
    assert cpu_probe_tokens(prof, m.shape_key, 1) == [1]
    assert cpu_probe_tokens(prof, m.shape_key, 5) == [1, 2, 4, 8]


def test_host_now_probes_within_a_long_replay(tmp_path, monkeypatch):
    import calibrate.validation.validate as v

    monkeypatch.setattr(v, "PROBE_EVERY_S", 0.0)        # every step is "long": a probe between each two
    sc = parse_scenario(tiny_scenario(batch_sizes=[2], policies=POLICIES[1:2]))
    r = validate(sc, profile=str(tiny_profile(tmp_path)), device="cpu", repeats=2, host_now=True)["rows"][0]
    steps = sc.trace.steps
    assert r["host_now"]["probes"] == r["repeats"] * steps + 1   # before each replay, between its steps, after


def test_host_bound_rows_replay_over_the_host_window(tmp_path, monkeypatch):
    """With host-now, a row the host paces (pageable loads, CPU-miss) alternates replays and probes
    until the window is spent (at most MAX_REPEATS replays); a copy-engine row keeps --repeats.
    The replay-to-replay spread is reported once there are two replays."""
    import calibrate.validation.validate as v

    monkeypatch.setattr(v, "MAX_REPEATS", 3)
    sc = parse_scenario(tiny_scenario(batch_sizes=[2], policies=[POLICIES[0], POLICIES[1], POLICIES[-1]]))
    prof = str(tiny_profile(tmp_path))
    long = {r["policy"]: r for r in validate(sc, profile=prof, device="cpu", repeats=2, host_now=True,
                                             host_window_s=600.0)["rows"]}
    assert [long[p]["repeats"] for p in ("per-item-pageable", "dedup", "cpu-miss")] == [3, 2, 3]
    assert all(r["host_now"]["probes"] == r["repeats"] + 1 for r in long.values())
    assert all(r["live_spread_pct"] >= 0 for r in long.values())
    short = {r["policy"]: r for r in validate(sc, profile=prof, device="cpu", repeats=2, host_now=True,
                                              host_window_s=0.0)["rows"]}
    assert [short[p]["repeats"] for p in ("per-item-pageable", "dedup", "cpu-miss")] == [1, 2, 1]
    assert short["cpu-miss"]["live_spread_pct"] is None
    off = validate(sc, profile=prof, device="cpu", repeats=2, host_window_s=600.0)["rows"]   # no host-now: no window
    assert [r["repeats"] for r in off] == [2, 2, 2]
