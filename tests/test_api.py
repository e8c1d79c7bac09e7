"""The Python API for notebooks: simmoe.run -> Result, simmoe.sweep -> DataFrame."""
from __future__ import annotations

from pathlib import Path

import pytest

import simmoe
from simulator.errors import InputError

SCENARIO = {
    "name": "api",
    "model": {"preset": "published-study", "num_layers": 2, "num_experts": 16},
    "replications": 2,
    "batch_sizes": [1, 4],
    "trace": {"generator": "mixed", "steps": 5, "zipf": 0.5, "batch_locality": 0.5, "batch_pool": 4},
    "policies": [{"name": "per-item", "load": "per-item"}, {"name": "lru", "cache": {"kind": "lru", "capacity": 6}}],
}
REPO = Path(__file__).resolve().parent.parent


def test_run_returns_step_and_summary_dataframes():
    res = simmoe.run(SCENARIO)
    assert isinstance(res, simmoe.Result)
    steps = res.steps
    assert len(steps) == 2 * 2 * 2 * 5                     # policies x batch sizes x replications x steps
    assert {"policy", "batch_size", "replication", "step", "latency_ms", "transfer_ms", "hits"} <= set(steps.columns)
    summ = res.summary_df
    assert list(zip(summ["policy"], summ["batch_size"])) == [("per-item", 1), ("lru", 1), ("per-item", 4), ("lru", 4)]
    for (_, row), raw in zip(summ.iterrows(), res.summary):
        assert row["latency_mean_ms"] == raw["step_latency_ms"]["mean"]
        assert [row["latency_ci95_lo"], row["latency_ci95_hi"]] == raw["step_latency_ms"]["ci95"]
        assert row["hit_rate"] == raw["hit_rate"]
    per_step = steps.groupby(["policy", "batch_size"], sort=False)["latency_ms"].mean()
    assert per_step[("lru", 4)] == pytest.approx(summ.loc[3, "latency_mean_ms"], rel=1e-12)


def test_run_accepts_a_path_with_overrides_and_is_reproducible():
    a = simmoe.run(REPO / "scenarios" / "locality_low.yaml", batch_sizes=[2], replications=1)
    assert set(a.summary_df["batch_size"]) == {2}
    b = simmoe.run(a.scenario)
    assert a.summary_df.equals(b.summary_df)


def test_sweep_from_python_matches_run(tmp_path):
    spec = {"name": "api-sweep", "base": SCENARIO, "grid": {"batch_sizes": [1, 4], "policies[lru].cache.capacity": [3, 6]}}
    df = simmoe.sweep(spec, workers=2, out=tmp_path / "s")
    assert len(df) == 4 * 2 and (df["status"] == "ok").all()
    direct = simmoe.run(SCENARIO).summary_df                 # capacity 6 is the base scenario's
    for b in (1, 4):
        got = df[(df["batch_sizes"] == b) & (df["policies[lru].cache.capacity"] == 6)]
        want = direct[direct["batch_size"] == b]
        assert list(got["latency_mean_ms"]) == list(want["latency_mean_ms"])
        assert list(got["policy"]) == list(want["policy"])
    assert (tmp_path / "s" / "results.parquet").is_file()


def test_bad_input_raises_input_error():
    with pytest.raises(InputError, match="batch size 0 must be positive"):
        simmoe.run({**SCENARIO, "batch_sizes": [0]})
    with pytest.raises(InputError, match="unknown backend"):
        simmoe.sweep({"name": "x", "base": SCENARIO}, backend="dask")
