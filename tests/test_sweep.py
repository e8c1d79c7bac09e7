"""Sweeps: grid expansion, identical results on every backend, kill -9 and resume, bad files."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from simmoe.cli import main
from simulator.errors import InputError
from simulator.sweep import load_sweep, sweep

BASE = {
    "name": "tiny",
    "model": {"preset": "published-study", "num_layers": 2, "num_experts": 16},
    "replications": 2,
    "batch_sizes": [2],
    "trace": {"generator": "mixed", "steps": 6, "zipf": 0.5, "batch_locality": 0.5, "batch_pool": 4},
    "engine": {"dense_ms_per_layer": 0.05, "warmup_steps": 1},
    "policies": [
        {"name": "per-item", "load": "per-item", "memory": "pageable"},
        {"name": "dedup", "load": "dedup"},
        {"name": "lru", "cache": {"kind": "lru", "capacity": 8}},
        {"name": "lru-prefetch", "cache": {"kind": "lru", "capacity": 8}, "prefetch": {"kind": "oracle"}},
    ],
}
SMALL = {
    "name": "small",
    "base": BASE,
    "zip": [{"policies[lru].cache.capacity": [4, 8], "policies[3].cache.capacity": [4, 8]}],
    "grid": {"batch_sizes": [1, 2, 4], "trace.batch_locality": [0.2, 0.8]},
}


def results_bytes(out: Path) -> bytes:
    return (out / "results.parquet").read_bytes()


# ------------------------------------------------------------------------- expansion
def test_grid_expansion_order_values_and_overrides():
    sw = load_sweep({**SMALL, "set": {"replications": 1, "trace.steps": 4}})
    assert len(sw.points) == 2 * 3 * 2
    assert [a.path for a in sw.axes] == ["policies[lru].cache.capacity", "policies[3].cache.capacity",
                                         "batch_sizes", "trace.batch_locality"]
    # zip group first, then grid axes in file order; the last axis varies fastest
    first, second, last = sw.points[0], sw.points[1], sw.points[-1]
    assert first.axes == {"policies[lru].cache.capacity": 4, "policies[3].cache.capacity": 4,
                          "batch_sizes": 1, "trace.batch_locality": 0.2}
    assert second.axes["trace.batch_locality"] == 0.8 and second.axes["batch_sizes"] == 1
    assert last.axes == {"policies[lru].cache.capacity": 8, "policies[3].cache.capacity": 8,
                         "batch_sizes": 4, "trace.batch_locality": 0.8}
    sc = last.scenario
    assert sc.batch_sizes == [4]                       # an integer batch size means [integer]
    assert sc.policies[2].cache.capacity == 8 and sc.policies[3].cache.capacity == 8
    assert sc.policies[0].cache.kind == "none"
    assert sc.trace.batch_locality == 0.8 and sc.trace.steps == 4 and sc.replications == 1
    assert [p.index for p in sw.points] == list(range(12))
    assert len({p.point_id for p in sw.points}) == 12


def test_point_ids_are_stable_and_depend_on_the_scenario():
    a, b = load_sweep(SMALL), load_sweep(SMALL)
    assert [p.point_id for p in a.points] == [p.point_id for p in b.points]
    c = load_sweep({**SMALL, "set": {"seed": 1}})
    assert not {p.point_id for p in a.points} & {p.point_id for p in c.points}
    d = load_sweep({**SMALL, "set": {"profile": "h100-probe"}})
    assert not {p.point_id for p in a.points} & {p.point_id for p in d.points}


def test_preset_model_fields_whole_lists_and_profiles_can_be_axes():
    base = {**BASE, "model": "published-study"}
    sw = load_sweep({"name": "s", "base": base, "set": {"model.num_layers": 1},
                     "grid": {"model.num_experts": [8, 32], "profile": ["h100-pcie5", "rtx3090-published"],
                              "policies": [[{"name": "a"}], [{"name": "b", "load": "per-item"}]]}})
    assert len(sw.points) == 8
    p = sw.points[-1]
    assert p.scenario.model.num_experts == 32 and p.scenario.model.num_layers == 1
    assert p.scenario.model.hidden == 768                  # the rest of the preset is kept
    assert p.profile.name == "rtx3090-published"
    assert [q.name for q in p.scenario.policies] == ["b"]
    assert p.axes["policies"] == json.dumps([{"load": "per-item", "name": "b"}], sort_keys=True)


# ---------------------------------------------------------------------- determinism
def test_local_one_and_two_workers_give_identical_parquet(tmp_path):
    one = sweep(SMALL, workers=1, out=tmp_path / "one")
    two = sweep(SMALL, workers=2, out=tmp_path / "two", chunk=1)
    assert len(list((tmp_path / "two" / "parts").glob("part-*.parquet"))) == 12
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    assert results_bytes(tmp_path / "one") == results_bytes(tmp_path / "two")
    assert len(one) == 12 * 4                              # points x policies (one batch size each)
    assert list(one["point"]) == sorted(one["point"])
    assert (one["status"] == "ok").all()
    assert one.attrs["sweep"]["ran"] == 12
    # the batch-size axis and the batch_size of the summary agree
    assert (one["batch_sizes"] == one["batch_size"]).all()


def test_sweep_point_equals_a_direct_run(tmp_path):
    import simmoe

    df = sweep(SMALL, workers=1, out=tmp_path / "s")
    sc = load_sweep(SMALL).points[5].scenario
    direct = simmoe.run(sc).summary_df
    rows = df[df["point"] == 5].reset_index(drop=True)
    for col in ("latency_mean_ms", "latency_ci95_lo", "hit_rate", "bytes_h2d", "transfer_ms"):
        assert list(rows[col]) == list(direct[col])


# ----------------------------------------------------------------------------- resume
def test_rerun_skips_finished_points_and_redoes_lost_ones(tmp_path):
    out = tmp_path / "s"
    full = sweep(SMALL, workers=1, out=out, chunk=1)
    again = sweep(SMALL, workers=1, out=out)
    assert again.attrs["sweep"]["ran"] == 0 and again.attrs["sweep"]["skipped"] == 12
    pd.testing.assert_frame_equal(full, again, check_exact=True)
    parts = sorted((out / "parts").glob("part-*.parquet"))
    for p in parts[:5]:
        p.unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = out / "parts" / f".part-0000001-deadbeef.parquet.{dead}.deadbeef.partial"
    stale.write_bytes(b"half a file")   # a kill -9 in the middle of a write
    (out / "results.parquet").unlink()
    resumed = sweep(SMALL, workers=2, out=out)
    assert resumed.attrs["sweep"]["ran"] == 5
    assert not stale.exists() and not list((out / "parts").glob(".*"))
    pd.testing.assert_frame_equal(full, resumed, check_exact=True)


def test_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path):
    bad = {**SMALL, "grid": {"batch_sizes": [1, 2], "trace": [BASE["trace"], {"path": "no-such-trace.npz"}]}}
    del bad["zip"]
    seen = []
    df = sweep(bad, workers=2, out=tmp_path / "s", progress=lambda d, t, f: seen.append((d, t, f)))
    errors = df[df["status"] == "error"]
    assert sorted(errors["point"]) == [1, 3]
    assert all("no-such-trace.npz" in e and "file not found" in e for e in errors["error"])
    assert (df.loc[df["status"] == "ok", "point"].unique() == [0, 2]).all()
    assert seen[0] == (0, 4, 0) and seen[-1] == (4, 4, 2)
    again = sweep(bad, workers=1, out=tmp_path / "s")
    assert again.attrs["sweep"]["ran"] == 0 and again.attrs["sweep"]["failed"] == 2
    retried = sweep(bad, workers=1, out=tmp_path / "s", retry_failed=True)
    assert retried.attrs["sweep"]["ran"] == 2
    assert (retried.groupby("point").size() == df.groupby("point").size()).all()   # no duplicates


KILL_SWEEP = {
    "name": "kill",
    "base": BASE,
    "grid": {"seed": list(range(24)), "batch_sizes": [1, 2, 3, 4, 5]},
}


def test_kill_9_mid_sweep_then_resume_equals_an_uninterrupted_run(tmp_path):
    spec = tmp_path / "kill.yaml"
    spec.write_text(yaml.safe_dump(KILL_SWEEP))
    out = tmp_path / "killed"
    code = f"from simulator.sweep import sweep; sweep({str(spec)!r}, workers=2, out={str(out)!r}, chunk=2)"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(list((out / "parts").glob("part-*.parquet"))) < 4:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)          # the sweep and its worker processes
        proc.wait()
    assert not (out / "results.parquet").exists()    # killed mid-sweep
    finished = {pq.read_table(p)["point_id"][0].as_py() for p in (out / "parts").glob("part-*.parquet")}
    assert 0 < len(finished) < 120

    resumed = sweep(spec, workers=2, out=out)
    assert resumed.attrs["sweep"]["skipped"] >= len(finished)
    assert resumed.attrs["sweep"]["ran"] == 120 - resumed.attrs["sweep"]["skipped"]
    per_point = pd.concat([pq.read_table(p, columns=["point_id"]).to_pandas()
                           for p in (out / "parts").glob("part-*.parquet")]).value_counts()
    assert len(per_point) == 120 and (per_point == 4).all()     # each point once: 4 policies

    clean = sweep(spec, workers=2, out=tmp_path / "clean")
    pd.testing.assert_frame_equal(clean, resumed, check_exact=True)
    assert results_bytes(tmp_path / "clean") == results_bytes(out)


# -------------------------------------------------------------------------------- ray
@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


def test_ray_and_local_give_identical_parquet(ray_session, tmp_path):
    local = sweep(SMALL, workers=2, out=tmp_path / "local")
    on_ray = sweep(SMALL, backend="ray", out=tmp_path / "ray", chunk=1)
    assert on_ray.attrs["sweep"]["backend"] == "ray" and on_ray.attrs["sweep"]["ran"] == 12
    pd.testing.assert_frame_equal(local, on_ray, check_exact=True)
    assert results_bytes(tmp_path / "local") == results_bytes(tmp_path / "ray")
    assert ray_session.is_initialized()               # a session it did not start is left running


def test_missing_ray_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(InputError, match="ray is not installed") as e:
        sweep(SMALL, backend="ray", out=tmp_path / "s")
    assert e.value.field == "--backend"
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------- bad input
BAD = [
    ("- a\n- b\n", "(document)", "must be a YAML mapping"),
    ("name: s\nbase: base.yaml\ngrids: {}\n", "grids", "unknown key"),
    ("base: base.yaml\n", "name", "required"),
    ("name: s\n", "base", "required"),
    ("name: s\nbase: missing.yaml\n", "base", "not found"),
    ("name: s\nbase: base.yaml\ngrid: {batch_sizes: 4}\n", "grid.batch_sizes", "non-empty list"),
    ("name: s\nbase: base.yaml\ngrid: {batch_sizes: []}\n", "grid.batch_sizes", "non-empty list"),
    ("name: s\nbase: base.yaml\ngrid: {'trace..zipf': [1]}\n", "grid.trace..zipf", "not a field path"),
    ("name: s\nbase: base.yaml\ngrid: {batch_sizes: [1, 0]}\n", "grid.batch_sizes",
     "point 1 (batch_sizes=0): batch_sizes: batch size 0 must be positive"),
    ("name: s\nbase: base.yaml\ngrid: {trace.zipff: [1]}\n", "grid.trace.zipff", "trace.zipff: unknown key"),
    ("name: s\nbase: base.yaml\ngrid: {'policies[nope].cache.capacity': [1]}\n",
     "grid.policies[nope].cache.capacity", "no item named 'nope'"),
    ("name: s\nbase: base.yaml\ngrid: {'policies[9].memory': [pinned]}\n", "grid.policies[9].memory", "past the end"),
    ("name: s\nbase: base.yaml\ngrid: {'policies[lru].cache.capacity': [0]}\n",
     "grid.policies[lru].cache.capacity", "policies[2].cache.capacity"),
    ("name: s\nbase: base.yaml\ngrid: {'replications.x': [1]}\n", "grid.replications.x", "not a mapping"),
    ("name: s\nbase: base.yaml\ngrid: {batch_sizes: [1, 1]}\n", "grid", "same scenario"),
    ("name: s\nbase: base.yaml\nzip: [{batch_sizes: [1, 2], seed: [1]}]\n", "zip[0]", "one length"),
    ("name: s\nbase: base.yaml\nzip: [{seed: [1, 2]}]\ngrid: {seed: [3]}\n", "grid.seed", "swept twice"),
    ("name: s\nbase: base.yaml\ngrid: {profile: [h100-pcie5, nope]}\n", "grid.profile", "unknown profile 'nope'"),
    ("name: s\nbase: base.yaml\ngrid: {seed: [1, 2}\n", "line 3", "malformed YAML"),
]


@pytest.mark.parametrize("text,field,message", BAD)
def test_malformed_sweep_files_give_clear_errors(tmp_path, text, field, message):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(InputError) as e:
        load_sweep(f)
    assert e.value.field == field
    assert message in e.value.message
    if field != "(document)" and "line" not in field:
        assert e.value.source == str(f)


def test_cli_bad_sweep_is_one_line_exit_2_and_writes_nothing(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "bad.yaml").write_text("name: s\nbase: base.yaml\ngrid: {batch_sizes: [1, -2]}\n")
    res = CliRunner().invoke(main, ["sweep", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'bad.yaml'}: grid.batch_sizes: point 1")
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_cli_sweep_runs_and_resumes(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["sweep", str(spec), "-o", str(out), "-j", "2", "-q"])
    assert res.exit_code == 0, res.output
    assert "12 points: 12 run, 0 already done, 0 failed" in res.output
    res = CliRunner().invoke(main, ["sweep", str(spec), "-o", str(out), "-q"])
    assert "12 points: 0 run, 12 already done" in res.output
    manifest = json.loads((out / "sweep.json").read_text())
    assert [p["point"] for p in manifest["points"]] == list(range(12))
