"""Several GPUs, simulated (simulator.multigpu): one GPU is today's engine bit for bit,
placements place every expert once, routed pairs are computed once, bytes add up, a shared
host link is never faster, bad keys get one line."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from simulator.errors import InputError
from simulator.multigpu import all_to_all, simulate_gpus, token_home
from simulator.policies.placement import PLACEMENT_POLICIES, popularity
from simulator.profile import load_profile
from simulator.runner import build_trace, cost_model, simulate
from simulator.scenario import parse_scenario

POLICIES = [
    {"name": "none", "cache": {"kind": "none"}},
    {"name": "lru", "cache": {"kind": "lru", "capacity": 24}},
    {"name": "lfu-coalesced", "load": "coalesced", "cache": {"kind": "lfu", "capacity": 20}},
    {"name": "per-item", "load": "per-item", "cache": {"kind": "lru", "capacity": 30}},
    {"name": "prefetch", "cache": {"kind": "lru", "capacity": 24}, "prefetch": {"kind": "oracle", "budget": 4}},
    {"name": "hot", "cache": {"kind": "static-hot", "capacity": 24, "staging": 6}},
]


def scenario(gpus=None, batch=8, policies=POLICIES, model=None, **trace):
    doc = {"name": "mg", "model": {"preset": "olmoe-1b-7b", "num_layers": 4, **(model or {})}, "profile": "h200",
           "replications": 1, "batch_sizes": [batch], "seed": 3,
           "trace": {"generator": "zipf", "steps": 6, "zipf": 1.2, **trace}, "policies": policies}
    if gpus is not None:
        doc["gpus"] = gpus
    return parse_scenario(doc, "t.yaml")


def run(sc, pol=0):
    b = sc.batch_sizes[0]
    trace = build_trace(sc, b, 0, None)
    prof = load_profile(sc.profile)
    cost = cost_model(sc, prof, trace.max_step_tokens)
    return trace, simulate(sc, sc.policies[pol], trace, cost, seed=11)


@pytest.mark.parametrize("mode", ["expert-parallel", "replicate"])
@pytest.mark.parametrize("pol", range(len(POLICIES)))
def test_one_gpu_is_the_single_gpu_engine_bit_for_bit(mode, pol):
    _, one = run(scenario(), pol)
    _, mg = run(scenario({"count": 1, "mode": mode}), pol)
    for c in one.columns:
        assert (one[c].to_numpy() == mg[c].to_numpy()).all(), c
    assert one["latency_ms"].sum() > 0


@pytest.mark.parametrize("name", list(PLACEMENT_POLICIES))
@pytest.mark.parametrize("n", [2, 3, 8])
def test_every_expert_on_exactly_one_gpu_balanced_in_count(name, n):
    sc = scenario(batch=16)
    trace = build_trace(sc, 16, 0, None)
    owner = PLACEMENT_POLICIES[name]().place(trace, n)
    assert owner.shape == (trace.num_layers, trace.num_experts)
    assert owner.min() >= 0 and owner.max() < n
    for row in owner:       # each expert one GPU id; no GPU over ceil(E / N) experts
        assert np.bincount(row, minlength=n).max() <= -(-trace.num_experts // n)


def test_popularity_balances_a_skewed_trace_better_than_round_robin():
    sc = scenario(batch=32, zipf=2.0)
    trace = build_trace(sc, 32, 0, None)
    pop = popularity(trace)

    def imbalance(owner):
        loads = np.array([[row[o == g].sum() for g in range(4)] for row, o in zip(pop, owner)])
        return (loads.max(axis=1) / loads.mean(axis=1)).mean()

    rr = imbalance(PLACEMENT_POLICIES["round-robin"]().place(trace, 4))
    lpt = imbalance(PLACEMENT_POLICIES["popularity"]().place(trace, 4))
    assert lpt < rr
    assert lpt < 1.1


def test_affinity_sends_fewer_bytes_than_round_robin_on_co_routed_experts():
    sc = scenario(batch=16, generator="mixed", zipf=1.0, cross_layer=0.0, batch_locality=0.8, batch_pool=4)
    trace = build_trace(sc, 16, 0, None)
    n, act = 4, 100
    sent = {}
    for name in ("round-robin", "affinity"):
        owner = PLACEMENT_POLICIES[name]().place(trace, n)
        sent[name] = sum(all_to_all(trace.step(s), owner, n, act)[1].sum() for s in range(trace.num_steps))
    assert sent["affinity"] < sent["round-robin"]


@pytest.mark.parametrize("mode", ["expert-parallel", "replicate"])
@pytest.mark.parametrize("pol", [0, 1, 2, 3, 4])
def test_every_routed_pair_computed_once_and_bytes_add_up(mode, pol):
    n = 4
    trace, df = run(scenario({"count": n, "mode": mode}), pol)
    pairs = sum(df[f"gpu{g}_pairs"] for g in range(n))
    assert (pairs == df["requests"]).all()
    assert (df["requests"] == [trace.step(s).size for s in range(trace.num_steps)]).all()
    assert (sum(df[f"gpu{g}_bytes_h2d"] for g in range(n)) == df["bytes_h2d"]).all()
    assert (df["bytes_h2d"] == df["transfers"] * scenario().model.expert_bytes).all()
    assert (df["hits"] + df["misses"] == df["served"]).all()
    if mode == "replicate":
        assert (df["peer_bytes"] == 0).all()
    else:
        assert (df["peer_bytes"] > 0).all()


def test_peer_bytes_count_each_token_once_per_remote_gpu():
    owner = np.array([[0, 1, 1, 2]])                   # one layer, four experts, three GPUs
    routing = np.array([[[1, 2]], [[0, 3]], [[0, 1]]])  # 3 tokens, homes 0, 1, 2
    assert token_home(3, 3).tolist() == [0, 1, 2]
    busiest, moved = all_to_all(routing, owner, 3, 10)
    # token 0 (GPU 0) -> GPU 1 once; token 1 (GPU 1) -> GPUs 0, 2; token 2 (GPU 2) -> GPUs 0, 1
    assert moved.tolist() == [50]
    assert busiest.tolist() == [20]


@pytest.mark.parametrize("mode", ["expert-parallel", "replicate"])
@pytest.mark.parametrize("pol", [0, 1, 2, 4])
def test_a_shared_host_link_is_never_faster(mode, pol):
    _, own = run(scenario({"count": 4, "mode": mode}, batch=16), pol)
    _, shared = run(scenario({"count": 4, "mode": mode, "shared_pcie": True}, batch=16), pol)
    assert (shared["bytes_h2d"] == own["bytes_h2d"]).all()
    assert (shared["start_ms"] + shared["latency_ms"] >= own["start_ms"] + own["latency_ms"]).all()
    assert shared["latency_ms"].sum() > own["latency_ms"].sum()


def test_a_faster_peer_link_is_never_slower():
    _, slow = run(scenario({"count": 4, "peer_GBps": 50}), 1)
    _, fast = run(scenario({"count": 4, "peer_GBps": 900}), 1)
    assert (fast["start_ms"] + fast["latency_ms"] <= slow["start_ms"] + slow["latency_ms"]).all()
    assert fast["latency_ms"].sum() < slow["latency_ms"].sum()


def test_reproducible():
    _, a = run(scenario({"count": 3, "placement": "affinity"}), 4)
    _, b = run(scenario({"count": 3, "placement": "affinity"}), 4)
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize("gpus, field, words", [
    ({"count": 0}, "gpus.count", "greater than or equal to 1"),
    ({"count": 65}, "gpus.count", "less than or equal to 64"),
    ({"count": 2, "placement": "random"}, "gpus.placement", "unknown placement policy"),
    ({"count": 2, "mode": "pipeline"}, "gpus.mode", "expert-parallel"),
    ({"count": 2, "mode": "replicate", "placement": "popularity"}, "gpus", "placement applies"),
    ({"count": 2, "peer_GBps": 0}, "gpus.peer_GBps", "greater than 0"),
    ({"count": 2, "shared_pcie": "yes"}, "gpus.shared_pcie", "bool"),
    ({"count": 2, "nvlink": 1}, "gpus.nvlink", "unknown key"),
])
def test_bad_gpus_keys_one_line(gpus, field, words):
    with pytest.raises(InputError) as e:
        scenario(gpus)
    msg = str(e.value)
    assert "\n" not in msg and f"t.yaml: {field}:" in msg and words in msg


def test_unsupported_combinations_one_line():
    with pytest.raises(InputError, match=r"t.yaml: gpus.count: 40 GPUs, but model \S+ has only 32 experts"):
        scenario({"count": 40}, model={"num_experts": 32})
    with pytest.raises(InputError, match=r"t.yaml: policies\[0\]: peer_fetch copies a peer's full-precision expert"):
        scenario({"count": 2, "mode": "replicate", "peer_fetch": True}, policies=[{"name": "q", "expert_dtype": "int8"}])
    with pytest.raises(InputError, match=r"t.yaml: gpus: peer_fetch applies to mode replicate"):
        scenario({"count": 2, "peer_fetch": True})
    with pytest.raises(InputError, match=r"t.yaml: policies\[0\].host.kind: 'belady': one host memory shared"):
        scenario({"count": 4}, policies=[{"name": "s", "host": {"kind": "belady", "capacity": 30}}])


def test_validate_refuses_gpus_in_one_line(tmp_path):
    from click.testing import CliRunner

    from simmoe.cli import main

    p = tmp_path / "s.yaml"
    p.write_text("name: v\nmodel: olmoe-1b-7b\nbatch_sizes: [1]\ntrace: {generator: uniform, steps: 2}\n"
                 "policies: [{name: a}]\ngpus: {count: 2}\n")
    r = CliRunner().invoke(main, ["validate", str(p)])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == (f"error: {p}: gpus: validate runs on one GPU; the live run on "
                                                 "several GPUs is not built yet (issue 17): remove gpus, or use simmoe run")


def test_run_writes_gpu_fields(tmp_path):
    from click.testing import CliRunner

    from simmoe.cli import main

    p = tmp_path / "s.yaml"
    p.write_text("name: r\nmodel: {preset: olmoe-1b-7b, num_layers: 2}\nprofile: h200\nreplications: 1\n"
                 "batch_sizes: [4]\ntrace: {generator: zipf, zipf: 1.0, steps: 3}\n"
                 "policies: [{name: a, cache: {kind: lru, capacity: 16}}]\ngpus: {count: 2, placement: popularity}\n")
    r = CliRunner().invoke(main, ["run", str(p), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    import json

    row = json.loads((tmp_path / "out" / "summary.json").read_text())["results"][0]
    g = row["gpus"]
    assert g["count"] == 2 and len(g["per_gpu"]) == 2 and g["bytes_pcie"] == row["bytes_h2d"]
    assert sum(x["pairs"] for x in g["per_gpu"]) == row["requests"] and g["bytes_peer"] > 0
    csv = (tmp_path / "out" / "summary.csv").read_text().splitlines()[0].split(",")
    assert "gpus_load_imbalance" in csv and "gpus" not in csv


def test_run_output_names_the_gpus_and_counts_each_gpus_cache_in_the_thrash_warning(tmp_path, monkeypatch):
    """simmoe run of a several-GPU scenario prints the GPUs' table (host-link and peer bytes,
    imbalance) and judges thrashing against the caches of all GPUs together."""
    from click.testing import CliRunner

    from simmoe.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    r = CliRunner().invoke(main, ["run", "scenarios/multigpu_peer_fetch.yaml", "-o", str(tmp_path / "o"),
                                  "-b", "4,16"])
    assert r.exit_code == 0, r.output
    assert "4 GPUs (replicate, peer fetch" in r.output and "peer GiB/st" in r.output
    warned = [ln for ln in r.output.splitlines() if ln.startswith("warning: B=")]
    assert warned and all(ln.startswith("warning: B=16") for ln in warned)   # 4 x 208 slots hold B=4's 624
    assert "on each of 4 GPUs (832)" in r.output.replace("\n", " ")
