"""Probe: why does a validation row's copy issue cost more than calibration's probe reads?

In every validation run the rows' ``_load`` calls (pinned: ``wait_event`` on the slot's last
reader, then ``copy_(non_blocking=True)``) took 1.2-1.7x the host time calibration's and the
host-now probe's did (docs/validation.md). The probe is a cache-and-prefetch run at B=1 and 4;
a dedup row issues all of a layer's copies right after the host waited for the router's choice.
This probe times every ``_load`` call of the probe and of the study's pinned rows, interleaved
in rounds, split by where the call sits (the first load after the route sync, a later demand
load, a prefetch load) and into its two parts (the ``wait_event`` calls, the ``copy_`` calls).

    python bench/probe_copy_issue.py --rounds 3 --out probe-copy-issue.json      (needs a CUDA GPU)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

import calibrate.executors.twin as live
from calibrate.measurements.executor_costs import _probe_model, probe_steps
from calibrate.executors.twin import LiveExecutor, host_experts
from simulator.atomic import write_text
from simulator.planner import LOAD
from simulator.runner import build_trace, derive_seed
from simulator.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
REC: dict = defaultdict(list)      # (variant, position, part) -> host us per call
STATE = {"variant": None, "after_route": False, "prefetch": False}


def _load(self, slots, keys, nbytes, timings):
    """LiveExecutor._load for pinned copies, timed in its two parts."""
    clock = time.perf_counter
    a = clock()
    with torch.cuda.stream(self.copy):
        for sl in slots:
            ev = self.last_read.get(sl)
            if ev is not None:
                self.copy.wait_event(ev)
        b = clock()
        for sl, k in zip(slots, keys):
            self.pool[sl].copy_(self.host[k % self.n_host], non_blocking=True)
        done = torch.cuda.Event(enable_timing=False)
        done.record(self.copy)
    for sl in slots:
        self.last_load[sl] = done
    c = clock()
    pos = "prefetch" if STATE["prefetch"] else "first after route" if STATE["after_route"] else "later demand"
    STATE["after_route"] = False
    v = STATE["variant"]
    if v is None:                    # an executor's warm-up copies
        return
    REC[(v, pos, "wait_event")].append((b - a) * 1e6)
    REC[(v, pos, "copy_+record")].append((c - b) * 1e6)
    REC[(v, pos, "call")].append((c - a) * 1e6)


def _route(self):
    _route_orig(self)
    STATE["after_route"] = True


def run_step(self, s):
    """Mark prefetch LOADs (op[4]) for ``_load`` by wrapping the planner's plan."""
    plan = self.planner.plan_step

    def marked(step):
        layers, dec = plan(step)
        out = []
        for ops in layers:
            new = []
            for op in ops:
                if op[0] == LOAD:
                    new.append(("__mark__", "__mark__", bool(op[4])))
                new.append(op)
            out.append(new)
        return out, dec
    self.planner.plan_step = marked
    try:
        return _run_step_orig(self, s)
    finally:
        self.planner.plan_step = plan


_route_orig, _run_step_orig = LiveExecutor._route, LiveExecutor.run_step


def _cpu_or_mark(self, key, tokens, dense_ev):
    if key == "__mark__":            # run_step's dispatch sends unknown ops to _cpu: a marker
        STATE["prefetch"] = tokens
        return None
    return _cpu_orig(self, key, tokens, dense_ev)


_cpu_orig = LiveExecutor._cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenario", default="scenarios/validate_study.yaml")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    LiveExecutor._load, LiveExecutor._route, LiveExecutor.run_step = _load, _route, run_step
    LiveExecutor._cpu = _cpu_or_mark
    sc, _ = load_scenario(ROOT / a.scenario)
    host = host_experts(sc.model, True, seed=sc.seed)
    pols = [p for p in sc.policies if p.memory == "pinned" and p.miss.kind != "cpu"]
    device = torch.device("cuda")
    for r in range(a.rounds):
        STATE["variant"] = "host-now probe"
        probe_steps(device, _probe_model(sc.model), "pinned", host, 4)
        for b in [int(x) for x in a.batches.split(",")]:
            trace = build_trace(sc, b, 0, ROOT / "scenarios")
            for pol in pols:
                STATE.update(variant=None, prefetch=False, after_route=False)
                ex = LiveExecutor(sc.model, pol, trace, device="cuda", dense_ms=sc.dense_ms,
                                  seed=derive_seed(sc.seed, 0, b, 7), host=host, measure_copies=False)
                ex.warm_up()
                STATE["variant"] = f"{pol.name} B={b}"
                ex.run(range(min(4, trace.num_steps)))
                del ex
                torch.cuda.empty_cache()
        print(f"round {r} done", flush=True)
    out = {}
    for (v, pos, part), xs in sorted(REC.items()):
        out.setdefault(v, {}).setdefault(pos, {})[part] = {"n": len(xs), "median_us": statistics.median(xs)}
    for v, d in out.items():
        print(v + ": " + "; ".join(f"{pos} n={p['call']['n']} call {p['call']['median_us']:.1f} "
                                   f"(wait {p['wait_event']['median_us']:.1f}, copy {p['copy_+record']['median_us']:.1f})"
                                   for pos, p in d.items()), flush=True)
    if a.out:
        write_text(a.out, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
