"""The dense op's GPU work alone (``engine.<model>.decode_gpu``): an eager layer's kernels run
as the host issues them, so a GPU that waits on copies meets only their GPU time after the
copies, and an idle GPU the lone layer's measured time. A GPU part as long as the layer is
today's engine bit for bit; a smaller one never makes a step slower, takes up to
``layers x (decode - gpu)`` off a copy-bound step, and at most one layer's off a step whose
GPU waits on the host; the several-GPU engine on one GPU still equals the engine; serving steps
with prefill keep their whole time; the calibration's points become the grid."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from calibrate.measurements.engine_profile import engine_section
from simulator.engine_costs import MixedStepCost
from simulator.planner import DENSE as DENSE_OP
from simulator.profile import load_profile, parse_profile
from simulator.runner import build_trace, cost_model, simulate
from simulator.scenario import parse_scenario
from tests.test_engine_costs import measured_doc

LAYERS = 16   # the whole preset (a changed one has no engine tables)


def profile(gpu_scale: float | None):
    """The shipped h200 profile; with ``gpu_scale``, OLMoE's decode_gpu = its decode grid x scale.
    Without its ``decode_host`` (tests/test_decode_host.py has that): the layer's in situ time
    is then the scaled wall, and only the engine's use of the GPU part is under test here."""
    doc = copy.deepcopy(load_profile("h200").to_json())
    e = doc["engine"]["olmoe-1b-7b"]
    e.pop("decode_gpu", None)
    e.pop("decode_host", None)
    if gpu_scale is not None:
        g = copy.deepcopy(e["decode"])
        g["ms"] = [[v * gpu_scale for v in row] for row in g["ms"]]
        e["decode_gpu"] = g
    return parse_profile(doc, "test profile")


def scenario(policy: dict, style: str = "offload-grouped", batch: int = 16, gpus=None):
    doc = {"name": "dg", "model": "olmoe-1b-7b", "profile": "h200", "seed": 2,
           "replications": 1, "batch_sizes": [batch], "engine": {"style": style},
           "trace": {"generator": "zipf", "steps": 6, "zipf": 1.0, "prompt_tokens": 256}, "policies": [policy]}
    if gpus is not None:
        doc["gpus"] = gpus
    return parse_scenario(doc, "t.yaml")


def latencies(sc, prof) -> np.ndarray:
    tr = build_trace(sc, sc.batch_sizes[0], 0, None)
    return simulate(sc, sc.policies[0], tr, cost_model(sc, prof, tr.max_step_tokens), seed=5)["latency_ms"].to_numpy()


DEDUP = {"name": "dedup", "load": "dedup"}
RESIDENT = {"name": "resident", "cache": {"kind": "static-hot", "capacity": LAYERS * 64}}
LRU_PF = {"name": "lru-pf", "cache": {"kind": "lru", "capacity": 128}, "prefetch": {"kind": "oracle"}}


@pytest.mark.parametrize("style", ["offload-grouped", "offload"])
@pytest.mark.parametrize("pol", [DEDUP, LRU_PF])
def test_a_gpu_grid_at_the_layers_own_time_is_the_engine_bit_for_bit(style, pol):
    """A GPU part as long as the layer (capped at it: here 10x the grid) is today's engine."""
    sc = scenario(pol, style)
    assert (latencies(sc, profile(None)) == latencies(sc, profile(10.0))).all()


@pytest.mark.parametrize("style", ["offload-grouped", "offload"])
@pytest.mark.parametrize("pol", [DEDUP, LRU_PF, RESIDENT])
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_a_smaller_gpu_part_never_slows_a_step(style, pol, batch):
    sc = scenario(pol, style, batch)
    old, new = latencies(sc, profile(None)), latencies(sc, profile(0.2))
    assert (new <= old + 1e-9).all()


def test_a_copy_bound_step_loses_at_most_each_layers_host_part():
    """dedup at B=64 waits on copies at every layer: the dense op after them shrinks to its GPU
    part, so the step gets faster, by no more than layers x (decode - gpu) of the layer."""
    sc = scenario(DEDUP, batch=64)
    old, new = latencies(sc, profile(None)), latencies(sc, profile(0.2))
    dense = profile(None).engine["olmoe-1b-7b"].decode
    most = max(max(r) for r in dense.ms) * 0.8 * LAYERS
    assert (new < old).all() and (old - new <= most + 1e-9).all()
    assert (old - new).min() > 0.2 * 0.8 * min(min(r) for r in dense.ms) * LAYERS   # most layers met it


def test_resident_steps_whose_gpu_waits_on_the_host_change_by_one_layer_at_most():
    """Every expert resident at B=1: the GPU waits on the host at every layer but the first
    (behind the step's embedding), so at most one layer's host part comes off."""
    sc = scenario(RESIDENT, batch=1)
    old, new = latencies(sc, profile(None)), latencies(sc, profile(0.2))
    dense = profile(None).engine["olmoe-1b-7b"].decode
    assert (old - new >= 0).all() and (old - new <= 0.8 * max(max(r) for r in dense.ms)).all()


@pytest.mark.parametrize("pol", [DEDUP, LRU_PF])
def test_several_gpu_engine_on_one_gpu_still_equals_the_engine(pol):
    prof = profile(0.2)
    one = latencies(scenario(pol, batch=16), prof)
    mg = latencies(scenario(pol, batch=16, gpus={"count": 1, "mode": "expert-parallel"}), prof)
    assert (one == mg).all()


def test_serving_steps_with_prefill_keep_their_whole_time():
    prof = profile(0.2)
    sc = scenario(DEDUP)
    mc = MixedStepCost.from_scenario(sc, prof)
    mc.add(8, 300.0, 0, 8)            # decode only: the GPU part, below the whole
    mc.add(8, 300.0, 128, 9)          # decode and a prefill chunk: the whole
    mc.add(0, 0.0, 256, 1)            # prefill only: the whole
    dense, gpu = mc.per_step()[0], mc.gpu_per_step()
    assert gpu[0] == pytest.approx(dense[0] * 0.2 / mc.k_dense, rel=0.02) and gpu[0] < dense[0]
    assert gpu[1:] == dense[1:]
    assert MixedStepCost.from_scenario(sc, profile(None)).gpu_per_step() is None


def test_calibrated_gpu_points_become_the_grid_capped_at_the_point():
    doc = measured_doc()
    pts = doc["tables"]["decode"]["points"]
    pts[0][0]["gpu_ms"], pts[0][1]["gpu_ms"], pts[0][2]["gpu_ms"] = 0.3, 5.0, 0.4   # 5.0: over its point
    sec = engine_section(doc)
    g = sec["decode_gpu"]
    assert g["batch"] == [1] and g["ms"][0][0] == pytest.approx(0.3) and g["ms"][0][1] <= 1.2
    assert (np.diff(np.array(g["ms"]), axis=1) >= 0).all()
    assert "decode_gpu" not in engine_section(measured_doc())   # a CPU run has none


def copy_batches(tl: list) -> list[list[tuple]]:
    """The copy stream's operations, split where the host issued them from another layer
    (between two DENSE ops)."""
    out, cur = [], []
    for e in tl:            # the timeline is in issue order
        if e[0] == "compute" and e[3] == DENSE_OP and e[4] is None:
            if cur:
                out.append(cur)
            cur = []
        elif e[0] == "copy":
            cur.append(e)
    return out + ([cur] if cur else [])


def test_a_router_read_measured_to_wait_for_the_whole_queue_waits_behind_the_copies_before_it():
    """``in_situ.route_wait`` 1: a real model's router read queues behind the host-to-device
    copies issued before it: with next-layer prefetch, the copies a layer issues after its
    router read start no sooner than the read itself ends after the copies issued before it
    (a gap of at least the read; without the wait they would queue back to back behind the
    prefetched ones)."""
    from simulator.engine import ROUTE_ID_BYTES, Engine
    from simulator.engine_costs import DenseCost
    from simulator.planner import Planner

    prof = route_profile(1.0)
    sc = scenario(LRU_PF, batch=64)
    tr = build_trace(sc, 64, 0, None)
    cost = cost_model(sc, prof, tr.max_step_tokens)
    tl: list = []
    Engine(cost, "pinned", DenseCost.for_trace(sc, prof, tr), timeline=tl).run(Planner(sc.model, sc.policies[0], tr))
    batches = [b for b in copy_batches(tl) if b]
    assert len(batches) > LAYERS and sum(any(e[5] for e in b) for b in batches) > LAYERS   # prefetches ran
    read = cost.copy_ms(ROUTE_ID_BYTES * 64 * sc.model.top_k, "pageable", "d2h")
    gaps = [min(e[1] for e in n) - max(e[2] for e in p) for p, n in zip(batches, batches[1:])]
    assert min(gaps) >= read - 1e-9


def route_profile(fraction: float | None):
    """:func:`profile` (GPU part 0.2) with OLMoE's in situ ``route_wait`` set to ``fraction``."""
    doc = profile(0.2).to_json()
    doc["engine"]["olmoe-1b-7b"].setdefault("in_situ", {"dense": 1.0})["route_wait"] = fraction
    return parse_profile(doc, "test profile")


@pytest.mark.parametrize("batch", [4, 64])
def test_a_measured_route_wait_scales_the_wait_between_none_and_the_whole_queue(batch):
    """``in_situ.route_wait``: 0 is the rule without a measurement, bit for bit (the read
    goes through: a next-layer prefetch never slower than with the wait); 1 waits for the
    whole queue; a fraction in between lands in between, step by step; decisions never move."""
    sc = scenario(LRU_PF, batch=batch)
    none, whole, half, zero = (latencies(sc, route_profile(f)) for f in (None, 1.0, 0.5, 0.0))
    assert (none == zero).all()
    assert (zero <= half + 1e-9).all() and (half <= whole + 1e-9).all() and zero.sum() < whole.sum()
    for f in (0.0, 0.5, 1.0):
        doc = route_profile(f).to_json()
        assert (latencies(scenario(DEDUP, batch=batch), parse_profile(doc, "p")) ==
                latencies(scenario(DEDUP, batch=batch), route_profile(None))).all()   # no queue ahead: no wait
    twin = scenario(LRU_PF, style="twin", batch=batch)
    assert (latencies(twin, route_profile(0.0)) == latencies(twin, route_profile(1.0))).all()


def test_a_bad_route_wait_is_refused():
    from simulator.errors import InputError
    doc = profile(0.2).to_json()
    doc["engine"]["olmoe-1b-7b"].setdefault("in_situ", {"dense": 1.0})["route_wait"] = 1.5
    with pytest.raises(InputError, match="in_situ.route_wait"):
        parse_profile(doc, "p.json")


def test_in_situ_factors_keep_the_route_wait():
    from calibrate.measurements.engine_profile import in_situ_factors
    sec = copy.deepcopy(load_profile("h200").to_json()["engine"]["olmoe-1b-7b"])
    sec.pop("in_situ")
    step = {"moe_layers": 16, "layers": 16, "route_wait": {"fraction": 0.4, "fractions": [0.0, 1.0], "copies_ms": 15.0},
            "points": [{"batch": 1, "context": 256, "null_ms": 30.0, "resident_ms": 40.0, "active": 8.0}]}
    assert in_situ_factors(step, sec)["route_wait"] == 0.4
    del step["route_wait"]
    assert "route_wait" not in in_situ_factors(step, sec)
