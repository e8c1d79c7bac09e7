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


def test_a_prefill_chunk_pays_for_the_context_before_it():
    """A chunk at offset c adds c x the decode grid's context slope (batch 1) to its layer's
    dense op; the slope is the grid's own, and the term is linear in the summed offsets."""
    from simulator.engine_costs import context_slope

    sc, prof = olmoe(), load_profile("h200")
    mix = MixedStepCost.from_scenario(sc, prof)
    g = mix.decode
    c0, c1 = g.grid.context[0], g.grid.context[-1]
    slope = (g.ms(1, c1) - g.ms(1, c0)) / (c1 - c0)
    assert slope > 0 and context_slope(g) == pytest.approx(slope)
    base = mix.price(0, 0, 256, 1)[0]
    at = mix.price(0, 0, 256, 1, prefill_context=1024)[0]
    assert at - base == pytest.approx(slope * 1024)
    two = mix.price(0, 0, 512, 2, prefill_context=1024 + 512)[0] - mix.price(0, 0, 512, 2)[0]
    assert two == pytest.approx(slope * 1536)
    assert MixedStepCost.from_scenario(olmoe("twin"), prof).price(0, 0, 256, 1, 4096) == (sc.model.dense_ms_per_layer, 0.0)


def test_the_driver_prices_chunks_by_their_offsets():
    """In a serving run a prompt longer than the chunk is prefilled over several steps; the
    later chunks' dense op is dearer than the first's by the context slope x their offsets."""
    from simulator.serving.runner import serve_one

    d = {"name": "ctx", "model": "olmoe-1b-7b", "profile": "h200", "batch_sizes": [1], "replications": 1,
         "trace": {"generator": "uniform"}, "engine": {"style": "hf-eager"},
         "workload": {"requests": 1, "arrivals": {"kind": "poisson", "rate": 1.0},
                      "prompt": {"kind": "fixed", "value": 768}, "output": {"kind": "fixed", "value": 2},
                      "scheduler": {"token_budget": 256, "chunk": 256}},
         "policies": [{"name": "lru", "cache": {"kind": "lru", "capacity": 512}}]}
    sc = parse_scenario(d)
    prof = load_profile("h200")
    from simulator.serving.runner import make_driver, setup_run

    mix = MixedStepCost.from_scenario(sc, prof)
    run = setup_run(sc, sc.policies[0], 1, 0)
    drive = make_driver(run, mix)
    offsets = []
    for plan, s in drive.steps():
        offsets.append([it.row0 for it in plan.items if it.kind == 1])
        run.planner.plan_step(s)
        drive.finish(plan, 1.0)
    assert offsets == [[0], [256], [512], []]
    ref = MixedStepCost.from_scenario(sc, prof)
    want = [ref.price(0, 0, 256, 1, c)[0] for c in (0, 256, 512)]
    assert mix.dense[:3] == pytest.approx(want)
    assert want[2] - want[1] == pytest.approx(want[1] - want[0]) and want[1] > want[0]
    assert len(serve_one(sc, sc.policies[0], 1, 0, prof).steps) == 4


def test_a_padded_style_prices_a_mixed_step_on_its_padded_rows():
    """transformers' batched forward pads a step's rows to its longest: a decode token beside a
    256-token chunk is a row of 256, so the step's non-expert part is one prefill of rows x
    longest tokens (plus every row's context term); a decode-only or one-row step, and a
    style that does not pad (graphs), keep the unpadded price (decode and prefill added up as
    two passes; the padded step is one, so it can be the cheaper)."""
    prof = load_profile("h200")
    mix = MixedStepCost.from_scenario(olmoe("offload-grouped"), prof)
    t = prof.engine["olmoe-1b-7b"]
    from simulator.engine_costs import curve_ms
    plain = mix.price(3, 512, 256, 4, prefill_context=0)
    padded = mix.price(3, 512, 256, 4, prefill_context=0, longest=256)
    assert padded[0] == pytest.approx(curve_ms(t.prefill, 4 * 256) + mix.ctx_ms_per_token * 3 * 512)
    assert padded[0] != plain[0] and padded[1] == pytest.approx(plain[1])     # the head: per sequence
    assert mix.price(4, 512, 0, 4, longest=1) == mix.price(4, 512, 0, 4)       # decode only: no padding
    assert mix.price(0, 0, 256, 1, longest=256) == mix.price(0, 0, 256, 1)     # one row: none
    graphs = MixedStepCost.from_scenario(olmoe("offload-graphs"), prof)
    assert graphs.price(3, 512, 256, 4, longest=256) == graphs.price(3, 512, 256, 4)
