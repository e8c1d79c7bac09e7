"""A CPU miss as the real-model executor runs it (``engine.<model>.in_situ.cpu_path``).

``calibrate engine --in-situ`` times the executor's own CPU expert (the layer's activations
down once, the FFN on cold host weights, the result up from pinned memory) by tokens, and a
real model's style prices its CPU misses by that curve in place of the profile's CPU table
(the twin's path, which copies each call's tokens down and up). The twin, and a profile
without the curve, keep today's numbers; the several-GPU engine on one GPU still equals the
engine; bad curves are refused with the field named."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from calibrate.measurements.engine_profile import in_situ_factors
from simulator.errors import InputError
from simulator.profile import load_profile, parse_profile
from simulator.runner import cost_model
from tests.test_pageable_in_situ import MODEL, assert_one_gpu_is_the_engine, run, situ_step
from tests.test_pageable_in_situ import scenario as pageable_scenario

CPU_MISS = {"name": "cpu-miss", "load": "dedup", "cache": {"kind": "lru", "capacity": 256}, "miss": "cpu"}


def profile(scale: float | None):
    """The shipped h200 profile; with ``scale``, OLMoE's in situ CPU path = the profile's CPU
    path x scale at 1-256 tokens."""
    doc = copy.deepcopy(load_profile("h200").to_json())
    situ = doc["engine"][MODEL]["in_situ"]
    situ.pop("cpu_path", None)
    if scale is not None:
        cm = cost_model(scenario(CPU_MISS), parse_profile(doc, "plain"), 256)
        situ["cpu_path"] = [[t, cm.cpu_path_ms(t) * scale] for t in range(1, 257)]
        situ["cpu_threads"] = 8
    return parse_profile(doc, "test profile")


def scenario(policy: dict, style: str = "offload-grouped", gpus=None):
    return pageable_scenario(policy, style, batch=16, gpus=gpus)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_cpu_misses_take_the_executors_own_time(scale):
    """Every CPU expert of the step costs the curve's time: the host's CPU ms scale with it,
    the decisions stay, and the step moves the same way."""
    sc = scenario(CPU_MISS)
    base, scaled = run(sc, profile(None)), run(sc, profile(scale))
    assert scaled["cpu_ms"].sum() == pytest.approx(base["cpu_ms"].sum() * scale, rel=1e-9)
    assert (scaled["bytes_h2d"] == base["bytes_h2d"]).all() and (scaled["cpu_computes"] == base["cpu_computes"]).all()
    lat, lat0 = scaled["latency_ms"].to_numpy(), base["latency_ms"].to_numpy()
    assert ((lat > lat0) if scale > 1 else (lat < lat0)).all()


def test_the_twin_does_not_move_and_the_same_curve_is_the_same_projection():
    twin = scenario(CPU_MISS, style="twin")
    assert (run(twin, profile(None))["latency_ms"].to_numpy() == run(twin, profile(3.0))["latency_ms"].to_numpy()).all()
    sc = scenario(CPU_MISS)
    np.testing.assert_allclose(run(sc, profile(1.0))["latency_ms"].to_numpy(),
                               run(sc, profile(None))["latency_ms"].to_numpy(), rtol=1e-12)


def test_the_several_gpu_engine_on_one_gpu_still_equals_the_engine():
    assert_one_gpu_is_the_engine(CPU_MISS, profile(1.7), scenario)


def test_in_situ_factors_keep_the_curve_and_its_threads():
    sec, step = situ_step(cpu_path={"tokens": [1, 4, 16], "ms": [0.8, 0.9, 1.4], "threads": 8})
    situ = in_situ_factors(step, sec)
    assert situ["cpu_path"] == [[1, 0.8], [4, 0.9], [16, 1.4]] and situ["cpu_threads"] == 8
    doc = copy.deepcopy(load_profile("h200").to_json())
    doc["engine"][MODEL]["in_situ"] = situ
    assert parse_profile(doc, "p").engine[MODEL].in_situ.cpu_path[2] == (16, 1.4)


@pytest.mark.parametrize("bad", [[[4, 1.0], [1, 0.5]], [[0, 1.0]], [[1, 0.0]], [[1, 1.0], [1, 2.0]]])
def test_a_bad_cpu_path_is_refused(bad):
    doc = copy.deepcopy(load_profile("h200").to_json())
    doc["engine"][MODEL]["in_situ"]["cpu_path"] = bad
    with pytest.raises(InputError, match="in_situ.cpu_path"):
        parse_profile(doc, "p.json")


def test_the_executors_cpu_path_runs_on_a_tiny_model():
    """On the CPU: the curve covers the token counts asked for, every point positive, with
    the threads it ran with; the executor's CPU expert gives the model's own result."""
    import torch

    from calibrate.executors.model import host_experts, record_routing
    from calibrate.measurements.engine_step import cpu_path
    from calibrate.models.build import build_model
    b = build_model(MODEL, tiny=True, dtype="fp32")
    tr = record_routing(b, batch=2, steps=2)
    out = cpu_path(b, host_experts(b, pinned=False), tr, "cpu", tokens=[1, 3, 8], passes=1)
    assert out["tokens"] == [1, 3, 8] and all(ms > 0 for ms in out["ms"]) and out["threads"] == torch.get_num_threads()
