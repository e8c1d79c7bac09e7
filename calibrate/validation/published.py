"""The seed studies re-run through the simulator on the ``rtx3090-published`` profile.

``python -m calibrate.validation.published`` prints the three tables; ``tests/test_published.py`` asserts
them (docs/validation.md, "The published RTX 3090 study through the simulator").

1. **Seed 000, measured rows** (:func:`study_rows`): per (batch B, experts k) row, set up as
   the study's public benchmark measured it (one MoE layer, 27.0 MiB fp32 experts):
   - *computation*: one layer call in which each of the B items runs one expert FFN over its
     512 tokens (the study used one expert per item whatever k was): one prefill step of B
     sequences x 512 tokens, item i routed to expert i, plus the call's fixed cost as the
     layer's dense work; simulated = compute-stream busy time;
   - *memory transfer*: one pageable copy of the row's B x k experts (distinct experts, loaded
     as one coalesced copy); simulated = copy-engine busy time.
2. **Seed 000, dedup table** (:func:`dedup_table`): uniform routing over 128 experts, top-10,
   B = 4/8/16, 1,000 layer-steps (the seed's 1,000 simulations), transfer time and MB without
   deduplication (per-item loads) and with it (dedup loads), one pageable copy per expert.
3. **Seed 004, savings by batch size** (:func:`seed004_table`): the ``item_copy`` generator,
   128 experts, top-k 2/4/8/16 x locality 0.1/0.3/0.5/0.7, batch 1-64; the average over the 16
   configurations of the decode dedup savings, and the largest step's.
"""
from __future__ import annotations

import numpy as np

from simulator.profile import load_profile
from simulator.runner import cost_model, run_scenario, simulate
from simulator.scenario import parse_scenario
from simulator.traces.trace import concat_steps

from calibrate.validation.reference import PUBLISHED_ROWS, STUDY_TOKENS_PER_ITEM

PROFILE = "rtx3090-published"
MIB = 1 << 20
# seed 000's dedup table (3.5 ms and 27 MB per copy): batch -> (ms, MB) without / with dedup
SEED000_DEDUP = {4: ((140.0, 1080.0), (124.2, 958.0)), 8: ((280.0, 2160.0), (214.3, 1653.0)),
                 16: ((560.0, 4320.0), (325.5, 2511.0))}
# seed 004's "Savings by Batch Size": batch -> (average memory savings, max reuse factor)
SEED004 = {1: (0.000, 0.000), 2: (0.057, 0.281), 4: (0.171, 0.438), 8: (0.244, 0.508),
           16: (0.348, 0.637), 32: (0.491, 0.768), 64: (0.649, 0.876)}
SEED004_TOP_K = (2, 4, 8, 16)
SEED004_LOCALITY = (0.1, 0.3, 0.5, 0.7)


def _study_scenario(name: str, top_k: int, load: str, memory: str, dense_ms: float = 0.0, **trace):
    return parse_scenario({
        "name": name, "model": {"preset": "published-study", "num_layers": 1, "top_k": top_k},
        "profile": PROFILE, "replications": 1, "batch_sizes": [1], "engine": {"dense_ms_per_layer": dense_ms},
        "trace": {"generator": "uniform", "steps": 1, **trace},
        "policies": [{"name": f"{load}-{memory}", "load": load, "memory": memory}],
    }, "published study")


def _one_step(sc, routing: np.ndarray, seq: np.ndarray, phase: int) -> dict:
    """Simulate the scenario's one policy over a single hand-built step."""
    trace = concat_steps([(routing, seq, phase)], sc.model.num_experts, {"source": "published study"})
    cost = cost_model(sc, load_profile(PROFILE), trace.max_step_tokens)
    return simulate(sc, sc.policies[0], trace, cost, seed=0).iloc[0].to_dict()


def study_computation_ms(batch: int) -> float:
    """The study's computation: B items, one expert FFN each over their 512 tokens."""
    fixed = float(load_profile(PROFILE).measurements["study_layer_fixed_ms"])
    sc = _study_scenario(f"rtx3090-compute-b{batch}", 1, "dedup", "pinned", dense_ms=fixed)
    P = STUDY_TOKENS_PER_ITEM
    routing = np.repeat(np.arange(batch), P).reshape(-1, 1, 1)
    return float(_one_step(sc, routing, np.repeat(np.arange(batch, dtype=np.int32), P), 1)["compute_ms"])


def study_transfer_ms(batch: int, experts: int) -> float:
    """The study's memory transfer: one pageable copy of the row's batch x experts experts."""
    sc = _study_scenario(f"rtx3090-transfer-b{batch}-e{experts}", experts, "coalesced", "pageable")
    routing = np.arange(batch * experts).reshape(batch, 1, experts)
    return float(_one_step(sc, routing, np.arange(batch, dtype=np.int32), 0)["transfer_ms"])


def _err(sim: float, pub: float) -> float:
    return (sim - pub) / pub * 100 if pub else 0.0


def study_rows() -> list[dict]:
    rows = []
    for batch, experts, comp, xfer in PUBLISHED_ROWS:
        c, t = study_computation_ms(batch), study_transfer_ms(batch, experts)
        rows.append({"batch": batch, "experts": experts, "published_computation_ms": comp,
                     "simulated_computation_ms": c, "computation_error_pct": _err(c, comp),
                     "published_transfer_ms": xfer, "simulated_transfer_ms": t,
                     "transfer_error_pct": _err(t, xfer)})
    return rows


def computation_by_batch(rows: list[dict]) -> list[dict]:
    """The computation column per batch size: the mean of its 1- and 10-expert rows (the study
    ran the same computation for both) against the simulated value."""
    out = []
    for b in sorted({r["batch"] for r in rows}):
        rs = [r for r in rows if r["batch"] == b]
        pub = float(np.mean([r["published_computation_ms"] for r in rs]))
        sim = rs[0]["simulated_computation_ms"]
        out.append({"batch": b, "published_ms": pub, "simulated_ms": sim, "error_pct": _err(sim, pub)})
    return out


def dedup_table(steps: int = 1000) -> list[dict]:
    """Seed 000's dedup table: uniform routing, 128 experts, top-10, B = 4, 8, 16."""
    sc = parse_scenario({
        "name": "seed000-dedup", "model": {"preset": "published-study", "num_layers": 1, "top_k": 10},
        "profile": PROFILE, "replications": 1, "batch_sizes": sorted(SEED000_DEDUP), "seed": 0,
        "trace": {"generator": "uniform", "steps": steps},
        "policies": [{"name": "without", "load": "per-item", "memory": "pageable"},
                     {"name": "with", "load": "dedup", "memory": "pageable"}],
    }, "seed 000 dedup table")
    res = {(r["policy"], r["batch_size"]): r for r in run_scenario(sc).summary}
    out = []
    for b, pub in sorted(SEED000_DEDUP.items()):
        row = {"batch": b}
        for i, pol in enumerate(("without", "with")):
            r = res[(pol, b)]
            ms, mb = r["transfer_ms"], r["bytes_h2d"] / r["steps"] / MIB
            row[pol] = {"published_ms": pub[i][0], "simulated_ms": ms, "ms_error_pct": _err(ms, pub[i][0]),
                        "published_MB": pub[i][1], "simulated_MB": mb, "MB_error_pct": _err(mb, pub[i][1])}
        out.append(row)
    return out


def seed004_table(steps: int = 200, seed: int = 0) -> list[dict]:
    """Seed 004's savings by batch size from the item_copy generator: per batch size, the mean
    over the 16 (top-k, locality) configurations of ``dedup_savings_decode``, and the largest
    single step's share of repeated requests."""
    per_batch: dict[int, list[tuple[float, float]]] = {b: [] for b in SEED004}
    for k in SEED004_TOP_K:
        for loc in SEED004_LOCALITY:
            sc = parse_scenario({
                "name": f"seed004-k{k}-l{loc}", "model": {"preset": "published-study", "num_layers": 1, "top_k": k},
                "profile": PROFILE, "replications": 1, "batch_sizes": sorted(SEED004), "seed": seed,
                "trace": {"generator": "item_copy", "locality": loc, "steps": steps},
                "policies": [{"name": "dedup", "load": "coalesced", "memory": "pinned"}],
            }, "seed 004")
            res = run_scenario(sc)
            st = res.steps
            share = (st["requests"] - st["unique_requests"]) / st["requests"]
            top = share.groupby(st["batch_size"]).max()
            for r in res.summary:
                per_batch[r["batch_size"]].append((r["dedup_savings_decode"], float(top[r["batch_size"]])))
    out = []
    for b, (pub_avg, pub_max) in sorted(SEED004.items()):
        vals = per_batch[b]
        out.append({"batch": b, "published_avg_savings": pub_avg,
                    "simulated_avg_savings": float(np.mean([v for v, _ in vals])),
                    "published_max_reuse": pub_max, "simulated_max_reuse": max(m for _, m in vals)})
    return out


def main() -> None:
    rows = study_rows()
    print("Seed 000, measured rows (rtx3090-published)\n")
    print("| batch | experts | published computation ms | simulated | error | published transfer ms | simulated | error |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['experts']} | {r['published_computation_ms']:.2f} | {r['simulated_computation_ms']:.2f} "
              f"| {r['computation_error_pct']:+.1f}% | {r['published_transfer_ms']:.2f} | {r['simulated_transfer_ms']:.2f} "
              f"| {r['transfer_error_pct']:+.1f}% |")
    print("\n| batch | published computation ms (mean of the 1- and 10-expert rows) | simulated | error |")
    print("|---:|---:|---:|---:|")
    for r in computation_by_batch(rows):
        print(f"| {r['batch']} | {r['published_ms']:.3f} | {r['simulated_ms']:.3f} | {r['error_pct']:+.2f}% |")
    print("\nSeed 000, dedup table (uniform routing, 128 experts, top-10, 1,000 layer-steps)\n")
    print("| batch | without: published ms / MB | simulated | with: published ms / MB | simulated | errors (ms, MB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in dedup_table():
        w, d = r["without"], r["with"]
        print(f"| {r['batch']} | {w['published_ms']:.1f} / {w['published_MB']:.0f} | {w['simulated_ms']:.1f} / "
              f"{w['simulated_MB']:.0f} | {d['published_ms']:.1f} / {d['published_MB']:.0f} | {d['simulated_ms']:.1f} / "
              f"{d['simulated_MB']:.0f} | {w['ms_error_pct']:+.1f}%, {w['MB_error_pct']:+.1f}%; "
              f"{d['ms_error_pct']:+.1f}%, {d['MB_error_pct']:+.1f}% |")
    print("\nSeed 004, savings by batch size (item_copy, 16 configurations x 200 layer-steps)\n")
    print("| batch | published avg savings | simulated | difference (points) | published max | simulated max |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in seed004_table():
        print(f"| {r['batch']} | {100 * r['published_avg_savings']:.1f}% | {100 * r['simulated_avg_savings']:.1f}% "
              f"| {100 * (r['simulated_avg_savings'] - r['published_avg_savings']):+.1f} "
              f"| {r['published_max_reuse']:.3f} | {r['simulated_max_reuse']:.3f} |")


if __name__ == "__main__":
    main()
