"""`simmoe calibrate`: the expert FFN, the statistics and fits, the profile it writes, bad input.

CI has no GPU: `--device cpu --quick` runs end to end here; the `gpu` tests run on CUDA only.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats as sps

torch = pytest.importorskip("torch")

from calibrate import calibrate as cal  # noqa: E402
from calibrate.measurements import provenance  # noqa: E402
from calibrate.executors.expert import alloc_expert, expert_ffn, run_expert  # noqa: E402
from calibrate.fit import compute_fit, copy_curve, fit_copy_line  # noqa: E402
from calibrate.profile_writer import write_atomic  # noqa: E402
from calibrate.measurements.stats import compare, summary  # noqa: E402
from calibrate.measurements.study import study_row  # noqa: E402
from calibrate.measurements.timing import Timer, rotation_count  # noqa: E402
from simmoe.cli import main  # noqa: E402
from simulator.errors import InputError  # noqa: E402
from simulator.models import PRESETS, ModelSpec  # noqa: E402
from simulator.profile import CopyCurve, CostModel, copy_ms_from_curve, parse_profile  # noqa: E402

CUDA = torch.cuda.is_available()
TINY = ModelSpec(name="tiny", num_layers=1, num_experts=2, top_k=1, hidden=8, ffn=16, dtype="fp32")


def invoke(args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


# ------------------------------------------------------------------------- expert FFN
@pytest.mark.parametrize("gated", [True, False])
def test_expert_ffn_matches_the_formula(gated):
    spec = TINY.model_copy(update={"gated": gated})
    w = alloc_expert(spec, "pageable")
    x = torch.randn(3, spec.hidden)
    xd, g, u, d = (t.double().numpy() for t in (x, w.gate if gated else w.up, w.up, w.down))
    if gated:
        want = ((xd @ g) / (1 + np.exp(-(xd @ g))) * (xd @ u)) @ d
    else:
        want = np.maximum(xd @ u, 0) @ d
    assert np.allclose(run_expert(x, w).double().numpy(), want, atol=1e-5)
    assert (w.gate is None) == (not gated)


def test_expert_matrices_are_views_of_one_flat_buffer():
    spec = PRESETS["published-study"].model_copy(update={"hidden": 16, "ffn": 32})
    w = alloc_expert(spec, "pageable")
    assert w.flat.numel() * w.flat.element_size() == spec.expert_bytes
    assert w.gate.shape == w.up.shape == (16, 32) and w.down.shape == (32, 16)
    assert 0 < float(w.flat.abs().max()) <= spec.hidden ** -0.5  # random, every element written
    w.flat.zero_()  # one write through the flat buffer reaches every matrix
    assert not any(bool(m.any()) for m in (w.gate, w.up, w.down))


def test_unsupported_dtype_is_bad_input():
    with pytest.raises(InputError, match="fp8"):
        alloc_expert(TINY.model_copy(update={"dtype": "fp8"}))


# ------------------------------------------------------------------ statistics, fits
@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # the constant samples
def test_summary_and_welch():
    s = summary([1.0, 2.0, 3.0, 4.0])
    assert s["trials"] == 4 and s["mean"] == 2.5 and s["median"] == 2.5
    assert s["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    half = sps.t.ppf(0.975, 3) * s["std"] / 2
    assert s["ci95"] == pytest.approx([2.5 - half, 2.5 + half])
    rng = np.random.default_rng(0)
    a, b = rng.normal(10, 1, 50), rng.normal(12, 3, 80)
    c = compare(list(a), list(b))
    assert c["p_value"] == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue)
    assert c["cohens_d"] == pytest.approx((b.mean() - a.mean()) / math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2))
    assert compare([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])["cohens_d"] is None


def test_study_row_says_which_dominates():
    r = study_row(2, 10, [1.0, 1.1, 0.9], [3.0, 3.2, 2.8])
    assert r["copies"] == 20 and r["dominates"] == "memory transfer"
    assert r["transfer_over_computation"] == pytest.approx(3.0) and r["p_value"] < 0.01 and r["cohens_d"] > 0
    assert study_row(1, 1, [5.0, 5.1, 4.9], [1.0, 1.1, 0.9])["dominates"] == "computation"


def test_copy_line_fit_recovers_latency_and_bandwidth_with_cis():
    sizes = [4096 * 2**k for k in range(19)]
    rng = np.random.default_rng(1)
    ms = [(11e-3 + b / 50e9 * 1e3) * rng.normal(1, 0.01) for b in sizes]
    f = fit_copy_line(sizes, ms)
    assert f["latency_us"] == pytest.approx(11, rel=0.05) and f["bandwidth_GBps"] == pytest.approx(50, rel=0.05)
    assert f["latency_ci95_us"][0] < 11 < f["latency_ci95_us"][1]
    assert f["bandwidth_ci95_GBps"][0] < 50 < f["bandwidth_ci95_GBps"][1]


def test_copy_curve_keeps_a_table_only_where_the_line_misses():
    sizes = [4096 * 4**k for k in range(10)]
    line = [(10e-3 + b / 50e9 * 1e3) for b in sizes]
    curve, rec = copy_curve(list(zip(sizes, line)))
    assert curve["table"] == [] and all(abs(p["line_rel_error"]) < 1e-6 for p in rec["points"])
    # pageable-like: the two largest sizes run at half the bandwidth
    kinked = [ms * (2 if b >= 256 << 20 else 1) for b, ms in zip(sizes, line)]
    curve, rec = copy_curve(list(zip(sizes, kinked)))
    misses = [p["bytes"] for p in rec["points"] if abs(p["line_rel_error"]) > rec["tolerance"]]
    assert misses and curve["table"][0][0] <= min(misses) and curve["table"][-1][0] == sizes[-1]
    assert len(curve["table"]) < len(sizes)
    frozen = CopyCurve(**curve)  # what the simulator will use is within tolerance at every point
    for b, ms in zip(sizes, kinked):
        assert abs(copy_ms_from_curve(frozen, b) - ms) / ms <= rec["tolerance"] + 1e-9


def test_compute_fit_errors_per_point():
    pts = [(1, 0.1), (2, 0.1), (4, 0.12), (8, 0.3), (16, 0.25), (32, 0.8)]
    rows = compute_fit(pts)
    assert [r["tokens"] for r in rows] == [t for t, _ in pts]
    assert rows[0]["rel_error"] == pytest.approx(0.0)
    assert rows[3]["rel_error"] < 0 < rows[4]["rel_error"]  # the non-monotone pair is pooled
    assert all(r["loo_rel_error"] is not None for r in rows)


def test_log_spacing_and_rotation():
    assert cal.log_spaced(1, 256, 4) == [1, 4, 16, 64, 256]
    assert cal.log_spaced(4096, 1 << 30, 2)[-1] == 1 << 30 and len(cal.log_spaced(4096, 1 << 30, 2)) == 19
    assert cal.log_spaced(1, 100, 4) == [1, 4, 16, 64, 100]
    assert rotation_count(4096) == 8 and rotation_count(1 << 30) == 1
    assert rotation_count(64 << 20, pool_bytes=64 << 20) == 1 and rotation_count(1 << 30, lo=2) == 2


def test_cpu_timer_counts_trials_and_honours_its_budget():
    s = Timer(torch.device("cpu")).time(lambda i: None, trials=7, warmup=2)
    assert len(s.ms) == len(s.host_ms) == 7
    slow = Timer(torch.device("cpu")).time(lambda i: torch.randn(200, 200) @ torch.randn(200, 200),
                                           trials=10_000, warmup=0, budget_s=0.05)
    assert 3 <= len(slow.ms) < 10_000


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    p = tmp_path / "p.json"
    p.write_text('{"old": true}')
    with pytest.raises(ValueError):
        write_atomic({"x": float("nan")}, p)  # fails while writing
    assert json.loads(p.read_text()) == {"old": True} and sorted(tmp_path.iterdir()) == [p]
    write_atomic({"x": 1}, p)
    assert json.loads(p.read_text()) == {"x": 1} and sorted(tmp_path.iterdir()) == [p]


def test_provenance_reads_the_pcie_link_from_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '580.65.06, 5, 16, 1, 16'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert provenance._nvidia_smi("00000000:1B:00.0") == {
        "driver": "580.65.06", "pcie": "Gen5 x16", "pcie_current": "Gen1 x16"}
    assert provenance.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


# ------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "profiles" / "cpu.json"
    code, stdout, stderr = invoke(["calibrate", "--device", "cpu", "--quick", "--out", out, "--name", "ci-cpu"])
    assert code == 0, stderr
    return out, stdout


def test_cpu_quick_calibration_writes_a_valid_profile(cpu_profile):
    out, stdout = cpu_profile
    doc = json.loads(out.read_text())
    prof = parse_profile(doc, str(out))
    m = PRESETS["published-study"]
    cm = CostModel(prof, m.shape_key, m.expert_bytes, m.activation_bytes_per_token, max_tokens=512)
    assert 0 < cm.expert_ms(1) <= cm.expert_ms(256) <= cm.expert_ms(512)
    assert 0 < cm.cpu_expert_ms(8) and cm.copy_ms(m.expert_bytes) > cm.copy_ms(4096) > 0
    assert prof.name == "ci-cpu" and prof.version == 1
    pv = prof.provenance
    assert pv["kind"] == "calibrated" and pv["device"] == "cpu" and pv["quick"] is True
    for key in ("gpu", "torch", "cuda", "host_cpu", "date", "simmoe_version", "trials", "command_line", "notes"):
        assert pv[key]
    assert "--device cpu --quick" in pv["command_line"]
    # quick mode: copies 4 KiB..64 MiB, tokens 1..256, every point kept with its statistics and fit error
    pts = doc["measurements"]["copies"]["h2d"]["pageable"]
    assert pts[0]["bytes"] == 4096 and pts[-1]["bytes"] == 64 << 20
    assert all(p["ms"]["trials"] >= 3 and p["ms"]["ci95"][0] <= p["ms"]["mean"] <= p["ms"]["ci95"][1] for p in pts)
    assert len(doc["fit"]["copy"]["h2d.pinned"]["points"]) == len(pts)
    assert [r["tokens"] for r in doc["fit"]["compute"]["gpu"][m.shape_key]] == [
        t for t, _ in doc["compute"]["gpu"][m.shape_key]]
    assert doc["compute"]["gpu"][m.shape_key][0][0] == 1
    assert doc["host"]["pageable_blocks_host"] is True and doc["host"]["launch_us"]["expert"] > 0
    rows = doc["measurements"]["study_table"]
    assert [(r["batch"], r["experts"]) for r in rows] == [(b, e) for b in (1, 2, 4) for e in (1, 10)]
    assert all(r["transfer_ms"]["mean"] > 0 and r["computation_ms"]["mean"] > 0 for r in rows)
    assert "Batch 4, 10 experts" in stdout and f"wrote {out}" in stdout


def test_profile_is_the_only_file_written(cpu_profile):
    out, _ = cpu_profile
    assert [p.name for p in out.parent.iterdir()] == ["cpu.json"]


def test_interrupted_calibration_writes_nothing(tmp_path, monkeypatch):
    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(cal, "_stage_copies", interrupted)
    code, _, stderr = invoke(["calibrate", "--device", "cpu", "--quick", "--out", tmp_path / "p.json"])
    assert code == 130 and "nothing was written" in stderr and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- bad input
def _one_line_error(code, stderr, *needles):
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr
    for n in needles:
        assert n in stderr


def test_unknown_preset(tmp_path):
    code, _, err = invoke(["calibrate", "--device", "cpu", "--quick", "--model", "gpt-5", "--out", tmp_path / "p.json"])
    _one_line_error(code, err, "--model", "gpt-5", "published-study")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output(tmp_path):
    (tmp_path / "file").write_text("")
    code, _, err = invoke(["calibrate", "--device", "cpu", "--quick", "--out", tmp_path / "file" / "p.json"])
    _one_line_error(code, err, "--out", "cannot write")
    code, _, err = invoke(["calibrate", "--device", "cpu", "--quick", "--out", tmp_path])
    _one_line_error(code, err, "--out", "is a directory")


def test_bad_device(tmp_path):
    code, _, err = invoke(["calibrate", "--device", "tpu", "--quick", "--out", tmp_path / "p.json"])
    _one_line_error(code, err, "--device", "cuda, cuda:N or cpu")


@pytest.mark.skipif(CUDA, reason="a GPU is present")
def test_cuda_without_gpu_suggests_cpu(tmp_path):
    code, _, err = invoke(["calibrate", "--device", "cuda", "--quick", "--out", tmp_path / "p.json"])
    _one_line_error(code, err, "--device", "no CUDA GPU", "use --device cpu")
    assert list(tmp_path.iterdir()) == []


def test_help_says_what_how_long_where():
    code, out, _ = invoke(["calibrate", "--help"])
    assert code == 0 and "What it measures" in out and "How long" in out and "profiles/<gpu>.json" in out


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_expert_ffn_on_cuda_matches_cpu(dtype):
    spec = TINY.model_copy(update={"hidden": 256, "ffn": 512, "dtype": dtype})
    w = alloc_expert(spec, "device", "cuda")
    x = torch.randn(7, spec.hidden, device="cuda").to(w.flat.dtype)
    got = run_expert(x, w).float().cpu()
    want = expert_ffn(*(t.float().cpu() for t in (x, w.gate, w.up, w.down)))
    assert torch.allclose(got, want, rtol=0.05, atol=0.02 * float(want.abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_events_time_the_sleep_kernel():
    t = Timer(torch.device("cuda"))
    short = np.median(t.time(lambda i: torch.cuda._sleep(100_000), 10, 2).ms)
    long = np.median(t.time(lambda i: torch.cuda._sleep(1_000_000), 10, 2).ms)
    assert 5 < long / short < 12


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_quick_calibration(tmp_path):
    out = tmp_path / "gpu.json"
    code, stdout, stderr = invoke(["calibrate", "--device", "cuda", "--quick", "--out", out])
    assert code == 0, stderr
    doc = json.loads(out.read_text())
    prof = parse_profile(doc, str(out))
    m = PRESETS["published-study"]
    cm = CostModel(prof, m.shape_key, m.expert_bytes, m.activation_bytes_per_token, max_tokens=256)
    assert cm.expert_ms(256) >= cm.expert_ms(1) > 0 and cm.cpu_expert_ms(1) > 0
    c = prof.copy_
    assert c.h2d.pageable is not None and c.d2h is not None and c.d2h.pageable is not None
    assert 1 < c.h2d.pinned.bandwidth_GBps < 200 and 1 < c.d2h.pinned.bandwidth_GBps < 200
    assert cm.copy_ms(m.expert_bytes, "pageable") > cm.copy_ms(m.expert_bytes, "pinned") * 0.8
    assert prof.provenance["gpu"] == torch.cuda.get_device_name() and prof.provenance["pcie"]
    assert 1e4 < doc["measurements"]["sleep_cycles_per_ms"] < 1e7
    assert doc["measurements"]["copy_streams"]["two_streams_ms"]["median"] > 0
    assert "fresh_uncached_ms" in doc["measurements"]["overheads"]["slot_allocation"]["published-study"]
    assert 0 < prof.host.launch_us.copy_ < 1000 and 0 < prof.host.sync_us < 10_000
    runs = doc["measurements"]["executor_runs"]["published-study"]
    assert runs["compute_us"] > 0 and runs["dense_us"] > 0 and runs["pageable_copy_ms"] > 0
    assert prof.host.launch_us.expert == pytest.approx(runs["compute_us"]) and prof.host.pageable_tail_us >= 0
    assert "Batch 4, 10 experts" in stdout


def test_executor_runs_set_host_costs_and_the_pageable_expert_point():
    """What the executor's own steps measured becomes the profile's host costs (medians over
    models) and the pageable copy at each expert's size (the blocking call less its issue)."""
    from calibrate.measurements.executor_costs import host_costs
    from calibrate.profile_writer import with_executor_copies

    runs = {"a": {"compute_us": 100.0, "load_us": 40.0, "dense_us": 30.0, "pageable_copy_ms": 3.04,
                  "pageable_compute_us": 250.0, "expert_bytes": 1000},
            "b": {"compute_us": 140.0, "load_us": 60.0, "dense_us": 50.0, "pageable_copy_ms": 2.05,
                  "pageable_compute_us": 270.0, "expert_bytes": 2000}}
    launch, tail = host_costs(runs)
    assert launch == {"copy": 50.0, "expert": 120.0, "dense": 40.0} and tail == 140.0
    copy = {"h2d": {"pinned": {"table": [[1000, 0.5], [4000, 1.0]]}, "pageable": {"table": [[1000, 9.0], [8000, 9.9]]}}}
    trains = {"pinned": [{"bytes": 1000, "ms": {"median": 0.4}}], "pageable": [{"bytes": 1000, "ms": {"median": 8.0}}]}
    with_executor_copies(copy, trains, runs)
    assert copy["h2d"]["pinned"]["table"] == [[1000, 0.4], [4000, 1.0]]
    assert copy["h2d"]["pageable"]["table"] == [[1000, pytest.approx(2.99)], [2000, pytest.approx(2.0)], [8000, 9.9]]

