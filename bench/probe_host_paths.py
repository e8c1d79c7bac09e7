"""Probe: do calibration's host-path measurements and the live executor's agree, interleaved?

The host-bound validation rows (CPU-miss, pageable per-item loads) are the ones that miss the
15% worst-case target. This probe separates *method* from *drift*: it measures the CPU-miss path
and the pageable copy the way calibration does and the way the live executor meets them, in
alternating rounds on one machine, so that a host that drifts moves every variant together and
a method difference shows as a constant gap.

    python bench/probe_host_paths.py --rounds 5 --out probe.json      (needs a CUDA GPU)

CPU-miss path, per call (ms), one token per call unless the row says otherwise:

- ``calib``: calibration's ``cpu_path`` loop: a 2 GiB pinned pool, a burst of top_k calls after
  the host waited on a 0.2 ms sleep kernel;
- ``calib/live-pool``: the same loop over the validation run's host pool (up to 8 GB);
- ``calib/layer``: the live pool, and each burst after the executor's own dense + route sync;
- ``calib/burst4``: the 2 GiB pool with bursts of 4 x top_k calls;
- ``live B=b``: the validation scenario's cpu-miss row run by the live executor.

Pageable copy, per copy (ms): ``calib``: calibration's executor run (per-item pageable, 4
layers, uniform trace, B=4, its own 8 GB pool); ``live B=4``: the scenario's per-item-pageable
row.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from calibrate.measurements.executor_costs import RUN_DENSE_MS, RUN_SEED, _probe_model
from calibrate.executors.twin import DEFAULT_HOST_BUDGET, LiveExecutor, host_experts
from simulator.atomic import write_text
from simulator.models import get_preset
from simulator.runner import build_trace, derive_seed
from simulator.scenario import PolicySpec, load_scenario
from simulator.traces import generate

ROOT = Path(__file__).resolve().parent.parent


def cpu_loop(ex: LiveExecutor, burst: int, tokens: int, budget_s: float, layer_like: bool) -> float:
    """Median per-call ms of bursts of ``burst`` CPU-path calls, each after the host idled on the GPU."""
    k, times = 0, []
    for _ in range(burst):
        ex._cpu(k, tokens, None)
        k += 1
    began = time.perf_counter()
    while time.perf_counter() - began < budget_s or len(times) < 5:
        if layer_like:
            ev = ex._dense()
            ex._route()
            first = ev
        else:
            ev = ex._dense()
            ev.synchronize()
            first = None
        t0 = time.perf_counter()
        for i in range(burst):
            ex._cpu(k, tokens, first if i == 0 else None)
            k += 1
        times.append((time.perf_counter() - t0) * 1e3 / burst)
    return statistics.median(times)


def live_row(sc, pol, b: int, host, steps: int = 4):
    """Per-call host ms of the row's CPU path or blocking copy, and tokens per CPU call."""
    trace = build_trace(sc, b, 0, ROOT / "scenarios")
    ex = LiveExecutor(sc.model, pol, trace, device="cuda", dense_ms=sc.dense_ms, seed=derive_seed(sc.seed, 0, b, 7),
                      host=host)
    ex.warm_up()
    out = [st for st, _ in ex.run(range(min(steps, trace.num_steps)))][1:]
    del ex
    torch.cuda.empty_cache()
    cpu = sum(s.executed["cpu_computes"] for s in out)
    cop = sum(s.executed["copies"] for s in out)
    res = {}
    if cpu:
        res = {"ms": sum(s.host_ms["cpu"] for s in out) / cpu,
               "tokens_per_call": sum(s.executed["computed_tokens"] for s in out) / cpu}
    if cop:
        res = {"ms": sum(s.host_ms["load"] for s in out) / cop}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.6, help="seconds per calibration-style point")
    ap.add_argument("--scenario", action="append", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    names = a.scenario or ["scenarios/validate_study.yaml", "scenarios/validate_deepseek.yaml"]
    report = {}
    for name in names:
        sc, _ = load_scenario(ROOT / name)
        m = sc.model
        pols = {p.name: p for p in sc.policies}
        t_alloc = time.perf_counter()
        pool_live = host_experts(m, True, seed=sc.seed)
        pool_2g = host_experts(m, True, 2 << 30)
        pm = _probe_model(get_preset(m.name.split("+")[0]))   # calibration runs the preset, cut to its probe layers
        page_live = host_experts(m, False, seed=sc.seed)
        page_cal = host_experts(pm, False, DEFAULT_HOST_BUDGET)
        print(f"{sc.name}: pools {len(pool_live)}/{len(pool_2g)} pinned, {len(page_live)}/{len(page_cal)} pageable "
              f"experts, {time.perf_counter() - t_alloc:.1f} s", flush=True)
        big = generate(num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k, batch_size=64, steps=1,
                       seed=0, generator="uniform")
        probe = PolicySpec(name="probe", miss="cpu")
        ex2 = LiveExecutor(m, probe, big, device="cuda", dense_ms=0.2, host=pool_2g, measure_copies=False)
        exl = LiveExecutor(m, probe, big, device="cuda", dense_ms=0.2, host=pool_live, measure_copies=False)
        exlayer = LiveExecutor(m, probe, big, device="cuda", dense_ms=sc.dense_ms, host=pool_live,
                               measure_copies=False)
        rounds = []
        for r in range(a.rounds):
            row = {
                "calib": cpu_loop(ex2, m.top_k, 1, a.budget, False),
                "calib/live-pool": cpu_loop(exl, m.top_k, 1, a.budget, False),
                "calib/layer": cpu_loop(exlayer, m.top_k, 1, a.budget, True),
                "calib/burst4": cpu_loop(ex2, 4 * m.top_k, 1, a.budget, False),
            }
            for b in (1, 16):
                lr = live_row(sc, pols["cpu-miss"], b, pool_live)
                row[f"live B={b}"] = lr["ms"]
                row[f"live B={b} tokens/call"] = lr["tokens_per_call"]
            # pageable: calibration's executor run vs the scenario's row
            tr = generate(num_layers=pm.num_layers, num_experts=pm.num_experts, top_k=pm.top_k, batch_size=4,
                          steps=4, seed=RUN_SEED, generator="uniform")
            ex = LiveExecutor(pm, PolicySpec(name="p", load="per-item", memory="pageable"), tr, device="cuda",
                              dense_ms=RUN_DENSE_MS, seed=RUN_SEED, host=page_cal, measure_copies=False)
            ex.warm_up()
            st = [s for s, _ in ex.run()][1:]
            del ex
            row["pageable calib"] = sum(s.host_ms["load"] for s in st) / sum(s.executed["copies"] for s in st)
            row["pageable live B=4"] = live_row(sc, pols["per-item-pageable"], 4, page_live, steps=3)["ms"]
            rounds.append(row)
            print(f"  round {r}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
        med = {k: statistics.median(x[k] for x in rounds) for k in rounds[0]}
        print("  median: " + "  ".join(f"{k} {v:.3f}" for k, v in med.items()), flush=True)
        report[sc.name] = {"rounds": rounds, "median": med}
        del ex2, exl, exlayer, pool_live, pool_2g, page_live, page_cal
        torch.cuda.empty_cache()
    if a.out:
        write_text(a.out, json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
