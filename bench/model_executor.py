"""The real model with its experts offloaded, run live: step latency and decisions per policy.

Builds a preset's transformers model (random weights) on the device, records its own routing
for each batch size with every expert resident, copies the routed experts to host memory once
(pinned and/or pageable, as the policies need), then runs each (policy, batch) through
calibrate.executors.model.ModelExecutor and reports the median step latency (first step left
out), tokens/s, copies, bytes, the achieved copy rate and whether the router agreed with the
recorded trace at every layer. The decisions are checked against the simulator's planner.

    python bench/model_executor.py --model olmoe-1b-7b --batch 1,4,16 --steps 12 --out run.json
    python bench/model_executor.py --model olmoe-1b-7b --tiny --device cpu --steps 3   # CPU smoke

Policies (--policy, repeat; default all): resident (every expert cached, preloaded: the engine
alone), layer (every expert of a layer copied each forward: accelerate's offload), dedup (no
cache), lru (--capacity experts), lru-prefetch (oracle next-layer prefetch), cpu-miss (lru,
misses on the host CPU).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

from calibrate.executors.model import ModelExecutor, host_experts, record_routing
from calibrate.models.build import build_model
from simulator.planner import Planner
from simulator.policies import LOAD_MODES
from simulator.policies.load import Layer
from simulator.scenario import PolicySpec

COUNTED = ("transfers", "copies", "bytes_h2d", "cpu_computes")


def policies(E: int, L: int, capacity: int, memory: str) -> dict[str, PolicySpec]:
    lru = {"kind": "lru", "capacity": capacity}
    return {
        "resident": PolicySpec(name="resident", load="dedup", memory=memory,
                               cache={"kind": "static-hot", "capacity": E * L + 1, "staging": 1}),
        "layer": PolicySpec(name="layer", load="layer", memory=memory, cache={"kind": "none", "capacity": E}),
        "dedup": PolicySpec(name="dedup", load="dedup", memory=memory),
        "lru": PolicySpec(name="lru", load="dedup", memory=memory, cache=lru),
        "lru-prefetch": PolicySpec(name="lru-prefetch", load="dedup", memory=memory, cache=lru,
                                   prefetch={"kind": "oracle"}),
        "cpu-miss": PolicySpec(name="cpu-miss", load="dedup", memory=memory, cache=lru, miss="cpu"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="olmoe-1b-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", default="1,4,16")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--policy", action="append")
    ap.add_argument("--capacity", type=int, help="LRU capacity in experts [default: a quarter of all]")
    ap.add_argument("--memory", default="pinned", choices=["pinned", "pageable"])
    ap.add_argument("--layers", type=int)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    batches = [int(x) for x in a.batch.split(",")]
    t0 = time.perf_counter()
    built = build_model(a.model, tiny=a.tiny, layers=a.layers, device=a.device)
    E, L = built.spec.num_experts, built.spec.num_layers
    LOAD_MODES["layer"] = functools.partial(Layer, num_experts=E)  # until the planner passes num_experts
    pols = policies(E, L, a.capacity or max(2, E * L // 4), a.memory)
    chosen = a.policy or list(pols)
    traces = {b: record_routing(built, batch=b, steps=a.steps, device=a.device) for b in batches}
    host = host_experts(built, pinned=a.memory == "pinned" and a.device.startswith("cuda"))
    print(f"built {built.spec.name} ({len(built.decoder_layers)} layers, {L} MoE) and host experts "
          f"in {time.perf_counter() - t0:.1f}s")
    rows = []
    for name in chosen:
        pol = pols[name]
        for b in batches:
            tr = traces[b]
            ex = ModelExecutor(built, pol, tr, device=a.device, host=host)
            sim = Planner(built.spec, pol, tr)
            steps = []
            same = True
            for s in range(tr.num_steps):
                st, _ = ex.run_step(s)
                want = sim.plan_step(s)[1].as_dict()
                same &= all(st.executed[c] == want[c] for c in COUNTED)
                steps.append(st)
            timed = steps[1:] or steps
            lat = statistics.median(st.latency_ms for st in timed)
            moved = sum(st.executed["bytes_h2d"] for st in timed)
            row = {"policy": name, "batch": b, "step_ms": lat, "tokens_per_s": b / lat * 1e3,
                   "copies_per_step": statistics.mean(st.executed["copies"] for st in timed),
                   "GB_per_step": moved / len(timed) / 1e9,
                   "copy_GBps": moved / 1e9 / (sum(st.latency_ms for st in timed) / 1e3),
                   "decisions_identical": same,
                   "router_agrees": all(st.executed["router_agrees"] == L for st in steps)}
            rows.append(row)
            print(json.dumps(row))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": a.model, "tiny": a.tiny, "device": a.device, "steps": a.steps,
                       "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else "none",
                       "command": "python bench/model_executor.py " + " ".join(
                           f"--{k} {v}" for k, v in vars(a).items() if v not in (None, False)),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
