"""The published RTX 3090 study re-run through the simulator on the rtx3090-published profile.

Set-up of the study: per-item loads (every batch item copies each of its experts), 27.0 MiB
fp32 experts from pageable memory, batch 1/2/4 x 1/10 experts per item, one layer. The
simulated "memory transfer" is the copy engine's busy time per step; it is compared with each
published row.
"""
from __future__ import annotations

import statistics

from simulator.runner import run_scenario
from simulator.scenario import parse_scenario

from .reference import PUBLISHED_ROWS


def study_rows(steps: int = 20) -> list[dict]:
    rows = []
    for batch, experts, _, published in PUBLISHED_ROWS:
        sc = parse_scenario({
            "name": f"rtx3090-b{batch}-e{experts}",
            "model": {"preset": "published-study", "num_layers": 1, "top_k": experts},
            "profile": "rtx3090-published", "replications": 1, "batch_sizes": [batch],
            "trace": {"generator": "uniform", "steps": steps},
            "policies": [{"name": "per-item-pageable", "load": "per-item", "memory": "pageable"}],
        }, "published study")
        r = run_scenario(sc).summary[0]
        rows.append({
            "batch": batch, "experts": experts, "copies": batch * experts,
            "published_ms": published, "simulated_ms": r["transfer_ms"],
            "error_pct": (r["transfer_ms"] - published) / published * 100,
            "published_per_copy_ms": published / (batch * experts),
        })
    return rows


def summary(rows: list[dict]) -> dict:
    errs = [abs(r["error_pct"]) for r in rows]
    return {"median_abs_error_pct": statistics.median(errs), "worst_abs_error_pct": max(errs)}


if __name__ == "__main__":
    rows = study_rows()
    print("| batch | experts | copies | published ms | simulated ms | error | published ms/copy |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['experts']} | {r['copies']} | {r['published_ms']:.2f} | {r['simulated_ms']:.2f} "
              f"| {r['error_pct']:+.1f}% | {r['published_per_copy_ms']:.3f} |")
    s = summary(rows)
    print(f"\nmedian |error| {s['median_abs_error_pct']:.1f}%, worst {s['worst_abs_error_pct']:.1f}%")
