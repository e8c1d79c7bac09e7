"""Pageable copies as the real-model executor meets them (``engine.<model>.in_situ.pageable_copy``).

``calibrate engine --in-situ`` times every expert's copy from the executor's own pageable pool
(one tensor per expert), and the engine scales the profile's pageable curve by that time over
the curve's at the same bytes, for a real model's style only. Pinned copies, the twin, a
profile without the term and the several-GPU engine on one GPU keep today's numbers; a factor
k makes a layer-baseline step's copies k times as long."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from calibrate.measurements.engine_profile import in_situ_factors
from calibrate.measurements.engine_step import pageable_copy
from simulator.errors import InputError
from simulator.models import get_preset
from simulator.profile import load_profile, parse_profile
from simulator.runner import build_trace, cost_model, simulate
from simulator.scenario import parse_scenario

MODEL = "olmoe-1b-7b"


def profile(factor: float | None):
    """The shipped h200 profile; with ``factor``, OLMoE's in situ pageable copy at ``factor`` x
    the profile's pageable curve at an expert's bytes."""
    doc = copy.deepcopy(load_profile("h200").to_json())
    situ = doc["engine"][MODEL]["in_situ"]
    situ.pop("pageable_copy", None)
    if factor is not None:
        nbytes = get_preset(MODEL).expert_bytes
        plain = cost_model(scenario(LAYER), parse_profile(doc, "plain"), 1).copy_ms(nbytes, "pageable")
        situ["pageable_copy"] = {"bytes": nbytes, "ms": plain * factor}
    return parse_profile(doc, "test profile")


def scenario(policy: dict, style: str = "offload-grouped", batch: int = 4, gpus=None):
    doc = {"name": "pc", "model": MODEL, "profile": "h200", "seed": 3, "replications": 1,
           "batch_sizes": [batch], "engine": {"style": style},
           "trace": {"generator": "zipf", "steps": 4, "zipf": 1.0, "prompt_tokens": 256}, "policies": [policy]}
    if gpus is not None:
        doc["gpus"] = gpus
    return parse_scenario(doc, "t.yaml")


def run(sc, prof):
    tr = build_trace(sc, sc.batch_sizes[0], 0, None)
    return simulate(sc, sc.policies[0], tr, cost_model(sc, prof, tr.max_step_tokens), seed=5)


LAYER = {"name": "layer-baseline", "load": "layer", "cache": {"kind": "none", "capacity": 64}, "memory": "pageable"}
PINNED = {"name": "dedup", "load": "dedup"}


@pytest.mark.parametrize("style", ["offload-grouped", "offload"])
def test_a_factor_of_one_is_the_engine_bit_for_bit(style):
    sc = scenario(LAYER, style)
    assert (run(sc, profile(None))["latency_ms"].to_numpy() == run(sc, profile(1.0))["latency_ms"].to_numpy()).all()


@pytest.mark.parametrize("factor", [0.5, 1.3, 2.0])
def test_pageable_copies_take_the_factor_times_as_long(factor):
    """The layer baseline copies every expert of each layer: its copy stream's busy time
    (every byte of the step) scales by the factor, and the step gets slower with it."""
    sc = scenario(LAYER)
    base, scaled = run(sc, profile(None)), run(sc, profile(factor))
    assert scaled["transfer_ms"].sum() == pytest.approx(base["transfer_ms"].sum() * factor, rel=1e-9)
    assert (scaled["bytes_h2d"] == base["bytes_h2d"]).all()   # the same decisions
    lat, lat0 = scaled["latency_ms"].to_numpy(), base["latency_ms"].to_numpy()
    assert ((lat > lat0) if factor > 1 else (lat < lat0)).all()


def test_pinned_copies_and_the_twin_do_not_move():
    for sc in (scenario(PINNED), scenario(LAYER, style="twin")):
        assert (run(sc, profile(None))["latency_ms"].to_numpy() == run(sc, profile(2.0))["latency_ms"].to_numpy()).all()


def test_the_several_gpu_engine_on_one_gpu_still_equals_the_engine():
    prof = profile(1.7)
    one = run(scenario(LAYER), prof)["latency_ms"].to_numpy()
    mg = run(scenario(LAYER, gpus={"count": 1, "mode": "expert-parallel"}), prof)["latency_ms"].to_numpy()
    np.testing.assert_allclose(mg, one, rtol=1e-12)


def test_in_situ_factors_keep_the_measured_copy():
    sec = copy.deepcopy(load_profile("h200").to_json()["engine"][MODEL])
    sec.pop("in_situ")
    step = {"moe_layers": 16, "layers": 16, "points": [{"batch": 1, "context": 256, "null_ms": 30.0, "resident_ms": 40.0,
                                                      "active": 8.0}],
            "pageable_copy": {"bytes": 12_582_912, "ms": 2.0, "p10": 1.9, "p90": 2.2, "n": 32, "gbps": 6.3}}
    situ = in_situ_factors(step, sec)
    assert situ["pageable_copy"] == {"bytes": 12_582_912, "ms": 2.0}
    sec["in_situ"] = situ
    doc = copy.deepcopy(load_profile("h200").to_json())
    doc["engine"][MODEL] = sec
    assert parse_profile(doc, "p").engine[MODEL].in_situ.pageable_copy.ms == 2.0
    del step["pageable_copy"]
    assert "pageable_copy" not in in_situ_factors(step, sec)


@pytest.mark.parametrize("bad", [{"bytes": 0, "ms": 1.0}, {"bytes": 10, "ms": 0.0}, {"bytes": 10, "ms": 1.0, "x": 1}])
def test_a_bad_pageable_copy_is_refused(bad):
    doc = copy.deepcopy(load_profile("h200").to_json())
    doc["engine"][MODEL]["in_situ"]["pageable_copy"] = bad
    with pytest.raises(InputError, match="in_situ.pageable_copy"):
        parse_profile(doc, "p.json")


def test_no_copy_engine_no_measurement():
    import torch
    host = [[torch.zeros(16) for _ in range(4)] for _ in range(2)]
    assert pageable_copy(host, "cpu") is None
