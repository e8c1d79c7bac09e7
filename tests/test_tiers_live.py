"""The tier paths of the live (twin) executor on the CPU: the same decisions as the simulator
(the executor counts what it ran: copies, bytes, dequantise steps, direct reads, disk reads of
a real file), and the quantised bytes dequantise to the weights they came from."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from calibrate.executors.quant import dequantise, quantise  # noqa: E402
from calibrate.validation.validate import validate  # noqa: E402
from simulator.scenario import parse_scenario  # noqa: E402
from test_live import tiny_profile, tiny_scenario  # noqa: E402

POLICIES = [
    {"name": "int8", "cache": {"kind": "lru", "capacity": 6}, "expert_dtype": "int8"},
    {"name": "int4-prefetch", "cache": {"kind": "lru", "capacity": 12}, "expert_dtype": "int4",
     "prefetch": {"kind": "predicted", "accuracy": 0.6}},
    {"name": "direct", "cache": {"kind": "lru", "capacity": 6}, "miss": "direct"},
    {"name": "cheapest-fp8", "cache": {"kind": "lru", "capacity": 6}, "miss": "cheapest", "expert_dtype": "fp8"},
    {"name": "ssd-coalesced", "load": "coalesced", "cache": {"kind": "lru", "capacity": 6},
     "host": {"kind": "lfu", "capacity": 10}, "disk": {"io": "buffered", "queue_depth": 3}},
    {"name": "ssd-lookahead", "cache": {"kind": "lru", "capacity": 8}, "prefetch": {"kind": "predicted", "accuracy": 0.6},
     "host": {"kind": "lru", "capacity": 14, "lookahead": 1}, "miss": "cheapest", "expert_dtype": "int8"},
    {"name": "ssd-ring-cpu", "cache": {"kind": "fifo", "capacity": 4}, "miss": {"kind": "cpu", "max_tokens": 2},
     "host": {"kind": "none", "capacity": 12}},
]


def test_tier_decisions_identical_live_on_cpu(tmp_path):
    prof = tiny_profile(tmp_path)
    rep = validate(parse_scenario(tiny_scenario(policies=POLICIES)), profile=str(prof), device="cpu", repeats=1,
                   tier_dir=str(tmp_path))
    assert rep["decisions_identical"]
    by = {(r["policy"], r["batch_size"]): r for r in rep["rows"]}
    assert len(by) == 2 * len(POLICIES)
    assert by["int4-prefetch", 5]["bytes_h2d"] < by["int8", 5]["bytes_h2d"]
    assert by["direct", 5]["transfers"] == 0
    assert not list(tmp_path.glob("simmoe-experts-*"))        # the disk tier's files are removed


@pytest.mark.parametrize("dtype, tol", [("int8", 0.01), ("fp8", 0.07), ("int4", 0.15)])
def test_dequantise_gives_back_the_weights(dtype, tol):
    w = torch.randn(3 * 128 + 17, dtype=torch.bfloat16)
    raw = quantise(w, dtype)
    out = dequantise(raw, dtype, torch.empty_like(w))
    err = (out.float() - w.float()).abs().max() / w.float().abs().max()
    assert err < tol
    assert raw.dtype == torch.uint8


def test_calibrate_tiers_on_this_disk(tmp_path):
    """`simmoe calibrate tiers` on the CPU: the dequantise kernels and this machine's disk
    (buffered and O_DIRECT, depth 1 and 2) into a profile that loads; direct reads need CUDA."""
    import json

    from click.testing import CliRunner

    from simmoe.cli import main
    from simulator.profile import parse_profile

    out = tmp_path / "p.json"
    r = CliRunner().invoke(main, ["calibrate", "tiers", "-d", "cpu", "--quick", "--stage", "disk",
                                  "--disk-dir", str(tmp_path), "--depth", "2", "-o", str(out)])
    if r.exit_code == 2 and ("O_DIRECT" in r.output or "Invalid argument" in r.output):
        pytest.skip("this file system has no O_DIRECT")
    assert r.exit_code == 0, r.output
    p = parse_profile(json.loads(out.read_text()), str(out))
    assert p.tiers.source["disk"].startswith("measured") and p.tiers.source["direct"] == "default"
    # a measured curve (a fit, plus the measured points where the fit is too flat to hold them:
    # that depends on this disk's timing, so either is a measurement)
    q = p.tiers.disk.buffered.qd1
    assert p.tiers.disk.direct.queue_depth == 2 and q.bandwidth_GBps > 0 and q.latency_us >= 0
    assert not list(tmp_path.glob("simmoe-disk-*"))
    bad = CliRunner().invoke(main, ["calibrate", "tiers", "-d", "cpu", "--stage", "direct", "-o", str(out)])
    assert bad.exit_code == 2 and "GPU path" in bad.output


def test_flat_or_noisy_points_still_make_a_curve():
    from calibrate.measurements.tiers import fit_curve
    from simulator.profile import CopyCurve, copy_ms_from_curve

    for pts in ([(4160, 0.039), (16640, 0.036)], [(1 << 20, 0.5), (1 << 22, 0.5), (1 << 24, 0.5)],
                [(1 << 20, 0.1), (1 << 22, 0.4), (1 << 24, 1.6)]):
        c = CopyCurve(**fit_curve(pts)[0])
        ms = [copy_ms_from_curve(c, b) for b, _ in pts]
        assert ms == sorted(ms)                  # more bytes never read faster


def test_dequant_sweep_fits_a_curve_per_dtype():
    from calibrate.measurements.tiers import dequant_sweep
    from calibrate.measurements.timing import Timer
    from simulator.profile import CopyCurve

    curves, raw = dequant_sweep(Timer(torch.device("cpu")), [1 << 12, 1 << 14], trials=3, warmup=1)
    assert set(curves) == {"int8", "fp8", "int4"}
    for dt, c in curves.items():
        CopyCurve(**c)
        assert [p["values"] for p in raw[dt]["points"]] == [1 << 12, 1 << 14]
        assert raw[dt]["host_us"] > 0      # the host's issue of one call, beside its device time
