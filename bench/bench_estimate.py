"""Measure the per-unit costs of simulator/estimate.py and check the estimate against real runs.

    python bench/bench_estimate.py --fit      # fit COSTS on a grid of small runs; print a fresh table
    python bench/bench_estimate.py            # estimate vs measured time and peak memory, 10 scenarios

The fit: every cost in ``COSTS`` multiplies a count the estimator computes (served requests,
generator draws, steps, slots, rows...). For each training run the bench computes those counts
(the estimate with that one cost set to 1 and the others to 0), measures the run and the writing
of its results, as ``simmoe run`` does them (CPU time: the best of ``--repeats``; memory:
tracemalloc's peak, which sees Python and NumPy allocations), and
solves a bounded (non-negative) least-squares problem on relative error, separately for the time costs and
the memory costs of ``simmoe run``, and for ``simmoe trace stats``. Paste the printed table into
``COSTS`` (costs the fit cannot see keep their values).

The check runs each of 10 scenarios of different sizes in a fresh process: CPU time of
``run_scenario`` + writing the results, the peak of tracemalloc, and the rise of the process's
peak resident memory (VmHWM) over its resident memory before the run; and prints the table for
BENCHMARKS.md with the ratios estimate / measured (target: within 2x, i.e. 0.5-2.0).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy.optimize import lsq_linear

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simulator import estimate as est_mod  # noqa: E402
from simulator.scenario import parse_scenario  # noqa: E402
from simulator.traces.synthetic import CHUNK  # noqa: E402

DIRECT = ["sim_s_per_slot", "bytes_per_slot", "bytes_per_op", "bytes_per_draw", "bytes_per_future",
          "run_s_first"]                                                    # measured directly
GEN_TIME_KEYS = ["gen_s_per_draw", "gen_s_per_pick", "gen_s_per_wave", "gen_s_per_layer_step", "gen_s_per_cell_expert"]   # fit_gen
TIME_KEYS = [k for k in est_mod.COSTS if k.startswith(("sim_s_", "run_s_")) and k not in DIRECT]
MEM_KEYS = ["bytes_base", "bytes_per_routed", "bytes_per_row"]
STATS_TIME_KEYS = ["stats_s_per_routed", "stats_s_per_pair", "stats_s_per_lru_step", "stats_s_per_lru_key"]

POLICIES = [
    {"name": "per-item", "load": "per-item", "memory": "pageable"},
    {"name": "dedup", "load": "dedup"},
    {"name": "coalesced", "load": "coalesced", "cache": {"kind": "lru", "capacity": 64}},
    {"name": "lru", "load": "dedup", "cache": {"kind": "lru", "capacity": 64}},
    {"name": "lru-oracle", "load": "dedup", "cache": {"kind": "lru", "capacity": 64}, "prefetch": {"kind": "oracle"}},
    {"name": "belady", "load": "dedup", "cache": {"kind": "belady", "capacity": 64}},
    {"name": "hot", "load": "per-item", "cache": {"kind": "static-hot", "capacity": 64}},
]
PINNED = {"name": "per-item-pinned", "load": "per-item"}     # training only: per-item apart from pageable's extra


def scenario(name="s", *, model=None, batch=(4,), steps=16, reps=1, policies=None, prefill=0, **trace) -> dict:
    return {"name": name, "model": {"preset": "published-study", **(model or {})}, "seed": 0, "replications": reps,
            "batch_sizes": list(batch), "policies": copy.deepcopy(policies or POLICIES),
            "trace": {"generator": "mixed", "steps": steps, "zipf": 0.6, "batch_locality": 0.5, "temporal": 0.3,
                      "prefill_tokens": prefill, **trace}}


def fit_runs() -> list[dict]:
    """Training runs: one policy at a time over traces of several shapes."""
    shapes = [
        dict(batch=(1,), steps=64), dict(batch=(8,), steps=32), dict(batch=(64,), steps=8),
        dict(batch=(16,), steps=16, model={"num_layers": 4}), dict(batch=(16,), steps=16, model={"num_experts": 16}),
        dict(batch=(4,), steps=16, model={"num_experts": 1024, "top_k": 8}), dict(batch=(8,), steps=4, prefill=64),
        dict(batch=(16,), steps=16, model={"num_experts": 8, "num_layers": 24}),     # few experts: Gumbel keys
        dict(batch=(32,), steps=8, model={"num_experts": 256, "top_k": 8, "num_layers": 16}),
    ]
    heavy = [  # memory-heavy shapes (generator draws, per-step rows, one step's operations), fewer policies
        dict(batch=(64,), steps=2, prefill=256), dict(batch=(1,), steps=3000, model={"num_layers": 2}),
        dict(batch=(2048,), steps=2), dict(batch=(8,), steps=500),
    ]
    runs = []
    for i, sh in enumerate(shapes + heavy):
        for p in POLICIES + [PINNED] if i < len(shapes) else [POLICIES[0], POLICIES[1], POLICIES[5]]:
            runs.append(scenario(f"fit{i}-{p['name']}", policies=[p], **sh))
    # several policies, batch sizes and replications in one run: a run's fixed cost apart from
    # each (policy, batch size, replication)'s
    runs += [scenario("multi-policies", batch=(1, 4), steps=8), scenario("multi-batches", batch=(1, 2, 4, 8), steps=8,
                                                                       policies=POLICIES[1:2]),
             scenario("multi-reps", batch=(2,), steps=8, reps=4, policies=POLICIES[1:4])]
    return runs


CHECKS = [  # 10 scenarios of different sizes: name, scenario dict
    ("tiny", scenario(batch=(1,), steps=8, policies=POLICIES[1:2])),
    ("locality_high-like", scenario(batch=(1, 4, 16, 64), steps=32)),
    ("mixtral", scenario(model={"preset": "mixtral-8x7b"}, batch=(1, 8, 32), steps=32)),
    ("long decode", scenario(batch=(16,), steps=300, policies=POLICIES[1:5])),
    ("big batch", scenario(batch=(512,), steps=16, policies=POLICIES[:4])),
    ("prefill", scenario(batch=(16,), steps=16, prefill=512, policies=POLICIES[1:4])),
    ("many experts", scenario(model={"num_experts": 4096, "top_k": 8}, batch=(32,), steps=32, policies=POLICIES[1:4])),
    ("deep", scenario(model={"num_layers": 96}, batch=(8,), steps=64, policies=POLICIES[1:5])),
    ("belady long", scenario(batch=(64,), steps=200, policies=POLICIES[5:7])),
    ("replications", scenario(batch=(4, 16), steps=32, reps=10, policies=POLICIES[1:4])),
]


def _features(sc, keys: list[str], what: str) -> np.ndarray:
    saved = dict(est_mod.COSTS)
    try:
        out = []
        for k in keys:
            for kk in saved:
                est_mod.COSTS[kk] = 0.0
            est_mod.COSTS[k] = 1.0
            e = est_mod.estimate_scenario(sc)
            out.append(e.seconds if what == "seconds" else e.bytes)
        return np.array(out)
    finally:
        est_mod.COSTS.update(saved)


def _run_and_write(sc) -> None:
    """What ``simmoe run`` does: simulate, then write the results."""
    from simulator.output import write_results
    from simulator.runner import run_scenario

    with tempfile.TemporaryDirectory() as d:
        write_results(run_scenario(sc), Path(d) / "out")


def _measure_run(doc: dict, repeats: int, memory: bool) -> tuple[float, float]:
    sc = parse_scenario(doc)
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        _run_and_write(sc)
        best = min(best, time.process_time() - t)
    peak = 0.0
    if memory:
        tracemalloc.start()
        _run_and_write(sc)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return best, peak


def direct() -> dict[str, float]:
    """Costs too small in the training runs to fit: a cache's slots, one huge step's operations."""
    from simulator.expert_cache import ExpertCache
    from simulator.policies import EVICTION_POLICIES
    from simulator.runner import build_trace, cost_model, simulate
    from simulator.profile import load_profile

    n = 1_000_000
    t = time.process_time()
    ExpertCache(EVICTION_POLICIES["lru"](n), n)
    secs = time.process_time() - t
    tracemalloc.start()
    cache = ExpertCache(EVICTION_POLICIES["lru"](n), n)
    slot_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del cache
    sc = parse_scenario(scenario(batch=(4096,), steps=1, policies=POLICIES[:1]))
    tr = build_trace(sc, 4096, 0, None)
    cost = cost_model(sc, load_profile(None), tr.max_step_tokens)
    tracemalloc.start()
    simulate(sc, sc.policies[0], tr, cost, seed=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    ops = est_mod._shape(sc, 4096).step_ops("per-item")
    from simulator.traces import generate

    B, P, E = 64, 256, 128              # one prefill step of 16,384 tokens: the draws dominate
    tracemalloc.start()
    generate(num_layers=2, num_experts=E, top_k=2, batch_size=B, steps=1, seed=0, prefill_tokens=P, zipf=0.5,
             temporal=0.3, batch_locality=0.5)
    gen_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # the sampler draws at most CHUNK keys at once: the peak is per drawn key of one chunk
    W = est_mod._Shape(L=2, E=E, k=2, B=B, steps=1, prefill=P).row_keys
    # the request stream ahead (int64 keys) and Belady's next-use positions built from it
    import types

    from simulator.policies.cache import Belady

    tracemalloc.start()
    keys = np.random.default_rng(0).integers(0, 1536, n).astype(np.int64)
    Belady(64).prepare(types.SimpleNamespace(request_keys=keys), None)
    future_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"sim_s_per_slot": secs / n, "bytes_per_slot": slot_bytes / n, "bytes_per_op": peak / ops,
            "bytes_per_draw": gen_peak / min(B * P * W, CHUNK), "bytes_per_future": future_bytes / n,
            "run_s_first": first_run()}


FIRST = r"""
import json, sys, time, tempfile
sys.path.insert(0, sys.argv[1])
from simulator.scenario import parse_scenario
from simulator.runner import run_scenario
from simulator.output import write_results
sc = parse_scenario(json.loads(sys.argv[2]))
times = []
with tempfile.TemporaryDirectory() as d:
    for i in range(3):
        t = time.process_time()
        write_results(run_scenario(sc), d + f'/o{i}')
        times.append(time.process_time() - t)
print(json.dumps(times))
"""


def first_run() -> float:
    """A process's first run costs more than its later ones (lazy imports, first-use caches):
    the median over fresh processes of (first run - the best later run) of a tiny scenario."""
    doc = json.dumps(scenario(batch=(1,), steps=4, policies=POLICIES[1:2]))
    extra = []
    for _ in range(5):
        r = subprocess.run([sys.executable, "-c", FIRST, str(ROOT), doc], capture_output=True, text=True, check=True)
        t = json.loads(r.stdout.strip().splitlines()[-1])
        extra.append(t[0] - min(t[1:]))
    return float(np.median(extra))


def _rest(measured: float, fixed: float) -> float | None:
    """What the fitted costs must explain; None when the direct costs explain most of it."""
    return measured - fixed if measured - fixed > 0.25 * measured else None


def _fixed(sc, fixed: dict[str, float], what: str) -> float:
    """The part of the estimate made by the directly measured costs."""
    return float(sum(fixed[k] * f for k, f in zip(fixed, _features(sc, list(fixed), what))))


def _solve(rows: list[np.ndarray], measured: list[float], keys: list[str]) -> dict[str, float]:
    keep = [i for i, m in enumerate(measured) if m is not None]      # runs the direct costs explain
    rows, measured = [rows[i] for i in keep], [measured[i] for i in keep]
    A = np.array([r / m for r, m in zip(rows, measured)])
    b = np.ones(len(measured))
    used = A.any(axis=0)
    x = np.zeros(len(keys))
    scale = np.abs(A[:, used]).max(axis=0)          # columns of one magnitude
    x[used] = lsq_linear(A[:, used] / scale, b, bounds=(0, np.inf), method="bvls").x / scale
    pred = np.array(rows) @ x
    ratio = pred / np.array(measured)
    print(f"  fit over {len(measured)} runs: estimate / measured from {ratio.min():.2f} to {ratio.max():.2f}, "
          f"median {np.median(ratio):.2f}", file=sys.stderr)
    return {k: float(v) for k, v, u in zip(keys, x, used) if u}


def fit(repeats: int) -> dict[str, float]:
    fixed = direct()
    print("measured directly: " + ", ".join(f"{k} {v:.3g}" for k, v in fixed.items()), file=sys.stderr)
    print("time of trace generation:", file=sys.stderr)
    fixed.update(fit_gen(repeats))
    # the training runs are warm repeats in this process: no first-run cost in them
    fixed_t = {k: v for k, v in fixed.items() if "_s_" in k and k != "run_s_first"}
    fixed_m = {k: v for k, v in fixed.items() if "_s_" not in k}
    runs = fit_runs()
    t_rows, m_rows, times, peaks = [], [], [], []
    for i, doc in enumerate(runs):
        sc = parse_scenario(doc)
        secs, peak = _measure_run(doc, repeats, memory=True)
        t_rows.append(_features(sc, TIME_KEYS, "seconds"))
        m_rows.append(_features(sc, MEM_KEYS, "bytes"))
        times.append(_rest(secs, _fixed(sc, fixed_t, "seconds")))
        peaks.append(_rest(peak, _fixed(sc, fixed_m, "bytes")))
        print(f"  [{i + 1}/{len(runs)}] {doc['name']}: {secs:.3f} s, {peak / 2**20:.1f} MiB", file=sys.stderr)
    costs = dict(fixed)
    print("time of simmoe run:", file=sys.stderr)
    costs.update(_solve(t_rows, times, TIME_KEYS))
    print("memory of simmoe run:", file=sys.stderr)
    costs.update(_solve(m_rows, peaks, MEM_KEYS))
    print("time of simmoe trace stats:", file=sys.stderr)
    costs.update(fit_stats(repeats))
    return costs


def fit_gen(repeats: int) -> dict[str, float]:
    """The synthetic sampler's costs, from generating traces alone (shapes on both of version
    3's paths: Gumbel keys when E <= 8 k, draws otherwise), knobs as the training scenarios'."""
    from simulator.traces import generate

    rows, times = [], []
    for L, E, k, B, steps, prefill in [(12, 128, 2, 16, 64, 0), (12, 16, 2, 16, 64, 0), (8, 8, 2, 32, 128, 0),
                                       (16, 256, 8, 64, 16, 0), (4, 1024, 8, 4, 64, 0), (12, 128, 2, 8, 4, 64),
                                       (24, 64, 6, 8, 32, 0), (6, 4096, 8, 32, 16, 0), (32, 8, 2, 1, 256, 0),
                                       (12, 128, 2, 256, 16, 0)]:
        kw = dict(num_layers=L, num_experts=E, top_k=k, batch_size=B, steps=steps, prefill_tokens=prefill, seed=0,
                  generator="mixed", zipf=0.6, batch_locality=0.5, temporal=0.3)
        best = float("inf")
        for _ in range(repeats):
            t = time.process_time()
            generate(**kw)
            best = min(best, time.process_time() - t)
        sh = est_mod._Shape(L=L, E=E, k=k, B=B, steps=steps, prefill=prefill, temporal=True, cross=False)
        saved = dict(est_mod.COSTS)
        feats = []
        for key in GEN_TIME_KEYS:
            for kk in saved:
                est_mod.COSTS[kk] = 0.0
            est_mod.COSTS[key] = 1.0
            feats.append(est_mod._trace_cost(sh, synthetic=True)[0])
        est_mod.COSTS.update(saved)
        rows.append(np.array(feats))
        times.append(best)
    return _solve(rows, times, GEN_TIME_KEYS)


def fit_stats(repeats: int) -> dict[str, float]:
    from simulator.traces import generate
    from simulator.traces.real import sequences_from_trace
    from simulator.traces.stats import trace_stats

    rows, times = [], []
    for L, E, k, B, steps, bs, lru in [(12, 128, 2, 16, 64, [1, 4, 16], 1), (12, 128, 2, 16, 64, [64], 16),
                                        (4, 512, 4, 8, 128, [1, 8], 1), (24, 64, 6, 32, 32, [1, 2, 4, 8, 16, 32, 64], 4),
                                        (8, 256, 8, 64, 16, [1, 16], 64), (16, 32, 2, 8, 256, [4], 1)]:
        ss = sequences_from_trace(generate(num_layers=L, num_experts=E, top_k=k, batch_size=B, steps=steps, seed=0))
        best = float("inf")
        for _ in range(repeats):
            t = time.process_time()
            trace_stats(ss, batch_sizes=bs, lru_batch=lru)
            best = min(best, time.process_time() - t)
        saved = dict(est_mod.COSTS)
        feats = []
        for key in STATS_TIME_KEYS:
            for kk in saved:
                est_mod.COSTS[kk] = 0.0
            est_mod.COSTS[key] = 1.0
            feats.append(est_mod.estimate_stats(tokens=ss.num_tokens, sequences=ss.num_sequences, num_layers=L,
                                                num_experts=E, top_k=k, batch_sizes=bs, lru_batch=lru).seconds
                         - est_mod.RUN_BASE_S - ss.num_sequences * 2e-6 * len(bs))
        est_mod.COSTS.update(saved)
        rows.append(np.array(feats))
        times.append(best)
    return _solve(rows, times, STATS_TIME_KEYS)


# ------------------------------------------------------------------------------ check
CHILD = r"""
import json, sys, time, tracemalloc, tempfile
sys.path.insert(0, sys.argv[1])
from simulator.scenario import parse_scenario
from simulator.runner import run_scenario
from simulator.output import write_results

def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

doc = json.loads(sys.argv[2])
sc = parse_scenario(doc)
before = rss('VmRSS:')
with tempfile.TemporaryDirectory() as d:
    t = time.process_time()
    res = run_scenario(sc)
    write_results(res, d + '/out')
    secs = time.process_time() - t
    hwm = rss('VmHWM:') - before
    del res
    tracemalloc.start()
    res = run_scenario(sc)
    write_results(res, d + '/out2')
    peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({'seconds': secs, 'rss': hwm, 'traced': peak}))
"""


def check() -> list[dict]:
    out = []
    for name, doc in CHECKS:
        sc = parse_scenario(doc)
        e = est_mod.estimate_scenario(sc)
        r = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), json.dumps(doc)], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{name}: {r.stderr}")
        m = json.loads(r.stdout.strip().splitlines()[-1])
        row = {"name": name, "size": e.size, "est_s": e.seconds, "est_b": e.bytes, **m}
        print(f"  {name}: est {e.seconds:.2f} s / {e.bytes / 2**20:.1f} MiB; measured {m['seconds']:.2f} s, "
              f"traced {m['traced'] / 2**20:.1f} MiB, RSS rise {m['rss'] / 2**20:.1f} MiB", file=sys.stderr)
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| scenario | size | est. time (s) | CPU time (s) | ratio | est. memory (MiB) | traced peak (MiB) | "
             "ratio | RSS rise (MiB) | ratio |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mb = 2 ** 20
        lines.append(f"| {r['name']} | {r['size']} | {r['est_s']:.2f} | {r['seconds']:.2f} | {r['est_s'] / r['seconds']:.2f} "
                     f"| {r['est_b'] / mb:.1f} | {r['traced'] / mb:.1f} | {r['est_b'] / r['traced']:.2f} "
                     f"| {r['rss'] / mb:.1f} | {r['est_b'] / max(1, r['rss']):.2f} |")
    t = np.array([r["est_s"] / r["seconds"] for r in rows])
    m = np.array([r["est_b"] / r["traced"] for r in rows])
    lines.append("")
    lines.append(f"Time ratio {t.min():.2f}-{t.max():.2f} (median {np.median(t):.2f}); traced-memory ratio "
                 f"{m.min():.2f}-{m.max():.2f} (median {np.median(m):.2f}); within 2x: "
                 f"{int(((t >= 0.5) & (t <= 2)).sum())}/{len(t)} for time, {int(((m >= 0.5) & (m <= 2)).sum())}/{len(m)} for memory.")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fit", action="store_true", help="measure the costs and print a fresh COSTS table")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per training run (best is kept)")
    ap.add_argument("--apply", action="store_true", help="with --fit: use the fitted costs for the check that follows")
    args = ap.parse_args()
    if args.fit:
        costs = fit(args.repeats)
        print("# fitted by: python bench/bench_estimate.py --fit --repeats", args.repeats)
        for k, v in costs.items():
            print(f'    "{k}": {v:.3g},')
        if not args.apply:
            return
        est_mod.COSTS.update(costs)
    print(f"Command: python bench/bench_estimate.py  \nMachine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    print(table(check()))


if __name__ == "__main__":
    main()
