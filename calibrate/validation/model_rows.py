"""Real model vs projection, row by row: the live rows of ``bench/model_executor.py`` (the
transformers model with its experts offloaded, on the GPU) against the simulator on the very
routing those rows ran (the recorded traces), with the same policy objects.

Torch-free: the projection runs anywhere, from the files a GPU run brought back::

    python -m calibrate.validation.model_rows live-olmoe.json traces-olmoe.npz --profile h200

Error % = (projected - live) / live, of the median step latency over the steps after the first
(the same steps on both sides).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from simulator.models import PRESETS
from simulator.profile import load_profile
from simulator.runner import cost_model, simulate
from simulator.scenario import PolicySpec, parse_scenario
from simulator.traces import Trace


def model_policies(E: int, L: int, capacity: int, memory: str) -> dict[str, PolicySpec]:
    """The policies a real-model run compares (``bench/model_executor.py --policy``)."""
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


def decode_trace(experts: np.ndarray, batch: int, num_experts: int) -> Trace:
    steps = len(experts) // batch
    return Trace(experts=experts, step_offsets=np.arange(steps + 1, dtype=np.int64) * batch,
                 seq=np.tile(np.arange(batch, dtype=np.int32), steps), phase=np.zeros(steps, np.uint8),
                 num_experts=num_experts).validate("recorded trace")


def compare(live: dict, traces: dict[int, np.ndarray], profile: str, style: str = "hf-eager",
            capacity: int | None = None, memory: str = "pinned") -> list[dict]:
    m = PRESETS[live["model"]]
    E, L = m.num_experts, m.num_layers
    pols = model_policies(E, L, capacity or max(2, E * L // 4), memory)
    prof = load_profile(profile)
    rows = []
    for r in live["rows"]:
        b, prompt = r["batch"], r.get("prompt", 4)
        tr = decode_trace(traces[b], b, E)
        sc = parse_scenario({"name": "model-rows", "model": live["model"], "profile": profile, "replications": 1,
                             "batch_sizes": [b], "trace": {"generator": "uniform", "steps": tr.num_steps,
                                                           "prompt_tokens": prompt},
                             "engine": {"style": style}, "policies": [pols[r["policy"]].model_dump()]})
        cost = cost_model(sc, prof, tr.max_step_tokens)
        df = simulate(sc, pols[r["policy"]], tr, cost, seed=0)
        sim = statistics.median(df["latency_ms"].to_numpy()[1:])
        rows.append({"policy": r["policy"], "batch": b, "prompt": prompt, "live_ms": r["step_ms"], "sim_ms": sim,
                     "error_pct": (sim - r["step_ms"]) / r["step_ms"] * 100,
                     "decisions_identical": r["decisions_identical"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("live", type=Path)
    ap.add_argument("traces", type=Path)
    ap.add_argument("--profile", default="h200")
    ap.add_argument("--style", default="hf-eager")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    live = json.loads(a.live.read_text())
    with np.load(a.traces, allow_pickle=False) as z:
        traces = {int(k[1:]): z[k] for k in z.files}
    rows = compare(live, traces, a.profile, a.style)
    print(f"{live['model']} on {live.get('gpu', '?')}, profile {a.profile}, style {a.style}")
    print(f"{'policy':13s} {'batch':>5s} {'live ms':>9s} {'sim ms':>9s} {'error':>8s}  decisions")
    for r in rows:
        print(f"{r['policy']:13s} {r['batch']:5d} {r['live_ms']:9.2f} {r['sim_ms']:9.2f} {r['error_pct']:+7.1f}%  "
              f"{'identical' if r['decisions_identical'] else 'DIFFER'}")
    errs = np.abs([r["error_pct"] for r in rows])
    print(f"median |error| {np.median(errs):.1f}%, worst {errs.max():.1f}% over {len(rows)} rows")
    if a.json:
        a.json.write_text(json.dumps({"live": live, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
