"""Grouped engine styles: a layer's ready experts in one call (simulator/engine_styles.py),
priced by the engine and run by the executor the same way."""
from __future__ import annotations

import numpy as np
import pytest

from simulator.engine_costs import DenseCost
from simulator.engine_styles import GROUP, group_layer
from simulator.planner import COMPUTE, CPU, DENSE, LOAD, Planner
from simulator.profile import load_profile
from simulator.scenario import PolicySpec
from simulator.models import get_preset
from simulator.traces import generate

D = (DENSE,)


def test_group_layer_puts_hits_in_one_call_and_misses_after_their_loads():
    hit, pref = (COMPUTE, 0, 10, 2), (COMPUTE, 1, 11, 1)
    l1, c1 = (LOAD, (2,), (12,), 8, False), (COMPUTE, 2, 12, 3)
    l2, c2 = (LOAD, (3,), (13,), 8, False), (COMPUTE, 3, 13, 1)
    cpu, nxt = (CPU, 14, 2), (LOAD, (4,), (15,), 8, True)
    out = group_layer([D, hit, pref, l1, c1, l2, c2, cpu, nxt])
    assert [op[0] for op in out] == [DENSE, GROUP, LOAD, LOAD, GROUP, CPU, LOAD]
    g1, g2 = out[1], out[4]
    assert g1[1:] == ((0, 1), (hit, pref), 3, 2) and g2[1:] == ((2, 3), (c1, c2), 4, 2)
    assert out[-1] is nxt                                    # the next layer's prefetch stays last
    assert group_layer([D, cpu]) == [D, cpu] and group_layer([D, hit]) == [D, (GROUP, (0,), (hit,), 2, 1)]
    # a load into a slot a pending compute reads: those computes are issued first
    l3, c3 = (LOAD, (2,), (16,), 8, False), (COMPUTE, 2, 16, 1)
    out = group_layer([D, l1, c1, l2, c2, l3, c3])
    assert [op[0] for op in out] == [DENSE, LOAD, LOAD, GROUP, LOAD, GROUP]
    assert out[3][2] == (c1, c2) and out[5][2] == (c3,)


def test_group_layer_serves_every_compute_of_a_plan():
    spec = get_preset("olmoe-1b-7b")
    tr = generate(num_layers=4, num_experts=spec.num_experts, top_k=spec.top_k, batch_size=8, steps=6, seed=1)
    spec = spec.model_copy(update={"num_layers": 4})
    for pol in (PolicySpec(name="a", load="per-item"), PolicySpec(name="b", load="coalesced", cache={"kind": "lru", "capacity": 40}),
                PolicySpec(name="c", load="dedup", cache={"kind": "lru", "capacity": 40}, prefetch={"kind": "oracle"}),
                PolicySpec(name="d", load="coalesced", cache={"kind": "lru", "capacity": 6})):
        pl = Planner(spec, pol, tr)
        for s in range(tr.num_steps):
            for ops in pl.plan_step(s)[0]:
                got = group_layer(ops)
                served = [c for op in got if op[0] == GROUP for c in op[2]]
                assert sorted(served) == sorted(op for op in ops if op[0] == COMPUTE)
                assert sorted(op for op in got if op[0] != GROUP) == sorted(op for op in ops if op[0] != COMPUTE)
                # every grouped compute reads the expert its slot holds when the call is issued
                holds: dict[int, int] = {}
                for op in got:
                    if op[0] == LOAD:
                        holds.update(zip(op[1], op[2]))
                    elif op[0] == GROUP:
                        assert all(holds.get(c[1], c[2]) == c[2] for c in op[2]), (pol.name, s)


def _dense(style):
    prof = load_profile("h200")
    return DenseCost(style=style, batch=16, phases=np.zeros(4, np.uint8), tokens=np.full(4, 16),
                     start_context=256, tables=prof.engine["olmoe-1b-7b"])


def test_group_call_costs_from_the_style_table():
    dc = _dense("grouped")
    assert dc.grouped and not _dense("offload").grouped
    st = load_profile("h200").engine["olmoe-1b-7b"].styles["grouped"]
    host, gpu, overlapped = dc.group_ms(30)
    assert not overlapped                     # no GPU fit: the GPU share runs after the host's issue
    assert host + gpu == pytest.approx(max(host, (st.base_ms + st.per_expert_ms * 30)))
    assert dc.group_ms(60)[0] >= dc.group_ms(10)[0]


def test_group_call_gpu_time_comes_from_its_gpu_fit_when_measured():
    """A host-bound call's wall time is nearly all host: without a GPU fit its GPU share is what
    is left (near 0); with one (the call timed behind a sleep kernel) it is that fit, which is
    what a layer's step exposes after its last copy lands."""
    prof = load_profile("h200")
    t = prof.engine["olmoe-1b-7b"].model_copy(update={"in_situ": None})   # host terms as measured
    st = t.styles["offload-grouped"].model_copy(update={   # a host-bound call: its wall is its host time
        "base_ms": 0.8, "per_expert_ms": 0.005, "host_base_ms": 0.8, "host_per_expert_ms": 0.005,
        "gpu_base_ms": None, "gpu_per_expert_ms": None})
    plain = t.model_copy(update={"styles": {**t.styles, "offload-grouped": st}})
    fitted = t.model_copy(update={"styles": {**t.styles, "offload-grouped": st.model_copy(
        update={"gpu_base_ms": 0.05, "gpu_per_expert_ms": 0.004})}})
    kw = dict(style="offload-grouped", batch=16, phases=np.zeros(4, np.uint8), tokens=np.full(4, 16),
              start_context=256)
    h0, g0, o0 = DenseCost(tables=plain, **kw).group_ms(40)
    h1, g1, o1 = DenseCost(tables=fitted, **kw).group_ms(40)
    assert not o0 and o1
    assert h0 == pytest.approx(h1)                                    # the host's share is unchanged
    assert g0 == pytest.approx(max(0.0, st.base_ms + st.per_expert_ms * 40 - h0))
    assert g1 == pytest.approx(0.05 + 0.004 * 40) and g1 > g0


def test_grouped_style_is_priced_per_call_not_per_expert():
    """The same plan under grouped and under per-expert dispatch: grouped pays its call
    (measured ~0.4-0.6 ms for any number of experts on the H200), the loop ~0.18 ms per expert."""
    from simulator.runner import run_scenario
    from tests.conftest import scenario_dict
    from simulator.scenario import parse_scenario

    def lat(style):
        d = scenario_dict(model="olmoe-1b-7b", profile="h200", batch_sizes=[16],
                          trace={"generator": "uniform", "steps": 6, "prompt_tokens": 256},
                          engine={"style": style}, policies=[{"name": "lru", "load": "dedup",
                                                              "cache": {"kind": "lru", "capacity": 256}}])
        return run_scenario(parse_scenario(d, "t")).summary[0]["step_latency_ms"]["mean"]
    assert lat("grouped") < lat("offload")


def test_a_grouped_calls_gpu_work_overlaps_its_issue_and_follows_its_last_copy():
    """With the call's GPU work measured apart from its host time, a layer whose experts are all
    resident ends at the host's last launch when the GPU work is shorter (it runs while the host
    still issues), and a layer waiting for copies ends that GPU work after the last copy lands."""
    from simulator.profile import Profile
    from simulator.runner import run_scenario
    from simulator.scenario import parse_scenario
    from tests.conftest import scenario_dict
    prof = load_profile("h200")

    def lat(policy, gpu_base):
        d = prof.model_dump(mode="json", by_alias=True)
        st = d["engine"]["olmoe-1b-7b"]["styles"]["offload-grouped"]
        st.update(gpu_base_ms=gpu_base, gpu_per_expert_ms=0.0)
        sc = parse_scenario(scenario_dict(model="olmoe-1b-7b", profile="h200", batch_sizes=[16], replications=1,
                                          trace={"generator": "uniform", "steps": 4, "prompt_tokens": 256},
                                          engine={"style": "offload-grouped"}, policies=[{"name": "p"}]), "t")
        sc = sc.model_copy(update={"policies": [policy]})
        return run_scenario(sc, profile=Profile.model_validate(d)).summary[0]["step_latency_ms"]["mean"]
    resident = PolicySpec(name="resident", load="dedup",            # every expert cached and preloaded
                          cache={"kind": "static-hot", "capacity": 64 * 16 + 1, "staging": 1})
    dedup = PolicySpec(name="dedup", load="dedup")
    L = 16
    host = prof.engine["olmoe-1b-7b"].styles["offload-grouped"].host_base_ms
    assert lat(resident, 0.0) == pytest.approx(lat(resident, 0.5 * host), rel=1e-9)   # hidden under the issue
    assert lat(resident, 10 * host) > lat(resident, 0.0) + L * 4 * host                # far longer: it shows
    # (by less than 10 x host a layer: the dense op after it then meets only its GPU part)
    assert lat(dedup, 1.0) - lat(dedup, 0.0) == pytest.approx(L * 1.0, rel=0.05)      # after each layer's copies
