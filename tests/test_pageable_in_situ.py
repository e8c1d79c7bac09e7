"""Pageable copies as the real-model executor meets them (``engine.<model>.in_situ.pageable_copy``).

``calibrate engine --in-situ`` times every expert's copy from the executor's own pageable pool
(one tensor per expert, a layer's copied back to back), the wall per copy with its launch and
the host's wait. For a real model's style the engine prices a copy of m whole experts from
pageable memory as m of those less the host terms it adds itself (the layer baseline's layer
copy is m copies back to back in the executor), other sizes as the curve scaled by the
measured ms over the curve's. Pinned copies, the twin, a profile without the term and the
several-GPU engine on one GPU keep today's numbers."""
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
    """The shipped h200 profile without OLMoE's in situ pool copies; with ``factor``, its in
    situ pageable copy at ``factor`` x the profile's pageable curve at an expert's bytes."""
    doc = copy.deepcopy(load_profile("h200").to_json())
    situ = doc["engine"][MODEL]["in_situ"]
    situ.pop("pageable_copy", None)
    situ.pop("pinned_copy", None)
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


def layer_ops(sc) -> int:
    """Copy operations of a layer-baseline step: one per layer (all its experts in one)."""
    return get_preset(MODEL).num_layers


@pytest.mark.parametrize("style", ["offload-grouped", "offload"])
def test_a_layer_copy_costs_its_experts_measured_copies(style):
    """Each layer's copy of all 64 experts costs 64 measured copies less a fixed host part
    (the same for any measured ms, positive and below a millisecond), so each step's copy
    stream grows by exactly L x 64 x the change of the measured ms."""
    sc = scenario(LAYER, style)
    E, L = get_preset(MODEL).num_experts, layer_ops(sc)
    plain = cost_model(sc, profile(None), 1).copy_ms(get_preset(MODEL).expert_bytes, "pageable")
    hosts = []
    for f in (0.8, 1.0, 1.6):
        out = run(sc, profile(f))
        per_step = out["transfer_ms"].to_numpy()
        hosts.append(E * plain * f - per_step / L)
    for h in hosts:
        np.testing.assert_allclose(h, hosts[0], rtol=0, atol=1e-9)
    assert 0.0 < hosts[0][0] < 1.0


def test_the_measured_copy_replaces_the_curve_for_a_layer():
    """At the measured ms equal to the curve's, a layer's copy is 64 single-expert copies,
    cheaper than the curve's one 800 MB copy whenever the curve's large sizes are slower."""
    sc = scenario(LAYER)
    nb = get_preset(MODEL).expert_bytes
    cm = cost_model(sc, profile(None), 1)
    E = get_preset(MODEL).num_experts
    one_copy = cm.copy_ms(nb * E, "pageable")
    base, situ = run(sc, profile(None)), run(sc, profile(1.0))
    L = layer_ops(sc)
    np.testing.assert_allclose(base["transfer_ms"].to_numpy(), L * one_copy, rtol=1e-9)
    assert (situ["transfer_ms"].to_numpy() < L * E * cm.copy_ms(nb, "pageable")).all()
    assert (situ["bytes_h2d"] == base["bytes_h2d"]).all()   # the same decisions


def test_other_sizes_scale_the_curve():
    from simulator.engine_costs import DenseCost
    prof = profile(1.5)
    sc = scenario(LAYER)
    cm = cost_model(sc, prof, 1)
    dc = DenseCost(style="offload-grouped", batch=1, phases=[0], tokens=[1], start_context=256,
                   tables=prof.engine[MODEL])
    price = dc.copy_pricer(cm, "pageable", 0.1)
    nb = get_preset(MODEL).expert_bytes
    assert price(nb // 2) == pytest.approx(cm.copy_ms(nb // 2, "pageable") * 1.5, rel=1e-12)
    assert price(3 * nb) == pytest.approx(3 * 1.5 * cm.copy_ms(nb, "pageable") - 0.1, rel=1e-12)
    assert dc.copy_pricer(cm, "pinned", 0.1)(nb) == cm.copy_ms(nb, "pinned")


def test_pinned_copies_and_the_twin_do_not_move():
    for sc in (scenario(PINNED), scenario(LAYER, style="twin")):
        assert (run(sc, profile(None))["latency_ms"].to_numpy() == run(sc, profile(2.0))["latency_ms"].to_numpy()).all()


def assert_one_gpu_is_the_engine(policy: dict, prof, scenario_of=None) -> None:
    """The several-GPU engine on one GPU gives the engine's step latencies for ``policy``."""
    scenario_of = scenario_of or scenario
    one = run(scenario_of(policy), prof)["latency_ms"].to_numpy()
    mg = run(scenario_of(policy, gpus={"count": 1, "mode": "expert-parallel"}), prof)["latency_ms"].to_numpy()
    np.testing.assert_allclose(mg, one, rtol=1e-12)


def situ_step(**measured) -> tuple[dict, dict]:
    """The shipped OLMoE engine section without its in situ, and a one-point in situ step
    document with ``measured`` beside its point."""
    sec = copy.deepcopy(load_profile("h200").to_json()["engine"][MODEL])
    sec.pop("in_situ")
    return sec, {"moe_layers": 16, "layers": 16, "points": [{"batch": 1, "context": 256, "null_ms": 30.0,
                                                             "resident_ms": 40.0, "active": 8.0}], **measured}


def test_the_several_gpu_engine_on_one_gpu_still_equals_the_engine():
    assert_one_gpu_is_the_engine(LAYER, profile(1.7))


@pytest.mark.parametrize("kind,ms", [("pageable_copy", 2.0), ("pinned_copy", 0.25)])
def test_in_situ_factors_keep_the_measured_copy(kind, ms):
    sec, step = situ_step(**{kind: {"bytes": 12_582_912, "ms": ms, "p10": ms * 0.9, "p90": ms * 1.1, "n": 32,
                                    "gbps": 12.6 / ms}})
    situ = in_situ_factors(step, sec)
    assert situ[kind] == {"bytes": 12_582_912, "ms": ms}
    sec["in_situ"] = situ
    doc = copy.deepcopy(load_profile("h200").to_json())
    doc["engine"][MODEL] = sec
    assert getattr(parse_profile(doc, "p").engine[MODEL].in_situ, kind).ms == ms
    del step[kind]
    assert kind not in in_situ_factors(step, sec)


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


def pinned_profile(factor: float):
    """The shipped h200 profile with OLMoE's in situ pinned copy at ``factor`` x the pinned curve."""
    doc = copy.deepcopy(load_profile("h200").to_json())
    nbytes = get_preset(MODEL).expert_bytes
    plain = cost_model(scenario(PINNED), parse_profile(doc, "plain"), 1).copy_ms(nbytes, "pinned")
    doc["engine"][MODEL]["in_situ"]["pinned_copy"] = {"bytes": nbytes, "ms": plain * factor}
    return parse_profile(doc, "test profile")


def test_a_pinned_pool_copy_prices_pinned_loads_whole():
    """A pinned copy of m whole experts costs m measured copies (the launch overlaps the copies
    before it: nothing taken off); other sizes the pinned curve scaled; pageable untouched."""
    from simulator.engine_costs import DenseCost
    prof = pinned_profile(1.08)
    cm = cost_model(scenario(PINNED), prof, 1)
    dc = DenseCost(style="offload-grouped", batch=1, phases=[0], tokens=[1], start_context=256,
                   tables=prof.engine[MODEL])
    nb = get_preset(MODEL).expert_bytes
    price = dc.copy_pricer(cm, "pinned", 0.036)
    assert price(nb) == pytest.approx(1.08 * cm.copy_ms(nb, "pinned"), rel=1e-12)
    assert price(3 * nb) == pytest.approx(3 * 1.08 * cm.copy_ms(nb, "pinned"), rel=1e-12)
    assert price(nb // 2) == pytest.approx(1.08 * cm.copy_ms(nb // 2, "pinned"), rel=1e-12)
    doc = prof.to_json()
    del doc["engine"][MODEL]["in_situ"]["pinned_copy"]
    without = DenseCost(style="offload-grouped", batch=1, phases=[0], tokens=[1], start_context=256,
                        tables=parse_profile(doc, "p").engine[MODEL])
    for n in (nb, 64 * nb, nb // 3):
        assert dc.copy_pricer(cm, "pageable", 0.1)(n) == without.copy_pricer(cm, "pageable", 0.1)(n)


def test_a_slower_pinned_pool_slows_a_copy_bound_row_by_its_copies():
    """Copy-bound (dedup at B=4): each step's copy stream grows by its copies x the change per
    copy; the twin keeps the curve."""
    sc = scenario(PINNED)
    nb = get_preset(MODEL).expert_bytes
    a, b = run(sc, pinned_profile(1.0)), run(sc, pinned_profile(1.1))
    plain = cost_model(sc, pinned_profile(1.0), 1).copy_ms(nb, "pinned")
    copies = (a["bytes_h2d"] / nb).to_numpy()
    np.testing.assert_allclose(b["transfer_ms"].to_numpy() - a["transfer_ms"].to_numpy(), copies * 0.1 * plain,
                               rtol=1e-9)
    assert (b["latency_ms"] > a["latency_ms"]).all()
    twin = scenario(PINNED, style="twin")
    assert (run(twin, pinned_profile(1.0))["latency_ms"] == run(twin, pinned_profile(1.3))["latency_ms"]).all()


def test_a_bad_pinned_copy_is_refused_and_the_cpu_times_no_pool():
    from calibrate.measurements.engine_step import pinned_pool, route_wait
    import torch
    doc = copy.deepcopy(load_profile("h200").to_json())
    doc["engine"][MODEL]["in_situ"]["pinned_copy"] = {"bytes": 10, "ms": -1.0}
    with pytest.raises(InputError, match="in_situ.pinned_copy"):
        parse_profile(doc, "p.json")
    host = [[torch.zeros(16) for _ in range(4)]]
    assert pinned_pool(host, "cpu") is None and route_wait(host, "cpu") is None
