"""The engine prices the engine around the experts when the scenario names an engine style:
the dense op of every layer-step from the profile's tables, a per-step op for embedding, LM
head and dense layers, and the style's host cost per layer and per expert. The twin style
keeps the constant dense op, bit for bit."""
from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest

from simulator.engine import Engine
from simulator.engine_costs import DenseCost
from simulator.planner import DENSE, Planner
from simulator.profile import load_profile
from simulator.runner import build_trace, cost_model, run_scenario
from simulator.scenario import parse_scenario

from conftest import scenario_dict

PROFILE = load_profile("h200")


def _scenario(style: str, **trace):
    return parse_scenario(scenario_dict(
        model="olmoe-1b-7b", profile="h200", replications=1, batch_sizes=[4],
        trace={"generator": "mixed", "steps": 6, "zipf": 0.5, "prompt_tokens": 512, **trace},
        engine={"style": style},
        policies=[{"name": "lru", "load": "dedup", "cache": {"kind": "lru", "capacity": 200},
                   "prefetch": {"kind": "oracle"}}]))


def _run(sc, dense, timeline=None):
    tr = build_trace(sc, 4, 0, None)
    cost = cost_model(sc, PROFILE, tr.max_step_tokens)
    return Engine(cost, "pinned", dense, timeline=timeline).run(Planner(sc.model, sc.policies[0], tr, seed=0)), tr


def test_twin_dense_cost_equals_the_constant_bit_for_bit():
    sc = _scenario("twin")
    tr = build_trace(sc, 4, 0, None)
    const, _ = _run(sc, 0.05)
    priced, _ = _run(sc, DenseCost(style="twin", batch=4, phases=tr.phase, tokens=np.diff(tr.step_offsets),
                                   twin_dense_ms=0.05))
    for a, b in zip(const, priced):
        for f in fields(a):
            assert getattr(a, f.name) == getattr(b, f.name)


def test_a_style_prices_each_step_from_the_tables():
    sc = _scenario("hf-eager")
    tr = build_trace(sc, 4, 0, None)
    dc = DenseCost.for_trace(sc, PROFILE, tr)
    tl: list = []
    recs, _ = _run(sc, dc, tl)
    dense = [r for r in tl if r[0] == "compute" and r[3] == DENSE]
    per_step = [r for r in dense if r[4] == "step"]
    layers = [r for r in dense if r[4] is None]
    assert len(per_step) == tr.num_steps and len(layers) == tr.num_steps * sc.model.num_layers
    for s, r in enumerate(per_step):
        assert r[2] - r[1] == pytest.approx(dc.step_extra_ms(s))
    gpu = dc.gpu_per_step()   # the GPU part alone, when the GPU waits on copies (decode_gpu)
    for i, r in enumerate(layers):
        s = i // sc.model.num_layers
        if gpu is None:
            assert r[2] - r[1] == pytest.approx(dc.dense_ms(s, 0))
        else:
            assert gpu[s] - 1e-9 <= r[2] - r[1] <= dc.dense_ms(s, 0) + 1e-9
    # the context grows: a later step's dense op is never cheaper
    d = [dc.dense_ms(s, 0) for s in range(tr.num_steps)]
    assert all(b >= a - 1e-9 for a, b in zip(d, d[1:]))
    # a style's host costs make the step slower than the twin's with the same dense ops
    base, per_expert = dc.expert_host_ms(0.0)
    assert base > 0 and per_expert > 0
    assert all(r.host_ms >= sc.model.num_layers * base for r in recs)


def test_longer_context_is_slower_and_style_reaches_the_summary():
    short = run_scenario(_scenario("hf-eager", prompt_tokens=256)).summary[0]["step_latency_ms"]["mean"]
    long = run_scenario(_scenario("hf-eager", prompt_tokens=16384)).summary[0]["step_latency_ms"]["mean"]
    twin = run_scenario(_scenario("twin")).summary[0]["step_latency_ms"]["mean"]
    assert long > short > twin
