"""Tiers beyond host memory and plain copies (docs/tiers.md): quantised copies, direct host
reads, a disk tier and cost-aware misses. Cost math, validation, that each option changes
what it should, and plan properties (hypothesis) at every tier."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from simulator.errors import InputError
from simulator.models import ModelSpec
from simulator.planner import COMPUTE, CPU, DEQUANT, DIRECT, LOAD, READ, Planner
from simulator.profile import CostModel, load_profile
from simulator.runner import run_scenario
from simulator.scenario import parse_scenario
from simulator.tiers import QUANT_GROUP, stored_bytes
from simulator.traces import generate

MODEL = {"name": "t", "num_layers": 4, "num_experts": 16, "top_k": 2, "hidden": 2048, "ffn": 1408, "dtype": "bf16"}


def scenario(policies, **over):
    d = {"name": "t", "model": MODEL, "replications": 1, "batch_sizes": [1, 8], "seed": 3,
         "trace": {"generator": "mixed", "steps": 6, "zipf": 0.5, "temporal": 0.3}, "policies": policies}
    d.update(over)
    return parse_scenario(d, "t.yaml")


def rows(sc):
    return {(r["policy"], r["batch_size"]): r for r in run_scenario(sc, profile="h100-pcie5").summary}


def cost_model(model=None, profile="h100-pcie5", tokens=64):
    m = model or ModelSpec(**MODEL)
    return CostModel(load_profile(profile), m.shape_key, m.expert_bytes, m.activation_bytes_per_token, tokens)


# ----------------------------------------------------------------------------- cost math
def test_stored_bytes_shrink_by_the_dtype_plus_scales():
    m = ModelSpec(**MODEL)
    numel = 3 * 2048 * 1408
    assert numel % QUANT_GROUP == 0
    assert stored_bytes(m, None) == m.expert_bytes == 2 * numel
    assert stored_bytes(m, "int8") == numel + 2 * numel // QUANT_GROUP
    assert stored_bytes(m, "fp8") == stored_bytes(m, "int8")
    assert stored_bytes(m, "int4") == numel // 2 + 2 * numel // QUANT_GROUP
    odd = ModelSpec(**dict(MODEL, hidden=3, ffn=5))                       # 45 values: one padded group
    assert stored_bytes(odd, "int4") == QUANT_GROUP // 2 + 2


def test_cost_terms_follow_the_profile():
    c = cost_model()
    t = c.profile.tiers
    d8 = t.dequant["int8"]
    assert c.dequant_ms(10**8, "int8") == pytest.approx(d8.latency_us * 1e-3 + 10**8 / (d8.bandwidth_GBps * 1e6))
    d = t.direct
    nb = 10**7
    one = d.latency_us * 1e-3 + nb / (d.bandwidth_GBps * 1e6)
    assert c.direct_ms(1, nb) == pytest.approx(max(one, c.expert_ms(1)))
    assert c.direct_ms(9, nb) == pytest.approx(
        max(d.latency_us * 1e-3 + nb * (1 + 8 * d.per_token_factor) / (d.bandwidth_GBps * 1e6), c.expert_ms(9)))
    # disk: qd1 at depth 1, the qdn curve at its depth, linear between, saturated past it
    dk = t.disk.direct
    r1, rn = c.read_ms(nb, "direct", 1), c.read_ms(nb, "direct", dk.queue_depth)
    assert r1 == pytest.approx(dk.qd1.latency_us * 1e-3 + nb / (dk.qd1.bandwidth_GBps * 1e6))
    assert rn == pytest.approx(dk.qdn.latency_us * 1e-3 + nb / (dk.qdn.bandwidth_GBps * 1e6))
    assert min(r1, rn) <= c.read_ms(nb, "direct", 2) <= max(r1, rn)
    assert c.read_ms(nb, "direct", 2 * dk.queue_depth) == pytest.approx(2 * rn)
    with pytest.raises(InputError, match="tiers.dequant.int2"):
        c.dequant_ms(1, "int2")


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("pol, field, msg", [
    ({"expert_dtype": "int16"}, "policies[0].expert_dtype", "Input should be"),
    ({"disk": {"io": "direct"}}, "policies[0]", "disk needs a host tier"),
    ({"host": {"capacity": 8, "lookahead": 1}}, "policies[0]", "give a prefetch kind"),
    ({"miss": {"kind": "cpu", "choices": ["copy"]}}, "policies[0].miss", "choices is an option"),
    ({"miss": {"kind": "cheapest", "choices": ["gpu"]}}, "policies[0].miss.choices[0]", "Input should be"),
    ({"miss": {"kind": "cheapest", "max_tokens": 3}}, "policies[0].miss", "max_tokens is an option"),
    ({"miss": "direct", "memory": "pageable"}, "policies[0]", "pinned"),
    ({"host": {"kind": "lru", "capacity": 65}}, "policies[0].host.capacity", "only 64 experts"),
    ({"host": {"kind": "lru", "capacity": "1 KiB"}}, "policies[0].host.capacity", "holds no"),
    ({"host": {"kind": "lru", "capacity": 0}}, "policies[0].host.capacity", "positive"),
    ({"host": {"kind": "mru", "capacity": 4}}, "policies[0].host.kind", "unknown cache policy"),
    ({"host": {"kind": "lru", "capacity": 4}, "disk": {"queue_depth": 0}}, "policies[0].disk.queue_depth", "greater"),
    ({"host": {"kind": "lru", "capacity": 4, "lookahead": 4}, "prefetch": {"kind": "oracle"},
      "cache": {"kind": "lru", "capacity": 8}}, "policies[0].host.lookahead", "4 MoE layers"),
])
def test_bad_tier_keys_get_one_line(pol, field, msg):
    with pytest.raises(InputError) as e:
        scenario([dict({"name": "p"}, **pol)])
    assert e.value.field == field and msg in e.value.message and "\n" not in str(e.value)


def test_a_quantised_dtype_must_be_smaller_than_the_models():
    with pytest.raises(InputError) as e:
        scenario([{"name": "p", "expert_dtype": "fp8"}], model=dict(MODEL, dtype="fp8"))
    assert e.value.field == "policies[0].expert_dtype" and "no smaller" in e.value.message


def test_cli_exit_2_for_a_bad_tier_key(tmp_path):
    from click.testing import CliRunner
    from simmoe.cli import main
    import yaml

    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"name": "bad", "model": MODEL, "batch_sizes": [1], "trace": {"generator": "uniform"},
                                 "policies": [{"name": "p", "host": {"kind": "lru", "capacity": 10**6}}]}))
    r = CliRunner().invoke(main, ["run", str(p)])
    assert r.exit_code == 2
    assert r.output.strip().count("\n") == 0 and "policies[0].host.capacity" in r.output


# ------------------------------------------------------------- each option does what it says
LRU = {"kind": "lru", "capacity": 24}


def test_quantised_copies_move_fewer_bytes_and_dequantise_each_copy():
    r = rows(scenario([{"name": "bf16", "cache": LRU}, {"name": "int8", "cache": LRU, "expert_dtype": "int8"},
                       {"name": "int4", "cache": LRU, "expert_dtype": "int4"}]))
    m = ModelSpec(**MODEL)
    for b in (1, 8):
        full, q8, q4 = r["bf16", b], r["int8", b], r["int4", b]
        assert full["transfers"] == q8["transfers"] == q4["transfers"] > 0      # same decisions
        assert q8["bytes_h2d"] == q8["transfers"] * stored_bytes(m, "int8")
        assert q4["bytes_h2d"] < q8["bytes_h2d"] < full["bytes_h2d"]
        assert q8["dequants"] == q8["transfers"] and full["dequants"] == 0
        assert q8["step_latency_ms"]["mean"] < full["step_latency_ms"]["mean"]  # copy-bound: faster


def test_prefetched_quantised_experts_are_dequantised_once_when_used():
    pf = {"kind": "oracle"}
    r = rows(scenario([{"name": "q", "cache": LRU, "prefetch": pf, "expert_dtype": "int8"}]))
    for b in (1, 8):
        x = r["q", b]
        assert x["prefetches_used"] > 0
        demand = x["transfers"] - x["prefetches_issued"]
        # each demand copy is dequantised on arrival, each prefetched one at its first use
        assert demand + x["prefetches_used"] <= x["dequants"] <= x["transfers"]


def test_direct_reads_copy_nothing_and_read_each_miss_once():
    r = rows(scenario([{"name": "copy", "cache": LRU}, {"name": "direct", "cache": LRU, "miss": "direct"},
                       {"name": "direct-q", "cache": LRU, "miss": "direct", "expert_dtype": "int4"}]))
    m = ModelSpec(**MODEL)
    for b in (1, 8):
        d = r["direct", b]
        assert d["bytes_h2d"] == 0 and d["transfers"] == 0
        assert d["direct_computes"] == d["misses"] > 0
        assert d["bytes_direct"] == d["misses"] * m.expert_bytes
        assert r["direct-q", b]["bytes_direct"] == d["misses"] * stored_bytes(m, "int4")
        assert r["direct-q", b]["step_latency_ms"]["mean"] < d["step_latency_ms"]["mean"]


def test_a_disk_tier_reads_what_host_memory_lacks():
    host_all = {"kind": "lru", "capacity": 64}
    r = rows(scenario([{"name": "ram", "cache": LRU}, {"name": "ssd", "cache": LRU, "host": {"kind": "lru", "capacity": 12}},
                       {"name": "ssd-all", "cache": LRU, "host": host_all},
                       {"name": "ssd-qd8", "cache": LRU, "host": {"kind": "lru", "capacity": 12},
                        "disk": {"queue_depth": 8}}], engine={"warmup_steps": 0}))
    m = ModelSpec(**MODEL)
    for b in (1, 8):
        ram, ssd, full = r["ram", b], r["ssd", b], r["ssd-all", b]
        assert ram["disk_reads"] == 0 and ssd["disk_reads"] > 0
        assert ssd["bytes_disk"] == ssd["disk_reads"] * m.expert_bytes
        assert ssd["transfers"] == ram["transfers"]                             # the GPU side is the same
        assert ssd["step_latency_ms"]["mean"] > ram["step_latency_ms"]["mean"]
        # host memory that holds every expert reads each from disk once
        assert full["disk_reads"] <= 64 and full["disk_reads"] <= ssd["disk_reads"]
        assert r["ssd-qd8", b]["disk_reads"] == ssd["disk_reads"]
    assert r["ssd-all", 8]["disk_reads"] < r["ssd", 8]["disk_reads"]
    assert r["ssd-qd8", 8]["step_latency_ms"]["mean"] < r["ssd", 8]["step_latency_ms"]["mean"]   # reads overlap


def test_lookahead_reads_ahead_of_the_gpu_prefetch():
    pf = {"kind": "oracle"}
    base = {"cache": LRU, "prefetch": pf, "host": {"kind": "lru", "capacity": 40}, "disk": {"queue_depth": 4}}
    r = rows(scenario([dict(base, name="no-lookahead"),
                       dict(base, name="lookahead", host={"kind": "lru", "capacity": 40, "lookahead": 2})],
                      engine={"warmup_steps": 0}))
    for b in (1, 8):
        assert r["no-lookahead", b]["disk_prefetches"] == 0 < r["lookahead", b]["disk_prefetches"]
    assert r["lookahead", 1]["step_latency_ms"]["mean"] < r["no-lookahead", 1]["step_latency_ms"]["mean"]


# ------------------------------------------------------------------ cost-aware misses
def _one_miss_scenario(dense, b, **model):
    return scenario([{"name": "copy"}, {"name": "cpu", "miss": "cpu"}, {"name": "direct", "miss": "direct"},
                     {"name": "cheapest", "miss": "cheapest"}],
                    model=dict(MODEL, top_k=1, **model), batch_sizes=[b],
                    engine={"dense_ms_per_layer": dense}, trace={"generator": "uniform", "steps": 4})


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dense=st.sampled_from([0.0, 0.05, 1.0]), ffn=st.sampled_from([256, 1408, 4096]))
def test_cheapest_never_slower_than_the_best_fixed_choice_when_queues_are_empty(dense, ffn):
    """One token, one expert per layer, no cache: every layer starts with empty queues, so the
    planner's prediction is exact and the per-miss choice is the best fixed one per layer."""
    prof = load_profile("h100-pcie5").to_json()
    key = f"2048x{ffn}-bf16-gated"
    prof["compute"]["gpu"].setdefault(key, prof["compute"]["gpu"]["2048x1408-bf16-gated"])
    prof["compute"]["cpu"].setdefault(key, prof["compute"]["cpu"]["2048x1408-bf16-gated"])
    from simulator.profile import parse_profile
    p = parse_profile(prof, "p")
    res = run_scenario(_one_miss_scenario(dense, 1, ffn=ffn), profile=p)
    lat = {r["policy"]: r["step_latency_ms"]["mean"] for r in res.summary}
    assert lat["cheapest"] <= min(lat["copy"], lat["cpu"], lat["direct"]) * (1 + 1e-12)


def test_cheapest_mixes_choices_and_beats_each_fixed_one_on_a_shipped_shape():
    sc = scenario([{"name": "copy", "cache": LRU}, {"name": "cpu", "cache": LRU, "miss": "cpu"},
                   {"name": "direct", "cache": LRU, "miss": "direct"},
                   {"name": "cheapest", "cache": LRU, "miss": "cheapest"}], batch_sizes=[8])
    r = rows(sc)
    ch = r["cheapest", 8]
    assert 0 < ch["transfers"] and 0 < ch["direct_computes"] + ch["cpu_computes"]
    assert ch["step_latency_ms"]["mean"] < min(r[p, 8]["step_latency_ms"]["mean"] for p in ("copy", "cpu", "direct"))


def test_cheapest_keeps_to_its_choices():
    r = rows(scenario([{"name": "c", "cache": LRU, "miss": {"kind": "cheapest", "choices": ["copy", "cpu"]}}]))
    assert all(r["c", b]["direct_computes"] == 0 for b in (1, 8))


def test_the_planner_needs_the_cost_model_for_cheapest():
    sc = scenario([{"name": "c", "miss": "cheapest"}])
    tr = generate(num_layers=4, num_experts=16, top_k=2, batch_size=1, steps=2, seed=0, generator="uniform")
    with pytest.raises(ValueError, match="cost model"):
        Planner(sc.model, sc.policies[0], tr)


# ------------------------------------------------------------------------ plan properties
POLICY = st.fixed_dictionaries({
    "name": st.just("p"),
    "load": st.sampled_from(["dedup", "coalesced", "per-item"]),
    "cache": st.fixed_dictionaries({"kind": st.sampled_from(["lru", "lfu", "fifo", "belady"]),
                                    "capacity": st.integers(1, 20)}),
    "prefetch": st.sampled_from([{"kind": "none"}, {"kind": "oracle"}, {"kind": "predicted", "accuracy": 0.5}]),
    "miss": st.sampled_from(["copy", "cpu", "direct", "cheapest"]),
    "expert_dtype": st.sampled_from([None, "int8", "int4"]),
    "host": st.one_of(st.none(), st.fixed_dictionaries({"kind": st.sampled_from(["lru", "lfu", "none", "belady",
                                                                                 "static-hot"]),
                                                          "capacity": st.integers(24, 48),
                                                          "lookahead": st.integers(0, 2)})),
    "disk": st.one_of(st.none(), st.fixed_dictionaries({"io": st.sampled_from(["buffered", "direct"]),
                                                          "queue_depth": st.integers(1, 4)})),
})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pol=POLICY, b=st.integers(1, 5), seed=st.integers(0, 10**6))
def test_every_request_served_once_and_no_tier_over_capacity(pol, b, seed):
    if pol["prefetch"]["kind"] == "none" and pol["host"]:
        pol["host"]["lookahead"] = 0
    if pol["disk"] and not pol["host"]:
        pol["disk"] = None
    sc = scenario([pol], batch_sizes=[b])
    tr = generate(num_layers=4, num_experts=16, top_k=2, batch_size=b, steps=3, seed=seed, generator="mixed",
                  zipf=0.6, temporal=0.3)
    pl = Planner(sc.model, sc.policies[0], tr, seed=1, cost=cost_model(tokens=b), dense_ms=0.05)
    try:
        [pl.plan_step(s) for s in range(tr.num_steps)]
    except ValueError as e:           # a host memory smaller than one layer's reads: refused
        assert "evictable host expert slots" in str(e)
        assume(False)
    pl = Planner(sc.model, sc.policies[0], tr, seed=1, cost=cost_model(tokens=b), dense_ms=0.05)
    gpu_of: dict[int, int] = {}     # slot -> key copied there (quantised until dequantised)
    ready: set[int] = set()          # slots whose key is usable by a compute
    host_of = {sl: k for k, sl in pl.host_preloaded}    # host slot -> key read there
    hslot = dict(pl.host_preloaded)                       # key -> host slot
    for s in range(tr.num_steps):
        layers, d = pl.plan_step(s)
        served = 0
        for l, ops in enumerate(layers):
            for op in ops:
                k = op[0]
                if k == LOAD:
                    for sl, key in zip(op[1], op[2]):
                        assert pl.host_cache is None or host_of.get(hslot.get(key)) == key   # read before copied
                        gpu_of[sl] = key
                        (ready.discard if pl.quant else ready.add)(sl)
                elif k == DEQUANT:
                    assert gpu_of[op[1]] == op[2] and op[1] not in ready
                    ready.add(op[1])
                elif k == COMPUTE:
                    assert gpu_of[op[1]] == op[2] and op[1] in ready and op[2] // 16 == l
                    served += op[3]
                elif k in (CPU, DIRECT):
                    key = op[1]
                    assert pl.host_cache is None or host_of.get(hslot.get(key)) == key
                    served += op[2]
                elif k == READ:
                    host_of[op[1]] = op[2]
                    hslot[op[2]] = op[1]
                    assert op[1] < pl.host_slots
            for c in pl.caches:
                assert len(c.slot_of) <= c.slots
            if pl.host_cache is not None:
                assert len(pl.host_cache.slot_of) <= pl.host_cache.slots
        assert served == tr.step(s).size                            # every (token, expert) once
        assert d.misses == d.transfers - d.prefetches_issued + d.cpu_computes + d.direct_computes
    # the engine times every such plan, and the same inputs give the same numbers bit for bit
    from simulator.engine import Engine

    runs = []
    for _ in range(2):
        timeline: list = []
        p2 = Planner(sc.model, sc.policies[0], tr, seed=1, cost=cost_model(tokens=b), dense_ms=0.05)
        recs = Engine(cost_model(tokens=b), sc.policies[0].memory, 0.05, timeline=timeline).run(p2)
        runs.append(([(r.latency_ms, r.stall_ms, r.decisions.as_dict()) for r in recs], timeline))
        assert all(r.latency_ms > 0 for r in recs)
        assert all(e[2] >= e[1] for e in timeline)
    assert runs[0] == runs[1]


def test_a_measured_dequantise_issue_costs_the_host_each_dequantise(tmp_path):
    """``tiers.dequant_host_us``: each dequantise costs the host its measured issue time in
    place of one dense launch (int4's unpacking is about eight kernels); another dtype's
    figure changes nothing, bit for bit; decisions never move; a bad figure is one line."""
    import json

    from simulator.profile import parse_profile
    base = load_profile("h100-pcie5").to_json()

    def with_host(**us):
        doc = json.loads(json.dumps(base))
        doc["tiers"]["dequant_host_us"] = us
        path = tmp_path / f"p{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(doc))
        return str(path)
    sc = scenario([{"name": "int4", "cache": LRU, "expert_dtype": "int4"}])
    plain = {r["batch_size"]: r for r in run_scenario(sc, profile="h100-pcie5").summary}
    other = {r["batch_size"]: r for r in run_scenario(sc, profile=with_host(int8=900.0)).summary}
    slow = {r["batch_size"]: r for r in run_scenario(sc, profile=with_host(int4=900.0)).summary}
    for b in (1, 8):
        assert other[b]["step_latency_ms"] == plain[b]["step_latency_ms"]
        assert slow[b]["transfers"] == plain[b]["transfers"] and slow[b]["dequants"] > 0
        assert slow[b]["step_latency_ms"]["mean"] > plain[b]["step_latency_ms"]["mean"]
    doc = json.loads(json.dumps(base))
    doc["tiers"]["dequant_host_us"] = {"int4": -1.0}
    with pytest.raises(InputError, match="tiers.dequant_host_us"):
        parse_profile(doc, "p.json")
