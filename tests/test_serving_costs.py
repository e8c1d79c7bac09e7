"""Mixed steps priced per token kind (engine_costs.MixedStepCost) against DenseCost's own
decode and prefill prices, and the engine hooks a serving run uses."""
from __future__ import annotations

import pytest

from simulator.engine_costs import DenseCost, MixedStepCost
from simulator.profile import load_profile
from simulator.scenario import parse_scenario


def olmoe(style="hf-eager", **engine):
    return parse_scenario({"name": "c", "model": "olmoe-1b-7b", "profile": "h200", "batch_sizes": [4],
                           "trace": {"generator": "uniform"}, "engine": {"style": style, **engine},
                           "policies": [{"name": "p"}]})


def test_decode_only_and_prefill_only_match_dense_cost():
    sc, prof = olmoe(), load_profile("h200")
    mix = MixedStepCost.from_scenario(sc, prof)
    tables = prof.engine["olmoe-1b-7b"]
    dec = DenseCost(style="hf-eager", batch=4, phases=[0], tokens=[4], start_context=512, tables=tables)
    d, x = mix.price(4, 512, 0, 4)
    assert d == pytest.approx(dec.dense_ms(0, 0)) and x == pytest.approx(dec.step_extra_ms(0))
    pre = DenseCost(style="hf-eager", batch=4, phases=[1], tokens=[700], tables=tables)
    d, _ = mix.price(0, 0, 700, 2)
    assert d == pytest.approx(pre.dense_ms(0, 0))
    both = mix.price(4, 512, 700, 6)[0]
    assert both == pytest.approx(dec.dense_ms(0, 0) + pre.dense_ms(0, 0))   # the two kinds add up
    assert mix.expert_host_ms(0.01) == dec.expert_host_ms(0.01)


def test_twin_and_override_keep_the_constant():
    sc = olmoe("twin")
    mix = MixedStepCost.from_scenario(sc, load_profile("h200"))
    assert mix.price(8, 100, 300, 9) == (sc.model.dense_ms_per_layer, 0.0)
    over = MixedStepCost.from_scenario(olmoe("hf-eager", dense_ms_per_layer=0.7), load_profile("h200"))
    assert over.price(8, 100, 300, 9)[0] == 0.7


def test_steps_grow_the_lists_the_engine_reads():
    mix = MixedStepCost.from_scenario(olmoe(), load_profile("h200"))
    dense, extra = mix.per_step()
    mix.add(4, 300, 0, 4)
    mix.add(2, 300, 128, 3)
    assert len(dense) == len(extra) == 2 and dense[1] > dense[0]
