"""Probe: what sets a pageable copy's time, when host-now's probe and a row disagree?

Run G of the validation (docs/validation.md) found host-now's pageable probe reading 3.8-4.3 ms per
27 MiB copy beside study rows whose own copies took 3.3-3.8 ms. The probe differs from a row in
three ways, and this probe tests each, in interleaved rounds on one machine (so drift moves every
variant together and a real difference shows as a constant gap):

- **routing locality**: a blocking pageable copy is a CPU memcpy into a pinned staging buffer
  (single-threaded, ~7 GB/s on these VMs) feeding the DMA. A source copied a moment ago may still
  be in the host's last-level cache. ``seq ordered`` times, copy by copy, the row's own per-item
  load sequence (the planner's, steps of the scenario's trace at B); ``seq shuffled`` times the
  same copies in a random order. Each copy is tagged with its *reuse distance*: the bytes copied
  since its source was last copied.
- **which memory**: the probe runs the model cut to 4 layers, so it reads only the first half of
  the study's host pool. ``sweep`` copies every expert of the pool once, in random order, per
  round; the per-index times show whether some regions copy slower, stably across rounds.
- **the probe's own shape**: host-now's probe (4 layers, uniform trace, B=1,4) against the same
  probe on the full model, and the scenario's rows run by the executor.

    python bench/probe_pageable.py --rounds 8 --out probe-pageable.json      (needs a CUDA GPU)
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from calibrate.measurements.executor_costs import _probe_model, probe_costs, probe_steps
from calibrate.measurements.host_now import NOW_STEPS
from calibrate.executors.twin import LiveExecutor, host_experts
from simulator.atomic import write_text
from simulator.planner import LOAD, Planner
from simulator.runner import build_trace, derive_seed
from simulator.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
LLC_BYTES = 300 << 20


def load_sequence(sc, pol, b: int, steps: int) -> list[int]:
    """The host keys of the row's LOAD operations, in issue order, for its first ``steps`` steps."""
    trace = build_trace(sc, b, 0, ROOT / "scenarios")
    planner = Planner(sc.model, pol, trace, seed=derive_seed(sc.seed, 0, b, 7))
    keys = []
    for s in range(min(steps, trace.num_steps)):
        layers, _ = planner.plan_step(s)
        keys += [k for ops in layers for op in ops if op[0] == LOAD for k in op[2]]
    return keys


def timed_copies(keys: list[int], host, dev) -> list[float]:
    """Blocking pageable copies of ``host[k]``, one by one, ms each (host clock)."""
    out = []
    for k in keys:
        t0 = time.perf_counter()
        dev.copy_(host[k % len(host)], non_blocking=True)   # pageable: returns when staged
        out.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return out


def reuse_distance(keys: list[int], eb: int) -> list[float]:
    """Bytes copied since each key's source was last copied (inf for a first copy)."""
    last: dict[int, int] = {}
    out = []
    for i, k in enumerate(keys):
        out.append((i - last[k] - 1) * eb if k in last else float("inf"))
        last[k] = i
    return out


def executor_row(sc, pol, b: int, host, steps: int) -> float:
    trace = build_trace(sc, b, 0, ROOT / "scenarios")
    ex = LiveExecutor(sc.model, pol, trace, device="cuda", dense_ms=sc.dense_ms, seed=derive_seed(sc.seed, 0, b, 7),
                      host=host, measure_copies=False)
    ex.warm_up()
    st = [s for s, _ in ex.run(range(min(steps, trace.num_steps)))][1:]
    del ex
    torch.cuda.empty_cache()
    return sum(s.host_ms["load"] for s in st) / sum(s.executed["copies"] for s in st)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--scenario", default="scenarios/validate_study.yaml")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    sc, _ = load_scenario(ROOT / a.scenario)
    m, eb = sc.model, sc.model.expert_bytes
    pol = next(p for p in sc.policies if p.memory == "pageable" and p.load == "per-item")
    device = torch.device("cuda")
    t0 = time.perf_counter()
    host = host_experts(m, False, seed=sc.seed)                 # the validation's pageable pool
    print(f"{sc.name}: {len(host)} pageable experts of {eb / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s",
          flush=True)
    dev = torch.empty(host[0].numel(), dtype=host[0].dtype, device=device)
    batches = [int(x) for x in a.batches.split(",")]
    seqs = {b: load_sequence(sc, pol, b, 3 if b <= 4 else 1) for b in batches}
    dists = {b: reuse_distance(seqs[b], eb) for b in batches}
    rng = random.Random(0)
    pm_cut, pm_full = _probe_model(m), m
    timed_copies(list(range(min(8, len(host)))), host, dev)      # warm the staging path
    rounds, per_index, by_dist = [], [[] for _ in host], {b: [] for b in batches}
    for r in range(a.rounds):
        row = {}
        order = list(range(len(host)))
        rng.shuffle(order)
        sweep = timed_copies(order, host, dev)
        for i, ms in zip(order, sweep):
            per_index[i].append(ms)
        row["sweep"] = statistics.median(sweep)
        half = len(host) // 2
        row["sweep first half"] = statistics.median(ms for i, ms in zip(order, sweep) if i < half)
        row["sweep second half"] = statistics.median(ms for i, ms in zip(order, sweep) if i >= half)
        for b in batches:
            ordered = timed_copies(seqs[b], host, dev)
            shuffled_keys = list(seqs[b])
            rng.shuffle(shuffled_keys)
            shuffled = timed_copies(shuffled_keys, host, dev)
            row[f"seq ordered B={b}"] = statistics.mean(ordered)
            row[f"seq shuffled B={b}"] = statistics.mean(shuffled)
            by_dist[b] += list(zip(dists[b], ordered))
        for name, pm in (("probe cut", pm_cut), ("probe full", pm_full)):
            row[name] = probe_costs(probe_steps(device, pm, "pageable", host, NOW_STEPS), "pageable")[
                "pageable_copy_ms"]
        for b in batches:
            row[f"executor B={b}"] = executor_row(sc, pol, b, host, 3 if b <= 4 else 2)
        rounds.append(row)
        print(f"round {r}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    med = {k: statistics.median(x[k] for x in rounds) for k in rounds[0]}
    print("median: " + "  ".join(f"{k} {v:.3f}" for k, v in med.items()), flush=True)
    # reuse distance: copies whose source was copied within one LLC's worth of bytes vs the rest
    reuse = {}
    for b in batches:
        near = [ms for d, ms in by_dist[b] if d < LLC_BYTES]
        far = [ms for d, ms in by_dist[b] if d >= LLC_BYTES]
        reuse[b] = {"near_n": len(near), "near_median_ms": statistics.median(near) if near else None,
                    "far_n": len(far), "far_median_ms": statistics.median(far) if far else None,
                    "share_near": len(near) / max(1, len(near) + len(far))}
        print(f"B={b}: reuse < LLC {reuse[b]['near_n']} copies median {reuse[b]['near_median_ms']}, "
              f">= LLC {reuse[b]['far_n']} median {reuse[b]['far_median_ms']}", flush=True)
    idx = np.array([statistics.median(v) for v in per_index])
    even = np.array([statistics.median(v[0::2]) for v in per_index])
    odd = np.array([statistics.median(v[1::2]) for v in per_index])
    corr = float(np.corrcoef(even, odd)[0, 1]) if a.rounds >= 2 else None
    print(f"per-index median ms: min {idx.min():.3f} p50 {np.median(idx):.3f} max {idx.max():.3f}; "
          f"even/odd-round correlation {corr}", flush=True)
    if a.out:
        write_text(a.out, json.dumps({"scenario": sc.name, "rounds": rounds, "median": med, "reuse": reuse,
                                           "per_index_ms": idx.tolist(), "even_odd_corr": corr}, indent=1))


if __name__ == "__main__":
    main()
