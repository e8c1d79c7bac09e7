"""Per-request latency summaries of serving runs, with 95% confidence intervals.

Per (policy, max batch), over all replications' requests:

- ``ttft_ms``, ``tpot_ms``, ``e2e_ms``, ``queue_ms``: mean, p50, p90, p99; each with a 95%
  Student-t interval over the replications' own values of that statistic (``ci95``; with one
  replication the mean's interval is over the requests, the percentiles' none). TPOT is
  (finish - first token) / (output - 1), over requests with more than one output token.
- ``throughput``: output tokens/s and requests/s over the run's span (first arrival to last
  finish, per replication, then averaged); ``goodput_rps``: requests meeting the SLO per
  second; ``slo_attainment``: their share.
- ``prompt_tokens_per_s``: prompt tokens over the summed latency of the steps holding prompt
  tokens (prompt throughput; those steps may hold decode tokens too);
- ``mean_in_system`` and ``arrival_rate_x_e2e`` (Little's law): the time-average number of requests in the system against arrival rate x
  mean time in system (equal for a run where every request finishes).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..metrics import ci95_half_width

LATENCIES = ("ttft_ms", "tpot_ms", "e2e_ms", "queue_ms")
QUANTILES = {"mean": None, "p50": 50, "p90": 90, "p99": 99}


def _stat(v: np.ndarray, q) -> float:
    if len(v) == 0:
        return 0.0
    return float(v.mean()) if q is None else float(np.percentile(v, q))


def latency_block(g: pd.DataFrame, col: str) -> dict:
    v = g[col].to_numpy()
    if col == "tpot_ms":
        keep = g["output_tokens"].to_numpy() > 1
        v, reps = v[keep], g["replication"].to_numpy()[keep]
    else:
        reps = g["replication"].to_numpy()
    out = {}
    per_rep = [v[reps == r] for r in np.unique(reps)]
    for name, q in QUANTILES.items():
        val = _stat(v, q)
        vals = np.array([_stat(x, q) for x in per_rep if len(x)])
        if len(vals) >= 2:
            half = ci95_half_width(vals)
        elif q is None:
            half = ci95_half_width(v)
        else:
            half = 0.0
        out[name] = val
        out[f"{name}_ci95"] = [val - half, val + half]
    return out


def time_in_system(arrival: np.ndarray, finish: np.ndarray) -> tuple[float, float]:
    """(time-average number in the system, span) from each request's arrival and finish: the
    integral of the count over the span, swept event by event (not the sum of the stays)."""
    ev = np.concatenate([arrival, finish])
    step = np.concatenate([np.ones(len(arrival)), -np.ones(len(finish))])
    order = np.lexsort((-step, ev))               # at a tie, an arrival first
    ev, step = ev[order], step[order]
    count = np.cumsum(step)
    area = float(np.sum(count[:-1] * np.diff(ev)))
    span = float(ev[-1] - ev[0])
    return (area / span if span > 0 else 0.0), span


def run_rates(g: pd.DataFrame) -> dict:
    """Throughput figures of one replication's requests."""
    span = float(g["finish_ms"].max() - g["arrival_ms"].min())
    s = span / 1e3 if span > 0 else math.inf
    in_sys, span2 = time_in_system(g["arrival_ms"].to_numpy(), g["finish_ms"].to_numpy())
    lam = len(g) / span2 if span2 > 0 else 0.0
    return {"tokens_per_s": g["output_tokens"].sum() / s, "requests_per_s": len(g) / s,
            "goodput_rps": int(g["meets_slo"].sum()) / s, "span_s": span / 1e3,
            "mean_in_system": in_sys, "arrival_rate_x_e2e": lam * float(g["e2e_ms"].mean())}


def summarise_serving(requests: pd.DataFrame, steps: pd.DataFrame, sc, infos: dict) -> list[dict]:
    out = []
    order = {p.name: i for i, p in enumerate(sc.policies)}
    slo = sc.workload.slo
    for (pol, b), g in sorted(requests.groupby(["policy", "batch_size"], sort=False),
                              key=lambda x: (x[0][1], order[x[0][0]])):
        st = steps[(steps["policy"] == pol) & (steps["batch_size"] == b)]
        row: dict = {"policy": pol, "batch_size": int(b), "max_batch": int(b),
                     "replications": int(g["replication"].nunique()), "requests": int(len(g)),
                     "steps": int(len(st)), "output_tokens": int(g["output_tokens"].sum()),
                     "prompt_tokens": int(g["prompt_tokens"].sum())}
        for c in LATENCIES:
            row[c] = latency_block(g, c)
        rates = [run_rates(x) for _, x in g.groupby("replication")]
        for k in rates[0]:
            vals = np.array([r[k] for r in rates], float)
            row[k] = float(vals.mean())
        tps = np.array([r["tokens_per_s"] for r in rates])
        row["tokens_per_s_ci95"] = [float(tps.mean() - ci95_half_width(tps)), float(tps.mean() + ci95_half_width(tps))]
        row["slo"] = {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "attainment": slo.attainment}
        row["slo_attainment"] = float(g["meets_slo"].mean())
        row["meets_slo"] = row["slo_attainment"] >= slo.attainment
        for c in ("hits", "misses", "transfers", "bytes_h2d", "cpu_computes", "prefetches_issued",
                  "prefetches_used", "prefetches_wasted"):
            row[c] = int(st[c].sum())
        served = row["hits"] + row["misses"]
        row["hit_rate"] = row["hits"] / served if served else 0.0
        for ph, name in ((1, "prefill"), (0, "decode")):
            p = st[st["phase"] == ph]
            s = int((p["hits"] + p["misses"]).sum())
            row[f"hit_rate_{name}_steps"] = float(p["hits"].sum() / s) if s else None
        pre_steps, dec_steps = st[st["prefill_tokens"] > 0], st[st["prefill_tokens"] == 0]
        pre_ms = float(pre_steps["latency_ms"].sum())
        # prompt throughput: prompt tokens over the time of the steps that hold them
        row["prompt_tokens_per_s"] = float(pre_steps["prefill_tokens"].sum() / pre_ms * 1e3) if pre_ms > 0 else None
        row["prefill_step_latency_ms_mean"] = float(pre_steps["latency_ms"].mean()) if len(pre_steps) else None
        row["decode_step_latency_ms_mean"] = float(dec_steps["latency_ms"].mean()) if len(dec_steps) else None
        row["step_latency_ms_mean"] = float(st["latency_ms"].mean())
        info = [infos[(pol, b, r)] for r in sorted(g["replication"].unique())]
        row["memory"] = {k: info[0][k] for k in ("gpu_memory_bytes", "expert_slots", "expert_slot_bytes",
                                                 "kv_bytes_per_token", "kv_bytes", "kv_tokens")}
        row["peak_batch"] = max(i["peak_batch"] for i in info)
        row["peak_kv_tokens"] = max(i["peak_kv_tokens"] for i in info)
        row["staged_loads"] = sum(i["staged_loads"] for i in info)
        for k in ("budget_cpu_misses", "budget_over_copies", "deferred_prompt_tokens"):
            row[k] = sum(i[k] for i in info)
        row["notes"] = sorted({n for i in info for n in i["notes"]})
        out.append(row)
    return out
