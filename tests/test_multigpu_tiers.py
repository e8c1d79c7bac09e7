"""Several GPUs with what used to be refused (simulator.multigpu): measured engine styles,
pageable memory, the tiers, peer fetch and timelines. One GPU is still the single-GPU engine bit
for bit with each option; a shared host is never faster than a free one; bytes over each link
add up; peer fetch never moves more over PCIe; capacities are never exceeded; bad keys get one
line (exit 2)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.multigpu import build_planners, layer_plans, placement
from simulator.planner import Planner
from simulator.profile import load_profile
from simulator.runner import build_trace, cost_model, simulate
from simulator.scenario import parse_scenario

LRU = {"kind": "lru", "capacity": 24}
OPTIONS = {      # name -> (policy, engine style)
    "hf-eager": ({"name": "lru", "cache": LRU}, "hf-eager"),
    "grouped+prefetch": ({"name": "lru", "cache": LRU, "prefetch": {"kind": "oracle", "budget": 4}}, "grouped"),
    "offload": ({"name": "lru", "cache": LRU}, "offload"),
    "pageable": ({"name": "p", "memory": "pageable", "cache": LRU}, "twin"),
    "int8+prefetch": ({"name": "q", "expert_dtype": "int8", "cache": LRU, "prefetch": {"kind": "oracle", "budget": 4}},
                      "twin"),
    "cpu": ({"name": "c", "miss": "cpu", "cache": LRU}, "twin"),
    "direct": ({"name": "d", "miss": "direct", "cache": LRU}, "twin"),
    "cheapest": ({"name": "ch", "miss": "cheapest", "cache": LRU}, "twin"),
    "disk": ({"name": "ssd", "cache": LRU, "host": {"kind": "lru", "capacity": 100}, "disk": {"queue_depth": 4}},
             "twin"),
}


def scenario(policy, gpus=None, style="twin", batch=8, layers=4):
    doc = {"name": "mgt", "model": {"preset": "olmoe-1b-7b", "num_layers": layers, "name": "olmoe-1b-7b"},
           "profile": "h200", "replications": 1, "batch_sizes": [batch], "seed": 5,
           "trace": {"generator": "zipf", "steps": 5, "zipf": 1.1}, "policies": [policy],
           "engine": {"style": style}}
    if gpus is not None:
        doc["gpus"] = gpus
    return parse_scenario(doc, "t.yaml")


def run(sc, timeline=None):
    trace = build_trace(sc, sc.batch_sizes[0], 0, None)
    cost = cost_model(sc, load_profile(sc.profile), trace.max_step_tokens)
    return simulate(sc, sc.policies[0], trace, cost, seed=13, timeline=timeline)


@pytest.mark.parametrize("mode", ["expert-parallel", "replicate"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_one_gpu_is_the_single_gpu_engine_bit_for_bit(name, mode):
    pol, style = OPTIONS[name]
    one = run(scenario(pol, style=style))
    mg = run(scenario(pol, {"count": 1, "mode": mode}, style=style))
    for c in one.columns:
        assert (one[c].to_numpy() == mg[c].to_numpy()).all(), c
    assert one["latency_ms"].sum() > 0


@pytest.mark.parametrize("mode", ["expert-parallel", "replicate"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_bytes_over_each_link_add_up_and_every_pair_is_served_once(name, mode):
    pol, style = OPTIONS[name]
    n = 3
    df = run(scenario(pol, {"count": n, "mode": mode}, style=style))
    assert (sum(df[f"gpu{g}_pairs"] for g in range(n)) == df["requests"]).all()
    # what reaches the GPUs comes over PCIe (copies, direct reads) or from a peer
    assert (df["pcie_bytes"] + df["peer_fetch_bytes"] == df["bytes_h2d"] + df["bytes_direct"]).all()
    assert (sum(df[f"gpu{g}_pcie_bytes"] for g in range(n)) == df["pcie_bytes"]).all()
    assert (sum(df[f"gpu{g}_bytes_h2d"] for g in range(n)) == df["bytes_h2d"]).all()
    assert (df["peer_fetch_bytes"] == 0).all()      # peer fetch is off by default
    if name == "int8+prefetch":                      # quantised bytes over PCIe, dequantised per GPU
        assert (df["dequants"] > 0).any() and df["bytes_h2d"].sum() < df["transfers"].sum() * 2 * 1024 * 2048 * 3


@pytest.mark.parametrize("mode", ["expert-parallel", "replicate"])
@pytest.mark.parametrize("name", ["pageable", "cpu"])
def test_a_shared_host_is_never_faster_than_a_free_one(name, mode):
    pol, style = OPTIONS[name]
    free = run(scenario(pol, {"count": 4, "mode": mode, "shared_host": False}, batch=16, style=style))
    shared = run(scenario(pol, {"count": 4, "mode": mode}, batch=16, style=style))
    assert (shared["misses"] == free["misses"]).all()          # same decisions
    assert (shared["start_ms"] + shared["latency_ms"] >= free["start_ms"] + free["latency_ms"]).all()
    assert shared["latency_ms"].sum() > free["latency_ms"].sum()


def test_a_shared_pcie_link_is_never_faster_for_direct_reads():
    pol, _ = OPTIONS["direct"]
    own = run(scenario(pol, {"count": 4}, batch=16))
    shared = run(scenario(pol, {"count": 4, "shared_pcie": True}, batch=16))
    assert (shared["start_ms"] + shared["latency_ms"] >= own["start_ms"] + own["latency_ms"]).all()
    assert shared["latency_ms"].sum() > own["latency_ms"].sum()


def test_measured_styles_price_each_gpu_on_the_tokens_it_holds():
    """Expert-parallel with every expert resident: N GPUs' dense work is priced at batch / N
    each, so no GPU's compute stream is busier than one GPU's with the whole batch."""
    pol = {"name": "hot", "cache": {"kind": "static-hot", "capacity": 256}}
    one = run(scenario(pol, style="hf-eager", batch=32))
    four = run(scenario(pol, {"count": 4, "placement": "popularity"}, style="hf-eager", batch=32))
    assert all((four[f"gpu{g}_compute_ms"] < one["compute_ms"]).all() for g in range(4))
    assert four["latency_ms"].sum() < one["latency_ms"].sum()


@pytest.mark.parametrize("shared_pcie", [False, True])
@pytest.mark.parametrize("cap", [24, 200])
def test_peer_fetch_never_moves_more_over_pcie_and_keeps_the_decisions(cap, shared_pcie):
    pol = {"name": "lru", "cache": {"kind": "lru", "capacity": cap}}
    g = {"count": 4, "mode": "replicate", "shared_pcie": shared_pcie}
    off = run(scenario(pol, g, batch=16))
    on = run(scenario(pol, {**g, "peer_fetch": True}, batch=16))
    for c in ("hits", "misses", "transfers", "bytes_h2d"):
        assert (on[c] == off[c]).all(), c
    assert (on["pcie_bytes"] <= off["pcie_bytes"]).all()
    assert on["peer_fetches"].sum() > 0 and on["pcie_bytes"].sum() < off["pcie_bytes"].sum()
    assert (on["pcie_bytes"] + on["peer_fetch_bytes"] == on["bytes_h2d"]).all()
    assert (on["peer_bytes"] == on["peer_fetch_bytes"]).all()      # replicate: no all-to-all
    if shared_pcie:                                                 # the one host link is the bottleneck
        assert on["latency_ms"].sum() < off["latency_ms"].sum()


def test_peer_fetch_with_a_slow_peer_link_stays_on_pcie():
    pol = {"name": "lru", "cache": LRU}
    on = run(scenario(pol, {"count": 4, "mode": "replicate", "peer_fetch": True, "peer_GBps": 1}, batch=16))
    assert on["peer_fetches"].sum() == 0


def test_layer_plans_are_plan_step():
    """multigpu.layer_plans interleaves the planners by layer: the same plans as plan_step."""
    for pol, _ in OPTIONS.values():
        sc = scenario(pol)
        trace = build_trace(sc, 8, 0, None)
        cost = cost_model(sc, load_profile("h200"), trace.max_step_tokens)
        a = Planner(sc.model, sc.policies[0], trace, seed=2, cost=cost, dense_ms=sc.dense_ms)
        b = Planner(sc.model, sc.policies[0], trace, seed=2, cost=cost, dense_ms=sc.dense_ms)
        for s in range(trace.num_steps):
            layers, d = a.plan_step(s)
            out = []
            assert list(layer_plans(b, s, out)) == layers and out[0] == d


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 4), mode=st.sampled_from(["expert-parallel", "replicate"]), cap=st.integers(1, 40),
       host=st.sampled_from([None, 12, 60]), kind=st.sampled_from(["lru", "fifo"]), batch=st.sampled_from([1, 3, 8]),
       prefetch=st.booleans())
def test_capacities_never_exceeded_and_no_gpu_evicts_what_another_still_reads(n, mode, cap, host, kind, batch,
                                                                             prefetch):
    """Planned as simulate_gpus plans (layer by layer, GPU by GPU): every GPU cache within its
    capacity; one host memory for all GPUs, within its capacity, and every key a GPU's layer
    still reads from it is resident there."""
    pol = {"name": "p", "cache": {"kind": "lru", "capacity": cap}}
    if prefetch:
        pol["prefetch"] = {"kind": "oracle", "budget": 2}
    if host is not None:
        pol["host"] = {"kind": kind, "capacity": host}
    sc = scenario(pol, {"count": n, "mode": mode}, batch=batch, layers=3)
    trace = build_trace(sc, batch, 0, None)
    cost = cost_model(sc, load_profile("h200"), trace.max_step_tokens)
    owner = placement(sc, trace) if mode == "expert-parallel" else None
    planners = [p for p in build_planners(sc, sc.policies[0], trace, cost, 1, owner) if p is not None]
    hosts = {id(p.host_cache) for p in planners}
    assert len(hosts) == 1                           # one host memory (or none) for all GPUs
    try:
        for s in range(trace.num_steps):
            gens = [layer_plans(p, s, []) for p in planners]
            for _ in range(trace.num_layers):
                for p, gen in zip(planners, gens):
                    next(gen)
                    assert all(len(c.slot_of) <= c.slots == cap for c in p.caches)
                    hc = p.host_cache
                    if hc is not None:
                        assert len(hc.slot_of) <= hc.slots == host
                        for q in planners:
                            assert all(k in hc.slot_of for k in set.__iter__(q._host_busy))
    except ValueError as e:     # a host memory too small for the layers' reads: refused in one line
        assert "host.capacity" in str(e)


def test_timeline_has_per_gpu_tracks_and_the_shared_ones(tmp_path):
    from simulator.timeline import timeline_doc

    sc = scenario(OPTIONS["pageable"][0], {"count": 2}, batch=4, layers=2)
    doc = timeline_doc(sc, load_profile("h200"), None)
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert {"GPU 0 compute stream", "GPU 1 copy engine", "peer link (all-to-all, peer copies)",
            "host (CPU experts, pageable staging)"} <= names
    tid = {e["args"]["name"]: e["tid"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    ev = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    peer = [e for e in ev if e["tid"] == tid["peer link (all-to-all, peer copies)"]]
    assert len(peer) == 2 * 2 * 5                    # dispatch + combine, per layer and step
    records: list = []
    df = run(sc, timeline=records)
    copies = sum(1 for r in records if r[0] == "copy")
    assert copies == df["copies"].sum()
    assert sum(1 for e in ev if e["tid"] in (tid["GPU 0 copy engine"], tid["GPU 1 copy engine"])) == copies
    assert sum(1 for e in ev if e["cat"] == "staging") == copies     # every pageable copy staged by the host


def test_cli_timeline_and_bad_keys_exit_2(tmp_path):
    from click.testing import CliRunner

    from simmoe.cli import main

    p = tmp_path / "s.yaml"
    body = ("name: r\nmodel: {preset: olmoe-1b-7b, num_layers: 2}\nprofile: h200\nreplications: 1\n"
            "batch_sizes: [4]\ntrace: {generator: zipf, zipf: 1.0, steps: 3}\n"
            "policies: [{name: a, cache: {kind: lru, capacity: 16}}]\n")
    p.write_text(body + "gpus: {count: 2, mode: replicate, peer_fetch: true}\n")
    r = CliRunner().invoke(main, ["run", str(p), "-o", str(tmp_path / "out"), "--timeline", "-q"])
    assert r.exit_code == 0, r.output
    row = json.loads((tmp_path / "out" / "summary.json").read_text())["results"][0]["gpus"]
    assert row["peer_fetch"] is True and row["bytes_pcie"] + row["bytes_peer_fetch"] == row["bytes_h2d"]
    assert (tmp_path / "out" / "timeline.json").exists()
    for bad, field in [("gpus: {count: 2, peer_fetch: 1}", "gpus.peer_fetch"),
                       ("gpus: {count: 2, peer_fetch: true}", "gpus"),
                       ("gpus: {count: 2, shared_host: maybe}", "gpus.shared_host")]:
        p.write_text(body + bad + "\n")
        r = CliRunner().invoke(main, ["run", str(p), "-o", str(tmp_path / "o2"), "-q"])
        assert r.exit_code == 2
        last = r.output.strip().splitlines()[-1]
        assert last.startswith(f"error: {p}: {field}: ") and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("mode", ["expert-parallel", "replicate"])
def test_one_host_memory_reads_each_expert_from_disk_once(mode):
    """A host memory that holds every expert, shared by 4 GPUs: an expert is read from the
    one disk once in the whole run, whichever GPUs use it (replicate: several do)."""
    pol = {"name": "ssd", "cache": LRU, "host": {"kind": "lru", "capacity": 4 * 64}, "disk": {"queue_depth": 2}}
    sc = scenario(pol, {"count": 4, "mode": mode}, batch=16)
    trace = build_trace(sc, 16, 0, None)
    df = run(sc)
    distinct = len({int(k) for s in range(trace.num_steps)
                    for k in (trace.step(s) + 64 * np.arange(4)[None, :, None]).ravel()})
    assert df["disk_reads"].sum() == distinct
    if mode == "replicate":     # GPUs share experts: fewer reads than copies into GPUs
        assert df["disk_reads"].sum() < df["transfers"].sum()


def test_timeline_of_a_grouped_style_names_its_calls():
    from simulator.timeline import timeline_doc

    sc = scenario(OPTIONS["grouped+prefetch"][0], {"count": 2}, style="grouped", batch=4, layers=2)
    ev = [e for e in timeline_doc(sc, load_profile("h200"), None)["traceEvents"] if e["ph"] == "X"]
    groups = [e for e in ev if e["name"].startswith("experts: group of ")]
    assert groups and all(e["args"]["gpu"] in (0, 1) for e in groups)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(2, 4), cap=st.integers(4, 120), batch=st.sampled_from([2, 5, 12]), shared=st.booleans(),
       memory=st.sampled_from(["pinned", "pageable"]), load=st.sampled_from(["dedup", "coalesced"]))
def test_peer_fetch_never_increases_pcie_bytes(n, cap, batch, shared, memory, load):
    pol = {"name": "p", "load": load, "memory": memory, "cache": {"kind": "lru", "capacity": cap}}
    g = {"count": n, "mode": "replicate", "shared_pcie": shared}
    off = run(scenario(pol, g, batch=batch, layers=2))
    on = run(scenario(pol, {**g, "peer_fetch": True}, batch=batch, layers=2))
    assert (on["misses"] == off["misses"]).all() and (on["bytes_h2d"] == off["bytes_h2d"]).all()
    assert (on["pcie_bytes"] <= off["pcie_bytes"]).all()
    assert (on["pcie_bytes"] + on["peer_fetch_bytes"] == on["bytes_h2d"]).all()


@pytest.mark.parametrize("mode", ["expert-parallel", "replicate"])
def test_cost_aware_misses_see_the_other_gpus_use_of_a_shared_cpu(mode):
    """`miss: cheapest` on several GPUs with one host CPU: each planner is told when the CPU is
    free of the other GPUs' experts (timed, or planned earlier in the same layer), so it sends
    fewer misses to that CPU than when every GPU has a CPU of its own; with a host each, the
    decisions are what each planner alone would make."""
    pol = {"name": "ch", "miss": "cheapest", "cache": {"kind": "lru", "capacity": 24}}
    shared = run(scenario(pol, {"count": 4, "mode": mode}, batch=64))
    free = run(scenario(pol, {"count": 4, "mode": mode, "shared_host": False}, batch=64))
    assert free["cpu_computes"].sum() > 0
    assert shared["cpu_computes"].sum() < free["cpu_computes"].sum()


def test_the_queue_models_cpu_and_link_wait_for_what_others_hold():
    from simulator.tiers import QueueModel
    sc = scenario({"name": "ch", "miss": "cheapest", "cache": LRU})
    cost = cost_model(sc, load_profile("h200"), 8)
    q = QueueModel(cost, memory="pinned", load_bytes=10 << 20, stored=10 << 20, dequant=None, io="buffered",
                   queue_depth=1, dense_ms=0.1)
    free = q.options(4, False)
    q.cpu_ready, q.link_ready = 50.0, 80.0
    busy = q.options(4, False)
    assert busy["cpu"][0] == pytest.approx(50.0 + cost.cpu_path_ms(4)) and busy["cpu"][0] > free["cpu"][0]
    assert busy["copy"][4] == pytest.approx(80.0 + q.copy_ms) and busy["copy"][0] > free["copy"][0]
    assert busy["direct"][0] > free["direct"][0]
