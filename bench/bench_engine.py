"""Engine throughput, side by side with a baseline checkout, in one run.

Each measurement runs in a fresh child process pinned to one core and reports the process's
CPU time (not wall time: the machine is shared), the routed requests it simulated and the SimPy
events it scheduled. With ``--baseline DIR`` (a checkout of an older simmoe, e.g.
``git worktree add /tmp/simmoe-base 25d15fe``) every workload also runs on that code, the two
interleaved round by round so that drift hits both alike; the speed-up is the median of the
per-round ratios.

Workloads (the engine-speed issue's targets):

- ``mixtral-b16``: Mixtral-8x7B decode, batch 16, 1000 steps (zipf 0.5, temporal 0.3):
  dedup + a 96-expert LRU + oracle next-layer prefetch; the same deduplicated request stream
  also goes through libcachesim's LRU in a Python loop, for the ratio.
- ``v3-b64`` / ``v3-b256``: a DeepSeek-V3-sized model (58 MoE layers x 256 experts, top-8),
  dedup + LRU (a quarter of all experts) + oracle prefetch.
- ``per-item-pageable-b16``: Mixtral, per-item loads from pageable memory (the published
  baseline; every copy blocks the host).

``--linearity`` adds the cost of the fast engine from 100 to 10,000 steps; ``--study``
extrapolates the DeepSeek-V3 study (six policies, B 1-256, three replications, 256 steps) from
measured 8-step slices of every (policy, batch size).

    python bench/bench_engine.py --baseline /tmp/simmoe-base --repeats 3 --linearity --study

``--branch LABEL=DIR`` (repeatable) runs another checkout beside the new code in the workload
rounds (e.g. the previous engine pass), with the new code's speed-up over it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

V3 = dict(name="deepseek-v3-sized", num_layers=58, num_experts=256, top_k=8, hidden=2048, ffn=1408,
          dtype="bf16", source="DeepSeek-V3 routing dimensions; expert shape of a shipped profile")
STUDY_POLICIES = {
    "per-item-pageable": dict(load="per-item", memory="pageable"),
    "dedup": dict(load="dedup"),
    "dedup-lru": dict(load="dedup", cache={"kind": "lru", "capacity": 3712}),
    "dedup-lru-oracle": dict(load="dedup", cache={"kind": "lru", "capacity": 3712}, prefetch={"kind": "oracle"}),
    "coalesced-lru-predicted": dict(load="coalesced", cache={"kind": "lru", "capacity": 3712},
                                    prefetch={"kind": "predicted", "accuracy": 0.8}),
    "dedup-lfu-cpu-miss": dict(load="dedup", cache={"kind": "lfu", "capacity": 3712}, miss="cpu"),
}
STUDY_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def workload(name: str, steps: int | None):
    """(model, trace kwargs, policy kwargs)."""
    from simulator.models import PRESETS, ModelSpec

    mixtral = PRESETS["mixtral-8x7b"]
    mix_trace = dict(generator="mixed", zipf=0.5, temporal=0.3)
    if name == "mixtral-b16":
        return mixtral, dict(batch_size=16, steps=steps or 1000, **mix_trace), dict(
            load="dedup", cache={"kind": "lru", "capacity": 96}, prefetch={"kind": "oracle"})
    if name == "per-item-pageable-b16":
        return mixtral, dict(batch_size=16, steps=steps or 200, **mix_trace), dict(load="per-item", memory="pageable")
    if name.startswith("v3-b"):
        b = int(name[4:])
        return ModelSpec(**V3), dict(batch_size=b, steps=steps or max(8, 2048 // b), **mix_trace), STUDY_POLICIES[
            "dedup-lru-oracle"]
    if name.startswith("study:"):
        _, pol, b = name.split(":")
        return ModelSpec(**V3), dict(batch_size=int(b), steps=steps or 8, **mix_trace), STUDY_POLICIES[pol]
    raise SystemExit(f"unknown workload {name}")


def child(name: str, steps: int | None, with_lcs: bool) -> dict:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    from simulator.engine import Engine
    from simulator.planner import Planner, RequestStream
    from simulator.profile import CostModel, load_profile
    from simulator.scenario import PolicySpec
    from simulator.traces import generate

    m, tkw, pkw = workload(name, steps)
    c0 = time.process_time()
    trace = generate(num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k, seed=0, **tkw)
    c1 = time.process_time()
    prof = load_profile("h100-pcie5")
    cost = CostModel(prof, m.shape_key, m.expert_bytes, m.activation_bytes_per_token, trace.max_step_tokens)
    policy = PolicySpec(name="p", **pkw)
    c2 = time.process_time()
    planner = Planner(m, policy, trace, seed=0)
    engine = Engine(cost, policy.memory, 0.2)
    recs = engine.run(planner)
    c3 = time.process_time()
    out = {"workload": name, "gen_cpu_s": c1 - c0, "sim_cpu_s": c3 - c2, "routed": trace.num_requests,
           "steps": trace.num_steps, "events": next(engine.env._eid),
           "latency_sum_ms": sum(r.latency_ms for r in recs)}
    if with_lcs:
        import libcachesim as lcs

        keys = RequestStream(trace, m, planner.load).keys.tolist()
        cap = pkw["cache"]["capacity"]
        c4 = time.process_time()
        cache = lcs.LRU(cache_size=cap)
        for i, k in enumerate(keys):
            r = lcs.Request()
            r.obj_id, r.obj_size, r.clock_time = k, 1, i
            cache.get(r)
        out["lcs_cpu_s"] = time.process_time() - c4
        out["cache_requests"] = len(keys)
    return out


def spawn(tree: Path, name: str, steps: int | None = None, with_lcs: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0")
    cmd = [sys.executable, str(REPO / "bench" / "bench_engine.py"), "--child", name]
    if steps:
        cmd += ["--steps", str(steps)]
    if with_lcs:
        cmd.append("--lcs")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(tree))
    if res.returncode:
        raise SystemExit(f"child {name} in {tree} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def med(xs):
    return statistics.median(xs)


def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, help="checkout of the simmoe to compare with")
    ap.add_argument("--branch", action="append", default=[], metavar="LABEL=DIR",
                    help="another checkout to run beside in the workload rounds (repeatable)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workloads", default="mixtral-b16,v3-b64,v3-b256,per-item-pageable-b16")
    ap.add_argument("--linearity", action="store_true")
    ap.add_argument("--study", action="store_true")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--lcs", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.lcs)))
        return
    trees = {"new": REPO} | ({"base": args.baseline.resolve()} if args.baseline else {})
    for b in args.branch:
        label, _, tree = b.partition("=")
        if not tree or label in trees:
            raise SystemExit(f"--branch {b}: give LABEL=DIR with a new label")
        trees[label] = Path(tree).resolve()
    t_start = time.time()
    report: dict = {"python": platform.python_version(), "machine": platform.machine(), "repeats": args.repeats,
                    "trees": {k: str(v) for k, v in trees.items()}, "load_start": load_avg(), "workloads": {}}
    print(f"# engine benchmark: {args.repeats} rounds, CPU time of one pinned process per run; "
          f"load average {report['load_start']} at the start")
    print("| workload | routed requests | code | routed req/s (median) | SimPy events / routed req | "
          "trace gen s | speed-up (median of rounds) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for w in args.workloads.split(","):
        runs: dict[str, list[dict]] = {k: [] for k in trees}
        for _ in range(args.repeats):
            for k, tree in trees.items():
                runs[k].append(spawn(tree, w, with_lcs=(w == "mixtral-b16" and k == "new")))
        rate = {k: [r["routed"] / r["sim_cpu_s"] for r in v] for k, v in runs.items()}
        entry = {"routed": runs["new"][0]["routed"]}
        for k, v in runs.items():
            r0 = v[0]
            entry[k] = {"routed_req_per_s": med(rate[k]), "events_per_routed": r0["events"] / r0["routed"],
                        "gen_cpu_s": med([r["gen_cpu_s"] for r in v]), "runs": v}
            sp = ""
            if k != "new":                  # the new code's speed-up over this one, round by round
                entry[k]["new_speedup_median"] = med([a / b for a, b in zip(rate["new"], rate[k])])
                sp = f"**{entry[k]['new_speedup_median']:.2f}x** (new over {k})"
            print(f"| {w} | {r0['routed']:,} | {k} | {med(rate[k]):,.0f} | {r0['events'] / r0['routed']:.3f} | "
                  f"{entry[k]['gen_cpu_s']:.2f} | {sp} |")
        if w == "mixtral-b16":
            lcs = [r["cache_requests"] / r["lcs_cpu_s"] for r in runs["new"]]
            ours = [r["cache_requests"] / r["sim_cpu_s"] for r in runs["new"]]
            entry["libcachesim_cache_req_per_s"] = med(lcs)
            entry["simmoe_cache_req_per_s"] = med(ours)
            entry["ratio_to_libcachesim"] = med([a / b for a, b in zip(ours, lcs)])
        report["workloads"][w] = entry
    if "mixtral-b16" in report["workloads"]:
        e = report["workloads"]["mixtral-b16"]
        print(f"\nmixtral-b16: simmoe {e['simmoe_cache_req_per_s']:,.0f} cache req/s (all timing) vs libcachesim "
              f"LRU in a Python loop {e['libcachesim_cache_req_per_s']:,.0f} (decisions only): "
              f"ratio {e['ratio_to_libcachesim']:.2f}")
    if args.linearity:
        print("\n| steps | routed requests | CPU s (median) | routed req/s | per step (ms) |")
        print("|---:|---:|---:|---:|---:|")
        lin = []
        for steps in (100, 1000, 10000):
            rs = [spawn(REPO, "mixtral-b16", steps=steps) for _ in range(args.repeats)]
            cpu = med([r["sim_cpu_s"] for r in rs])
            lin.append({"steps": steps, "routed": rs[0]["routed"], "sim_cpu_s": cpu})
            print(f"| {steps:,} | {rs[0]['routed']:,} | {cpu:.3f} | {rs[0]['routed'] / cpu:,.0f} | "
                  f"{cpu / steps * 1e3:.3f} |")
        report["linearity"] = lin
    if args.study:
        report["study"] = study({k: v for k, v in trees.items() if k in ("new", "base")})
    report["load_end"] = load_avg()
    report["wall_s"] = time.time() - t_start
    print(f"\nload average {report['load_start']} at the start, {report['load_end']} at the end; "
          f"{report['wall_s'] / 60:.1f} minutes wall")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


def study(trees: dict) -> dict:
    """Extrapolate the DeepSeek-V3 study from measured 8-step slices: CPU per step of every
    (policy, batch size) x 256 steps x 3 replications, plus trace generation (measured once per
    (batch size, replication), shared by the policies)."""
    out = {}
    for k, tree in trees.items():
        by_policy = dict.fromkeys(STUDY_POLICIES, 0.0)
        total_gen = 0.0
        for b in STUDY_BATCHES:
            gen = None
            for pol in STUDY_POLICIES:
                r = spawn(tree, f"study:{pol}:{b}", steps=8)
                by_policy[pol] += r["sim_cpu_s"] / r["steps"] * 256 * 3
                gen = r["gen_cpu_s"] / r["steps"] * 256 * 3 if gen is None else gen
            total_gen += gen
        total_sim = sum(by_policy.values())
        out[k] = {"sim_cpu_min": total_sim / 60, "gen_cpu_min": total_gen / 60,
                  "total_cpu_min": (total_sim + total_gen) / 60,
                  "policy_cpu_min": {p: v / 60 for p, v in by_policy.items()}}
        shares = ", ".join(f"{p} {v / 60:.1f} ({v / total_sim:.0%})" for p, v in by_policy.items())
        print(f"\nDeepSeek-V3 study ({k}): {out[k]['total_cpu_min']:.1f} CPU-minutes "
              f"(simulation {out[k]['sim_cpu_min']:.1f}, trace generation {out[k]['gen_cpu_min']:.1f}); "
              f"by policy: {shares}")
    if "base" in out:
        print(f"study: new / baseline = {out['base']['total_cpu_min'] / out['new']['total_cpu_min']:.1f}x less CPU")
    return out


if __name__ == "__main__":
    main()
