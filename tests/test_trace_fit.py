"""Fitting the synthetic generator to a trace's statistics."""
from __future__ import annotations

import yaml
import pytest
from click.testing import CliRunner

from simulator.runner import build_trace
from simulator.scenario import parse_scenario
from simulator.traces import generate
from simulator.traces.fit import TOLERANCES, fit_generator, fit_statistics
from simulator.traces.real import sequences_from_trace

SHAPE = dict(num_layers=12, num_experts=32, top_k=4)
KNOBS = dict(zipf=0.6, temporal=0.25, cross_layer=0.4, batch_locality=0.15)


def target_set(**knobs):
    """A 'recorded' corpus: 16 sequences of 128 tokens from known knobs."""
    tr = generate(**SHAPE, batch_size=16, steps=128, seed=11, generator="mixed", batch_pool=4, **knobs)
    return sequences_from_trace(tr)


def test_fitted_generator_reproduces_the_targets_statistics():
    res = fit_generator(target_set(**KNOBS), batch_size=8, steps=64, seeds=1)
    assert set(res.tolerances) == set(TOLERANCES)
    for stat, tol in TOLERANCES.items():           # measured on a seed the fit never saw
        assert abs(res.fitted[stat] - res.target[stat]) <= tol, (stat, res.target[stat], res.fitted[stat])
    assert all(res.within.values())
    for knob, true in KNOBS.items():               # and the knobs come back near the truth
        assert abs(res.params[knob] - true) < 0.12, (knob, res.params)


def test_fit_leaves_knobs_at_zero_when_the_target_has_no_locality():
    res = fit_generator(target_set(), batch_size=8, steps=64, seeds=1)
    assert res.params["temporal"] < 0.03 and res.params["cross_layer"] < 0.05
    assert res.params["batch_locality"] < 0.1       # the knob that moves its statistic least
    assert res.params["zipf"] < 0.3


def test_lifts_are_zero_for_independent_tokens():
    tr = generate(**SHAPE, batch_size=16, steps=200, seed=3, generator="zipf", zipf=0.8)
    st = fit_statistics(sequences_from_trace(tr), 8)
    assert abs(st["reuse_lift"]) < 0.01
    assert abs(st["cross_layer_lift"]) < 0.02
    assert st["batch_lift"] == pytest.approx(1.0, abs=0.01)
    assert st["reuse"] > 4 / 32                      # skew alone raises the raw re-use


def test_fit_cli_writes_a_usable_scenario_trace_section(tmp_path):
    from simmoe.cli import main

    tr = generate(**SHAPE, batch_size=16, steps=64, seed=2, generator="mixed", batch_pool=4, zipf=0.5, temporal=0.3)
    tr.save(tmp_path / "t.npz")
    res = CliRunner().invoke(main, ["trace", "fit", str(tmp_path / "t.npz"), "-b", "8", "--steps", "48", "--seeds", "1",
                                    "-o", str(tmp_path / "fitted.yaml"), "--json", str(tmp_path / "fit.json")])
    assert res.exit_code == 0, res.output
    assert "real vs fitted" in res.output
    section = yaml.safe_load((tmp_path / "fitted.yaml").read_text())["trace"]
    assert section["generator"] == "mixed" and section["batch_pool"] == 4
    sc = parse_scenario({"name": "fitted", "batch_sizes": [64],
                         "model": {"preset": "published-study", "num_layers": 12, "num_experts": 32, "top_k": 4},
                         "trace": {**section, "steps": 10}, "policies": [{"name": "dedup"}]})
    projected = build_trace(sc, 64, 0, None)      # a batch size the recording never had
    assert projected.max_step_tokens == 64 and projected.num_steps == 10
