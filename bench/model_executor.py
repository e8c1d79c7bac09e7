"""The real model with its experts offloaded, run live: step latency and decisions per policy.

Builds a preset's transformers model (random weights) on the device, records its own routing
for each batch size with every expert resident, copies the routed experts to host memory once
(pinned and/or pageable, as the policies need), then runs each (policy, batch) through
calibrate.executors.model.ModelExecutor and reports the median step latency (first step left
out), tokens/s, copies, bytes, the achieved copy rate and whether the router agreed with the
recorded trace at every layer. The decisions are checked against the simulator's planner.
``simmoe validate --executor model`` runs the same rows (calibrate.validation.model_rows) from
a scenario and projects them.

    python bench/model_executor.py --model olmoe-1b-7b --batch 1,4,16 --steps 12 --out run.json
    python bench/model_executor.py --model olmoe-1b-7b --tiny --device cpu --steps 3   # CPU smoke

Policies (--policy, repeat; default all): resident (every expert cached, preloaded: the engine
alone), layer (every expert of a layer copied each forward: accelerate's offload), dedup (no
cache), lru (--capacity experts), lru-prefetch (oracle next-layer prefetch), cpu-miss (lru,
misses on the host CPU).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from calibrate.executors.model import record_routing
from calibrate.models.build import build_model
from calibrate.validation.model_rows import host_pools, live_summary, model_policies, run_live


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
    ap.add_argument("--prompt", type=int, default=4, help="prompt tokens before the decode steps (the context)")
    ap.add_argument("--out")
    ap.add_argument("--save-traces", help="write every batch's recorded routing here (.npz: b<B> arrays)")
    a = ap.parse_args()
    batches = [int(x) for x in a.batch.split(",")]
    t0 = time.perf_counter()
    built = build_model(a.model, tiny=a.tiny, layers=a.layers, device=a.device)
    E, L = built.spec.num_experts, built.spec.num_layers
    pols = model_policies(E, L, a.capacity or max(2, E * L // 4), a.memory)
    chosen = a.policy or list(pols)
    traces = {b: record_routing(built, batch=b, steps=a.steps, prompt_tokens=a.prompt, device=a.device)
              for b in batches}
    if a.save_traces:
        import numpy as np

        np.savez_compressed(a.save_traces, **{f"b{b}": tr.experts for b, tr in traces.items()})
    hosts = host_pools(built, [pols[n] for n in chosen], a.device)
    print(f"built {built.spec.name} ({len(built.decoder_layers)} layers, {L} MoE) and host experts "
          f"in {time.perf_counter() - t0:.1f}s")
    rows = []
    for name in chosen:
        pol = pols[name]
        for b in batches:
            steps, same = run_live(built, pol, traces[b], device=a.device, host=hosts[pol.memory], prompt=a.prompt)
            s = live_summary(steps, b)
            row = {"policy": name, "batch": b, "prompt": a.prompt, "step_ms": s["live_median_ms"],
                   "steps_ms": s["live_steps_ms"], "tokens_per_s": s["live_tokens_per_s"],
                   "copies_per_step": s["copies_per_step"], "GB_per_step": s["GB_per_step"],
                   "copy_GBps": s["copy_GBps"], "decisions_identical": same,
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
