"""The profile's engine tables and what the simulator prices from them (simulator/engine_costs.py)."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibrate.measurements.engine_profile import engine_section, grid_section, merge_engine
from simulator.engine_costs import DenseCost, GridCost, curve_ms, step_contexts
from simulator.errors import InputError
from simulator.profile import EngineGrid, load_profile, parse_profile
from simulator.scenario import parse_scenario
from tests.conftest import scenario_dict

B, C = [1, 4, 16, 64], [128, 512, 2048, 8192]


def power_grid(a=0.5, p=0.2, q=0.1) -> EngineGrid:
    return EngineGrid(batch=B, context=C, ms=[[a * b ** p * c ** q for c in C] for b in B])


def engine_entry(**over) -> dict:
    e = {"decode": power_grid().model_dump(), "prefill": [[16, 1.0], [256, 2.0], [4096, 20.0]],
         "head": [[1, 0.3], [64, 0.6]], "styles": {"grouped": {"base_ms": 0.2, "per_expert_ms": 0.01}}}
    e.update(over)
    return e


def profile_with(entry: dict, model: str = "olmoe-1b-7b") -> dict:
    doc = load_profile().to_json()
    doc["engine"] = {model: entry}
    return doc


def test_engine_tables_round_trip_through_the_profile():
    prof = parse_profile(profile_with(engine_entry(dense_decode=power_grid().model_dump(), dense_layers=1)), "p")
    again = parse_profile(json.loads(json.dumps(prof.to_json())), "p")
    assert again.engine == prof.engine and again.engine["olmoe-1b-7b"].dense_layers == 1


@pytest.mark.parametrize("mutate, field", [
    (lambda e: e["decode"].update(batch=[4, 1, 16, 64]), "engine.olmoe-1b-7b.decode"),
    (lambda e: e["decode"]["ms"].pop(), "engine.olmoe-1b-7b.decode"),
    (lambda e: e["decode"]["ms"][0].__setitem__(0, -1.0), "engine.olmoe-1b-7b.decode"),
    (lambda e: e.update(prefill=[[16, 1.0], [8, 2.0]]), "engine.olmoe-1b-7b"),
    (lambda e: e.update(dense_layers=1), "engine.olmoe-1b-7b"),
    (lambda e: e["styles"]["grouped"].update(per_expert_ms=-1), "engine.olmoe-1b-7b.styles.grouped.per_expert_ms"),
])
def test_bad_engine_tables_one_clear_error(mutate, field):
    e = engine_entry()
    mutate(e)
    with pytest.raises(InputError) as err:
        parse_profile(profile_with(e), "p.json")
    assert str(err.value).startswith(f"p.json: {field}")


def test_log_log_bilinear_is_exact_for_power_laws_and_at_grid_points():
    g = GridCost(power_grid())
    for b, c in [(1, 128), (2, 300), (10, 1000), (64, 8192), (33, 5000)]:
        assert g.ms(b, c) == pytest.approx(0.5 * b ** 0.2 * c ** 0.1, rel=1e-9)
    assert not g.notes


def test_outside_the_grid_clamps_with_a_note():
    g = GridCost(power_grid())
    assert g.ms(256, 32768) == pytest.approx(g.ms(64, 8192))
    assert g.ms(1, 16) == pytest.approx(g.ms(1, 128))
    assert any("batch above" in n for n in g.notes) and any("context below" in n for n in g.notes)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.01, 100), min_size=16, max_size=16), st.floats(1, 64), st.floats(128, 8192),
       st.floats(1, 4), st.floats(1, 4))
def test_interpolation_is_monotone(values, b, c, fb, fc):
    """More batch or more context never costs less, whatever the measured grid (noisy)."""
    g = GridCost(EngineGrid(batch=B, context=C, ms=np.reshape(values, (4, 4)).tolist()))
    assert g.ms(b * fb, c) >= g.ms(b, c) * (1 - 1e-12)
    assert g.ms(b, c * fc) >= g.ms(b, c) * (1 - 1e-12)


def test_curve_interpolates_and_extrapolates_linearly():
    pts = [(16, 1.0), (256, 2.0), (4096, 20.0)]
    assert curve_ms(pts, 16) == 1.0 and curve_ms(pts, 8) == 1.0
    assert curve_ms(pts, 64) == pytest.approx(math.sqrt(2.0))   # halfway in log-log
    assert curve_ms(pts, 8192) == pytest.approx(40.0)


def test_context_grows_each_decode_step_and_prefill_is_priced_by_tokens():
    phases = np.array([1, 0, 0, 0])
    assert step_contexts(phases, 256).tolist() == [256, 256, 257, 258]
    t = parse_profile(profile_with(engine_entry()), "p").engine["olmoe-1b-7b"]
    cost = DenseCost(style="grouped", batch=4, phases=phases, tokens=[4 * 256, 4, 4, 4], start_context=256, tables=t)
    g = GridCost(t.decode)
    assert cost.dense_ms(0, 0) == pytest.approx(curve_ms(t.prefill, 1024))
    assert [cost.dense_ms(s, 3) for s in (1, 2, 3)] == pytest.approx([g.ms(4, 256), g.ms(4, 257), g.ms(4, 258)])
    assert cost.dense_ms(3, 0) > cost.dense_ms(1, 0)
    assert cost.step_extra_ms(1) == pytest.approx(curve_ms(t.head, 4))
    assert cost.expert_call_ms(10) == pytest.approx(0.3)
    assert DenseCost(style="hf-eager", batch=4, phases=phases, tokens=[1, 4, 4, 4], tables=t).expert_call_ms(3) is None


def test_dense_layers_are_priced_per_step():
    e = engine_entry(dense_decode=EngineGrid(batch=B, context=C, ms=[[2.0] * 4] * 4).model_dump(), dense_layers=1)
    t = parse_profile(profile_with(e), "p").engine["olmoe-1b-7b"]
    cost = DenseCost(style="grouped", batch=1, phases=[0], tokens=[1], start_context=128, tables=t)
    assert cost.step_extra_ms(0) == pytest.approx(0.3 + 2.0)


def test_twin_style_and_override():
    twin = DenseCost(style="twin", batch=4, phases=[0, 0], tokens=[4, 4], twin_dense_ms=0.05)
    assert twin.dense_ms(1, 0) == 0.05 and twin.step_extra_ms(1) == 0.0
    t = parse_profile(profile_with(engine_entry()), "p").engine["olmoe-1b-7b"]
    over = DenseCost(style="grouped", batch=4, phases=[0, 0], tokens=[4, 4], tables=t, override_ms=0.7)
    assert over.dense_ms(0, 0) == 0.7 and over.step_extra_ms(0) > 0


def test_from_scenario_keys_and_missing_tables():
    d = scenario_dict(model="olmoe-1b-7b", engine={"style": "grouped"})
    d["trace"] = {**d["trace"], "prompt_tokens": 512}
    sc = parse_scenario(d)
    prof = parse_profile(profile_with(engine_entry()), "p")
    cost = DenseCost.from_scenario(sc, prof, batch=4, phases=[0, 0], tokens=[4, 4])
    assert cost.contexts.tolist() == [512, 513]
    rec = DenseCost.from_scenario(sc, prof, batch=2, phases=[0], tokens=[2], prompt_lengths=[100, 300, 0])
    assert rec.contexts.tolist() == [200]      # the recorded sequences' own (known) lengths
    with pytest.raises(InputError, match="engine.olmoe-1b-7b: no engine tables"):
        DenseCost.from_scenario(sc, load_profile(), batch=4, phases=[0], tokens=[4])
    from simulator.traces import generate
    tr = generate(num_layers=16, num_experts=64, top_k=8, batch_size=4, steps=3, seed=0, prefill_tokens=10)
    per_trace = DenseCost.for_trace(parse_scenario({**d, "trace": {**d["trace"], "prompt_tokens": 10,
                                                                   "prefill_tokens": 10}}), prof, tr)
    assert per_trace.batch == 4 and per_trace.contexts.tolist() == [10, 10, 11, 12]
    assert per_trace.dense_ms(0, 0) == pytest.approx(curve_ms(prof.engine["olmoe-1b-7b"].prefill, 40))
    twin = parse_scenario(scenario_dict(model="olmoe-1b-7b"))
    assert DenseCost.from_scenario(twin, load_profile(), batch=4, phases=[0], tokens=[4]).dense_ms(0, 0) == 0.0


@pytest.mark.parametrize("trace, engine, field", [
    ({"prompt_tokens": 10 ** 9}, {}, "trace.prompt_tokens"),
    ({"prompt_tokens": -1}, {}, "trace.prompt_tokens"),
    ({"prompt_tokens": 5, "prefill_tokens": 7}, {}, "trace"),
    ({}, {"style": "vllm"}, "engine.style"),
])
def test_new_scenario_keys_validated(trace, engine, field):
    d = scenario_dict(engine=engine)
    d["trace"] = {**d["trace"], **trace}
    with pytest.raises(InputError) as err:
        parse_scenario(d, "s.yaml")
    assert str(err.value).startswith(f"s.yaml: {field}:")


def measured_doc() -> dict:
    pt = lambda ms: {"ms": ms, "p10": ms, "p90": ms, "spread": 0.0, "host_ms": ms, "trials": 3}  # noqa: E731
    return {
        "format": "simmoe-engine", "version": 1, "model": "deepseek-v2-lite", "tiny": False, "trials": 3,
        "provenance": {"gpu": "x"}, "elapsed_s": 1.0,
        "tables": {
            "decode": {"batch": [1, 2, 4], "context": [128, 256, 512],
                       "points": [[pt(1.0), pt(1.2), pt(1.44)], [pt(1.1), None, None], [None, None, None]]},
            "dense_decode": {"batch": [1], "context": [128], "points": [[pt(3.0)]]},
            "prefill": {"points": [{"tokens": 16, **pt(2.0)}]},
            "head": {"points": [{"batch": 1, **pt(0.4)}]},
            "experts": {"hf-eager": {"points": [{"batch": 1, "active": 6, **pt(6.0)}, {"batch": 4, "active": 20, **pt(20.0)}],
                                     "fit": {"base_ms": 0.0, "per_expert_ms": 1.0, "max_abs_error": 0.0}}},
        },
    }


def test_engine_section_fills_holes_and_is_monotone():
    sec = engine_section(measured_doc())
    d = sec["decode"]
    assert d["batch"] == [1, 2] and d["filled"] == [(1, 1), (1, 2)]   # the empty batch-4 row dropped
    ms = np.array(d["ms"])
    assert (np.diff(ms, axis=0) >= 0).all() and (np.diff(ms, axis=1) >= 0).all()   # filled, then non-decreasing
    assert sec["dense_layers"] == 1 and sec["styles"]["hf-eager"]["per_expert_ms"] == 1.0
    g = grid_section({"batch": [1, 2], "context": [8], "points": [[{"ms": 2.0}], [{"ms": 1.0}]]})
    # a point above its successor is pooled with it (least squares), not carried up to every later one
    assert g["ms"] == [[1.5], [1.5]] and g["errors"][1][0] == pytest.approx(0.5) and g["max_abs_error"] == pytest.approx(0.5)


def test_isotonic_pools_violators_and_keeps_order():
    from simulator.engine_costs import isotonic, monotone_grid
    assert isotonic([1.0, 3.0, 2.0, 4.0]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert isotonic([5.0, 1.0, 1.0, 1.0]).tolist() == [2.0, 2.0, 2.0, 2.0]
    g = monotone_grid(np.array([[1.225, 0.88, 0.86], [0.9, 0.92, 1.5], [1.1, 2.4, 4.1]]))
    assert (np.diff(g, axis=0) >= 0).all() and (np.diff(g, axis=1) >= 0).all()
    assert g[0, 0] < 1.0          # the noisy corner no longer floors the grid


def test_merge_into_profile(tmp_path):
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps(load_profile().to_json()))
    eng = tmp_path / "e.json"
    eng.write_text(json.dumps(measured_doc()))
    merge_engine(prof, [eng], tmp_path / "out.json")
    p = parse_profile(json.loads((tmp_path / "out.json").read_text()), "out")
    assert list(p.engine) == ["deepseek-v2-lite"]
    eng.write_text(json.dumps({**measured_doc(), "tiny": True}))
    merge_engine(tmp_path / "out.json", [eng], tmp_path / "out.json")
    assert sorted(json.loads((tmp_path / "out.json").read_text())["engine"]) == ["deepseek-v2-lite", "deepseek-v2-lite-tiny"]
    bad = copy.deepcopy(measured_doc())
    bad["format"] = "x"
    eng.write_text(json.dumps(bad))
    with pytest.raises(InputError, match="e.json: format"):
        merge_engine(prof, [eng], tmp_path / "out2.json")
    assert not (tmp_path / "out2.json").exists()
