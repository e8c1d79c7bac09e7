"""The real-model executor's host terms: per copy, in situ factors, host-speed scaling, the
context grid's edge (calibrate engine --style offload --in-situ)."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from calibrate.measurements.engine import edge_contexts, per_load_ms
from calibrate.measurements.engine_profile import engine_section, in_situ_factors
from calibrate.validation.model_rows import host_scaled
from simulator.engine_costs import DenseCost, GridCost
from simulator.profile import ModelEngine, load_profile, parse_profile

MODEL = "olmoe-1b-7b"


def _pts(host):
    return [{"batch": b, "active": a, "ms": h, "host_ms": h} for b, a, h in host]


def test_per_load_is_the_slope_of_the_copies_host_time():
    resident = _pts([(1, 8, 1.0), (4, 20, 2.0), (16, 50, 5.0)])
    loaded = _pts([(1, 8, 1.0 + 8 * 0.1), (4, 20, 2.0 + 20 * 0.1), (16, 50, 5.0 + 50 * 0.1)])
    assert per_load_ms(resident, loaded) == pytest.approx(0.1)
    assert per_load_ms(resident, _pts([(64, 64, 9.0)])) is None          # no batch in common
    assert per_load_ms(resident, _pts([(1, 8, 0.5)])) == 0.0              # noise below zero: none


def test_edge_context_added_inside_the_models_positions():
    assert edge_contexts([128, 1024, 4096, 8192], 4096) == [128, 1024, 4032]
    assert edge_contexts([128, 256], 4096) == [128, 256]
    assert edge_contexts([4096], 4096) == [4032]


def _doc():
    """An engine document whose offload style and whole steps are known exactly."""
    sec = load_profile("h200").engine[MODEL].model_dump(mode="json")
    t = ModelEngine.model_validate(sec)
    from simulator.engine_costs import GridCost, curve_ms
    L = 16
    dense = GridCost(t.decode)
    pts = []
    for b, active in ((1, 8.0), (16, 57.0)):
        head = curve_ms(t.head, b)
        null = head + 1.25 * L * dense.ms(b, 256)
        off = t.styles["offload"]
        pts.append({"batch": b, "context": 256, "null_ms": null, "active": active,
                    "resident_ms": null + 1.5 * L * (off.base_ms + off.per_expert_ms * active)})
    return sec, {"layers": L, "moe_layers": L, "steps": 8, "warmup": 2, "points": pts}


def test_in_situ_factors_recover_how_the_step_meets_the_tables():
    sec, step = _doc()
    f = in_situ_factors(step, sec)
    assert f["dense"] == pytest.approx(1.25) and f["experts"] == pytest.approx(1.5)
    bad = copy.deepcopy(step)
    for p in bad["points"]:
        p["resident_ms"] = p["null_ms"] * 0.5        # a noisy run: resident faster than none
    assert in_situ_factors(bad, sec)["experts"] is None


def test_a_grouped_style_gets_its_own_in_situ_factor():
    """Resident steps timed in a grouped style give that style its own experts factor: its step
    less the eager null step (a graphed style: less the head and its replayed decode table),
    over MoE layers x its isolated call; the simulator applies it to that style alone."""
    sec, step = _doc()
    t = ModelEngine.model_validate(sec)
    from simulator.engine_costs import GridCost, curve_ms
    L = step["moe_layers"]
    grouped = t.styles["offload-grouped"]
    graphed = grouped.model_copy(update={"decode": t.decode})     # a graphed style's own grid, here the eager one
    sec["styles"]["offload-graphs"] = graphed.model_dump(mode="json")
    for p in step["points"]:
        call = grouped.base_ms + grouped.per_expert_ms * p["active"]
        around = curve_ms(t.head, p["batch"]) + L * GridCost(t.decode).ms(p["batch"], 256)
        p["styles"] = {"offload-grouped": p["null_ms"] + 0.8 * L * call, "offload-graphs": around + 0.6 * L * call}
    f = in_situ_factors(step, sec)
    assert f["experts"] == pytest.approx(1.5)                               # the loop's, unchanged
    assert f["styles"] == pytest.approx({"offload-grouped": 0.8, "offload-graphs": 0.6})
    situ = ModelEngine.model_validate({**sec, "in_situ": f})
    kw = dict(batch=4, phases=np.zeros(3, np.uint8), tokens=np.full(3, 4), start_context=256, tables=situ)
    base = ModelEngine.model_validate({**sec, "in_situ": None})
    for style, k in (("offload-grouped", 0.8), ("offload-graphs", 0.6), ("offload", 1.5)):
        a = DenseCost(style=style, **{**kw, "tables": base}).expert_host_ms(0.1)
        b = DenseCost(style=style, **kw).expert_host_ms(0.1)
        assert b == pytest.approx((k * a[0], k * a[1])), style
    with pytest.raises(ValueError):
        ModelEngine.model_validate({**sec, "in_situ": {**f, "styles": {"offload-grouped": -1.0}}})


def test_dense_cost_applies_the_in_situ_factors():
    prof = load_profile("h200")
    t = prof.engine[MODEL]
    plain = t.model_copy(update={"in_situ": None, "decode_host": None})
    situ = ModelEngine.model_validate({**t.model_dump(mode="json"), "in_situ": {"dense": 1.25, "experts": 1.5},
                                       "decode_host": None})
    assert not situ.in_situ.points
    kw = dict(style="offload", batch=4, phases=np.zeros(3, np.uint8), tokens=np.full(3, 4), start_context=256)
    a, b = DenseCost(tables=plain, **kw), DenseCost(tables=situ, **kw)
    assert b.dense_ms(1, 0) == pytest.approx(1.25 * a.dense_ms(1, 0))   # no host part: the whole wall
    with_host = ModelEngine.model_validate({**situ.model_dump(mode="json"), "decode_host": t.decode_host.model_dump()})
    host = GridCost(t.decode_host).ms(4, 257)   # a host-bound point (step 1: context 257): its host part scaled
    assert DenseCost(tables=with_host, **kw).dense_ms(1, 0) == pytest.approx(a.dense_ms(1, 0) + 0.25 * host)
    assert b.step_extra_ms(1) == pytest.approx(a.step_extra_ms(1))          # the head is measured per step
    (ba, pa), (bb, pb) = a.expert_host_ms(0.1), b.expert_host_ms(0.1)
    assert (bb, pb) == pytest.approx((1.5 * ba, 1.5 * pa))
    assert b.load_host_ms(0.05) == pytest.approx(1.5 * a.load_host_ms(0.05))
    assert pa == pytest.approx(t.styles["offload"].host_per_expert_ms)     # the host fit, not the wall fit


def test_host_scaled_scales_host_terms_not_gpu_terms():
    prof = load_profile("h200")
    q = host_scaled(prof, MODEL, 2.0)
    assert q.host.launch_us.expert == pytest.approx(2 * prof.host.launch_us.expert)
    assert q.engine[MODEL].decode.ms[0][0] == pytest.approx(2 * prof.engine[MODEL].decode.ms[0][0])
    off, off2 = prof.engine[MODEL].styles["offload"], q.engine[MODEL].styles["offload"]
    assert off2.host_per_load_ms == pytest.approx(2 * off.host_per_load_ms)
    assert q.copy_.h2d.pinned == prof.copy_.h2d.pinned                      # copies: the GPU's side
    assert q.compute.gpu == prof.compute.gpu


def test_engine_section_keeps_the_offload_host_terms_and_in_situ():
    import json
    from pathlib import Path
    doc = json.loads((Path(__file__).parent.parent / "docs/validation/runs/engine-h200-offload/engine-offload-olmoe-1b-7b.json").read_text())
    sec = engine_section(doc)
    st = sec["styles"]["offload"]
    assert st["host_per_expert_ms"] > 0 and st["host_per_load_ms"] is not None
    assert 0.3 < sec["in_situ"]["dense"] < 3 and sec["source"]["host_probe_dispatch_us"] > 0
    ModelEngine.model_validate(sec)


def test_cpu_lists_parse_and_bad_ones_say_why():
    from calibrate.measurements.host_speed import parse_cpus
    assert parse_cpus("0-3,8") == [0, 1, 2, 3, 8] and parse_cpus("2,2") == [2]
    for bad in ("x", "3-1", "1-", "-1", "0-99999"):
        with pytest.raises(ValueError):
            parse_cpus(bad)


def test_in_situ_steps_run_on_a_tiny_model():
    from calibrate.measurements.engine_step import measure_in_situ
    step = measure_in_situ(MODEL, device="cpu", tiny=True, batches=[1, 2], contexts=[8], steps=2, warmup=1,
                           styles={"offload-grouped": "grouped", "offload-graphs": "graphs"})
    assert [p["batch"] for p in step["points"]] == [1, 2]
    assert all(p["null_ms"] > 0 and p["resident_ms"] > 0 and 1 <= p["active"] for p in step["points"])
    assert all(set(p["styles"]) == {"offload-grouped", "offload-graphs"} and min(p["styles"].values()) > 0
               for p in step["points"])
    assert all(p["probe_dispatch_us"] > 0 for p in step["points"])   # the host's speed beside its steps


def test_now_is_against_the_probe_beside_the_in_situ_steps():
    """validate's "now" factor divides the row's probe by the one the in situ steps met, where
    the profile has it, else by the engine run's own (before and after it)."""
    from calibrate.measurements.engine_profile import in_situ_factors
    from calibrate.validation.model_rows import probe_factor
    doc = load_profile("h200").to_json()
    sec = doc["engine"][MODEL]
    run_probe = sec["source"]["host_probe_dispatch_us"]
    step = {"moe_layers": 16, "layers": 16, "points": [
        {"batch": b, "context": 256, "null_ms": 30.0, "resident_ms": 40.0, "active": 8.0, "probe_dispatch_us": us}
        for b, us in ((1, 7.0), (4, 7.2), (16, 9.5))]}
    situ = in_situ_factors(step, {k: v for k, v in sec.items() if k != "in_situ"})
    assert situ["probe_dispatch_us"] == pytest.approx(7.2)            # the points' median
    probes = [{"dispatch_us": 9.0}, {"dispatch_us": 10.0}, None]
    sec["in_situ"] = situ
    assert probe_factor(probes, parse_profile(doc, "p"), MODEL) == pytest.approx((9.5, 9.5 / 7.2))
    del sec["in_situ"]["probe_dispatch_us"]
    assert probe_factor(probes, parse_profile(doc, "p"), MODEL) == pytest.approx((9.5, 9.5 / run_probe))
    assert probe_factor([], parse_profile(doc, "p"), MODEL) == (None, None)


def test_in_situ_factor_by_batch():
    from simulator.engine_costs import situ_factor
    from simulator.profile import InSitu
    s = InSitu(dense=1.0, experts=2.0, points=[{"batch": 1, "context": 256, "dense": 0.8, "experts": 1.5},
                                              {"batch": 16, "context": 256, "dense": 1.2, "experts": -0.3}])
    assert situ_factor(s, "dense", 1) == pytest.approx(0.8) and situ_factor(s, "dense", 16) == pytest.approx(1.2)
    assert situ_factor(s, "dense", 4) == pytest.approx(1.0)               # halfway in log batch
    assert situ_factor(s, "dense", 256) == pytest.approx(1.2)             # clamped
    assert situ_factor(s, "experts", 64) == pytest.approx(1.5)            # the negative point left out
    assert situ_factor(None, "dense", 4) == 1.0
    assert situ_factor(InSitu(dense=1.3), "dense", 4) == pytest.approx(1.3)  # no points: the median
