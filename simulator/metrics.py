"""Summary statistics per (policy, batch size), with 95% confidence intervals.

Counts are totals over the measured steps (after ``engine.warmup_steps``) of all
replications. Times are per step. The confidence interval of the mean step latency is a
Student-t interval over the replication means (each replication has its own trace seed);
with one replication it falls back to the steps' standard error, which ignores their
autocorrelation (``ci95_method`` says which).

``dedup_savings`` is (requests - unique requests) / requests with both summed over all measured
steps, so a prefill step (many tokens) outweighs many decode steps; ``dedup_savings_decode`` and
``dedup_savings_prefill`` are the same ratio over each phase alone (``None`` without prefill).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from .tiers import stored_bytes

COUNTS = ["tokens", "requests", "unique_requests", "served", "hits", "misses", "transfers", "copies",
          "bytes_h2d", "prefetches_issued", "prefetches_used", "prefetches_wasted", "cpu_computes",
          "direct_computes", "bytes_direct", "dequants", "disk_reads", "disk_prefetches", "bytes_disk"]


def ci95_half_width(values: np.ndarray) -> float:
    """Half-width of the 95% Student-t interval of the mean of ``values``."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return 0.0
    return float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def _savings(g: pd.DataFrame) -> float:
    """(requests - unique requests) / requests, summed over the steps of ``g``."""
    req = int(g["requests"].sum())
    return (req - int(g["unique_requests"].sum())) / req if req else 0.0


def summarise(steps: pd.DataFrame, sc, expert_bytes: int) -> list[dict]:
    warm = sc.engine.warmup_steps
    df = steps[steps["step"] >= warm]
    out = []
    order = {p.name: i for i, p in enumerate(sc.policies)}
    pol_of = {p.name: p for p in sc.policies}
    for (pol, b), g in sorted(df.groupby(["policy", "batch_size"], sort=False), key=lambda x: (x[0][1], order[x[0][0]])):
        row: dict = {"policy": pol, "batch_size": int(b), "replications": int(g["replication"].nunique()),
                     "steps": int(len(g))}
        for c in COUNTS:
            row[c] = int(g[c].sum())
        row["dedup_savings"] = _savings(g)
        row["dedup_savings_decode"] = _savings(g[g["phase"] == 0])
        row["dedup_savings_prefill"] = _savings(g[g["phase"] == 1]) if (g["phase"] == 1).any() else None
        served = row["hits"] + row["misses"]
        row["hit_rate"] = row["hits"] / served if served else 0.0
        # a hit on an expert that arrived by prefetch is a prefetch hit; the rest were resident
        row["prefetch_hits"] = row["prefetches_used"]
        row["demand_hits"] = row["hits"] - row["prefetches_used"]
        row["demand_hit_rate"] = row["demand_hits"] / served if served else 0.0
        row["wasted_prefetch_bytes"] = row["prefetches_wasted"] * stored_bytes(
            sc.model, pol_of[pol].expert_dtype) if pol in pol_of else row["prefetches_wasted"] * expert_bytes
        lat = g["latency_ms"].to_numpy()
        rep_means = g.groupby("replication")["latency_ms"].mean().to_numpy()
        # replications have equal step counts, so the pooled mean is the mean of their means
        mean = float(lat.mean())
        if len(rep_means) >= 2:
            half, method = ci95_half_width(rep_means), "t over replication means"
        else:
            half, method = ci95_half_width(lat), "t over steps (one replication)"
        lo, hi = mean - half, mean + half
        row["step_latency_ms"] = {
            "mean": mean, "std": float(lat.std(ddof=1)) if len(lat) > 1 else 0.0,
            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "ci95": [lo, hi], "ci95_method": method,
            "replication_means": [float(x) for x in rep_means],
        }
        for c in ("compute_ms", "transfer_ms", "stall_ms", "cpu_ms"):
            row[c] = float(g[c].mean())
        total_ms = float(lat.sum())
        row["tokens_per_s"] = row["tokens"] / total_ms * 1e3 if total_ms > 0 else 0.0
        row["bytes_per_token"] = row["bytes_h2d"] / row["tokens"] if row["tokens"] else 0.0
        row["transfer_GBps"] = (row["bytes_h2d"] / (g["transfer_ms"].sum() * 1e-3) / 1e9
                                if g["transfer_ms"].sum() > 0 else 0.0)
        out.append(row)
    # speed-up over the scenario's first policy at the same batch size
    first = sc.policies[0].name
    base = {r["batch_size"]: r["step_latency_ms"]["mean"] for r in out if r["policy"] == first}
    for r in out:
        b = base.get(r["batch_size"])
        r["speedup_vs_first"] = b / r["step_latency_ms"]["mean"] if b and r["step_latency_ms"]["mean"] > 0 else None
    return out
