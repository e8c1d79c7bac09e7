"""Live serving on the CPU with a tiny real model: the scheduler drives the real-model
executor; its decisions are the simulator's, step for step, and batching requests side by side
gives each the logits it gets alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from calibrate.executors.model import host_experts  # noqa: E402
from calibrate.executors.serving import serve_live  # noqa: E402
from calibrate.models.build import build_model  # noqa: E402
from simulator.profile import load_profile  # noqa: E402
from simulator.scenario import parse_scenario  # noqa: E402
from simulator.serving.runner import serve_one  # noqa: E402

PROFILES = Path(__file__).resolve().parents[1] / "simulator" / "profiles"


@pytest.fixture(scope="module")
def built():
    return build_model("olmoe-1b-7b", tiny=True, dtype="fp32")


@pytest.fixture(scope="module")
def host(built):
    """The experts' host weights, shared by every run (a run offloads the model's experts)."""
    return host_experts(built, pinned=False)


@pytest.fixture(scope="module")
def tiny_profile(built, tmp_path_factory):
    """The default profile with the tiny expert shape priced like another shape (decisions do
    not depend on prices)."""
    d = json.loads((PROFILES / "h100-pcie5.json").read_text())
    for k in ("gpu", "cpu"):
        d["compute"][k][built.spec.shape_key] = d["compute"][k]["768x3072-fp32-gated"]
    p = tmp_path_factory.mktemp("prof") / "tiny.json"
    p.write_text(json.dumps(d))
    return load_profile(str(p))


def scenario(built, tmp_path, policies, n=6):
    arr = tmp_path / "arr.csv"      # everyone at once: the schedule does not depend on step times
    arr.write_text("arrival_s,prompt_tokens,output_tokens\n" + "".join(f"0,{5 + 3 * i},{2 + i % 4}\n" for i in range(n)))
    return parse_scenario({
        "name": "live", "model": built.spec.model_dump(mode="json"), "batch_sizes": [3], "replications": 1,
        "trace": {"generator": "zipf", "zipf": 0.5},
        "workload": {"requests": n, "arrivals": {"kind": "file", "path": str(arr)},
                     "scheduler": {"token_budget": 16, "chunk": 8}},
        "policies": policies})


POLICIES = [
    {"name": "lru-bypass", "cache": {"kind": "lru", "capacity": 6}, "serving": {"prefill": "bypass", "staging": 3}},
    {"name": "lru-budget-prefetch", "cache": {"kind": "lru", "capacity": 8}, "prefetch": {"kind": "oracle"},
     "serving": {"upload_budget": 4, "budget_phase": "all", "prefill": "warm", "keep_top": 1}},
]


@pytest.mark.parametrize("index", range(len(POLICIES)))
def test_live_decisions_equal_the_simulator(built, host, tiny_profile, tmp_path, index):
    sc = scenario(built, tmp_path, POLICIES)
    pol = sc.policies[index]
    sim = serve_one(sc, pol, 3, 0, tiny_profile, index=index)
    req, steps, ex = serve_live(sc, pol, 3, 0, built, host=host)
    assert len(steps) == len(sim.steps) > 3
    cols = ["tokens", "requests", "unique_requests", "hits", "misses", "transfers", "copies", "bytes_h2d",
            "prefetches_issued", "prefetches_used", "prefetches_wasted", "cpu_computes"]
    for (items, step, dec), (_, row) in zip(steps, sim.steps.iterrows()):
        assert {c: getattr(dec, c) for c in cols} == {c: int(row[c]) for c in cols}
        assert sum(it.count for it in items) == row["tokens"]
        assert step.executed["transfers"] == dec.transfers and step.executed["cpu_computes"] == dec.cpu_computes
        assert step.executed["computed_tokens"] == dec.requests      # every routed pair served once
    assert list(req["request"]) == list(sim.requests["request"])
    assert (req["output_tokens"] == sim.requests["output_tokens"]).all()
    assert sum(dec.prefetches_issued for _, _, dec in steps) > 0 or index == 0


def test_batched_requests_get_the_logits_they_get_alone(built, host, tmp_path):
    """Padding, masks, positions and the per-request KV caches are right: each request's
    produced tokens' logits are the same side by side (max batch 3) as alone (max batch 1)."""
    sc = scenario(built, tmp_path, POLICIES[:1], n=4)
    _, _, alone = serve_live(sc, sc.policies[0], 1, 0, built, keep_logits=True, host=host)
    _, _, side = serve_live(sc, sc.policies[0], 3, 0, built, keep_logits=True, host=host)
    assert alone.logits.keys() == side.logits.keys() and len(alone.logits) == 4
    for rid, seq in alone.logits.items():
        assert len(seq) == len(side.logits[rid]) >= 2
        for a, b in zip(seq, side.logits[rid]):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_live_vs_projected_comparison_runs(built, host, tiny_profile, tmp_path):
    from calibrate.executors.serving import compare

    sc = scenario(built, tmp_path, POLICIES[:1], n=3)
    out = compare(sc, "lru-bypass", device="cpu", profile=tiny_profile, built=built, host=host)
    assert out["requests"] == 3
    for col in ("ttft_ms", "tpot_ms", "e2e_ms"):
        v = out[f"{col}_mean"]
        assert v["live"] > 0 and v["projected"] > 0 and v["error"] == pytest.approx(v["projected"] / v["live"] - 1)
