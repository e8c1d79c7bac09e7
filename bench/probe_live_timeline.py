"""Probe: where does a live copy-bound step lose time against its projection?

On the H200 the lru-prefetch row of OLMoE at B=64 ran 8-10% slower than projected in every
run (docs/validation.md), and slower than dedup, where the projection has the prefetch win
~8% (the copy stream kept busy across layers). This probe runs OLMoE (full width, the first
``--layers`` decoder layers) through the real-model executor at one batch for dedup and
lru-prefetch (an LRU cache of 4 layers' experts, as the validation's 256 slots are of 16
layers), times their steps, then profiles two steps of each with torch.profiler (CUPTI: the
GPU's own timestamps) and reports per row:

- the live and the projected median step;
- per stream: busy ms per step; for the copy stream its gaps (idle between two copies),
  the copies' median GB/s each, and how many copies ran beside a kernel;
- the chrome trace of the profiled steps (``--out``/ROW.trace.json.gz, open in Perfetto).

    python bench/probe_live_timeline.py --out DIR [--batch 64] [--layers 6] [--style offload-grouped] [--upload-order]
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

import torch

from calibrate.executors.model import ModelExecutor, host_experts, record_routing
from calibrate.measurements.engine import EXECUTOR_STYLES
from calibrate.models.build import build_model
from calibrate.validation.live_timeline import live_events, overtaken_uploads
from calibrate.validation.model_rows import project, row_scenario
from simulator.errors import InputError
from simulator.profile import load_profile
from simulator.scenario import PolicySpec


def policies(E: int, upload_order: bool) -> dict[str, tuple[PolicySpec, bool]]:
    """name -> (policy, whether the grouped call uploads its indices before its wait). With
    ``upload_order`` LRU and LRU + prefetch also run with the executor's old order (the
    upload after the wait: ``-upload-after``)."""
    cap = 4 * E   # 4 layers' experts (the validation's 256 slots of OLMoE's 16 x 64)
    lru = {"name": "lru", "load": "dedup", "cache": {"kind": "lru", "capacity": cap}}
    rows = {"dedup": (PolicySpec.model_validate({"name": "dedup", "load": "dedup"}), True)}
    if upload_order:
        rows["lru"] = (PolicySpec.model_validate(lru), True)
    rows["lru-prefetch"] = (PolicySpec.model_validate({**lru, "name": "lru-prefetch", "prefetch": {"kind": "oracle"}}), True)
    if upload_order:
        rows["lru-prefetch-upload-after"] = (rows["lru-prefetch"][0], False)
    return rows


def gpu_events(trace_path: Path) -> list[dict]:
    doc = json.loads(trace_path.read_text())
    out = []
    for ev in doc.get("traceEvents", []):
        cat = ev.get("cat", "")
        if cat in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in ev:
            a = ev.get("args", {})
            out.append({"cat": cat, "name": ev.get("name", ""), "ts": float(ev["ts"]), "dur": float(ev["dur"]),
                        "stream": a.get("stream"), "bytes": a.get("bytes"), "corr": a.get("correlation")})
    return sorted(out, key=lambda e: e["ts"])


def launches(trace_path: Path) -> dict:
    """correlation id -> (host ts of the runtime call that launched it, its name)."""
    doc = json.loads(trace_path.read_text())
    return {ev["args"]["correlation"]: (float(ev["ts"]), ev.get("name", ""))
            for ev in doc.get("traceEvents", [])
            if ev.get("cat") == "cuda_runtime" and "correlation" in ev.get("args", {})}


def gap_detail(evs: list[dict], launched: dict, copy_stream, min_us: float = 300.0) -> list[dict]:
    """Each gap on the copy stream over ``min_us``: the copy's number after the gap (64 per
    layer in these rows), whether the host launched it late (launch after the previous copy
    ended) or the GPU held it (launched early, started late: a wait on an event), and the
    host calls launched during the gap (what the host was doing)."""
    cs = [e for e in evs if e["cat"] == "gpu_memcpy" and e["stream"] == copy_stream]
    calls = sorted(launched.values())
    out = []
    for i, (a, b) in enumerate(zip(cs, cs[1:])):
        gap = b["ts"] - (a["ts"] + a["dur"])
        if gap < min_us:
            continue
        lt = launched.get(b["corr"], (None, ""))[0]
        end = a["ts"] + a["dur"]
        during = [n for t, n in calls if end <= t < b["ts"]]
        names: dict = {}
        for n in during:
            names[n] = names.get(n, 0) + 1
        out.append({"copy": i + 1, "gap_us": gap, "launch_after_prev_end_us": None if lt is None else lt - end,
                    "start_after_launch_us": None if lt is None else b["ts"] - lt,
                    "host_calls_in_gap": dict(sorted(names.items(), key=lambda kv: -kv[1])[:8])})
    return out


def summarise(evs: list[dict], steps: int) -> dict:
    """Per stream busy us per step; the big copies' stream: gaps and GB/s."""
    by_stream: dict = {}
    for e in evs:
        by_stream.setdefault(e["stream"], []).append(e)
    big = [e for e in evs if e["cat"] == "gpu_memcpy" and (e["bytes"] or 0) > 1 << 20]
    copy_stream = statistics.mode([e["stream"] for e in big]) if big else None
    res = {"streams": {str(s): {"events": len(v), "busy_ms_per_step": sum(e["dur"] for e in v) / 1e3 / steps,
                                "kinds": sorted({e["cat"] for e in v})} for s, v in by_stream.items()}}
    if copy_stream is None:
        return res
    cs = [e for e in by_stream[copy_stream] if e["cat"] == "gpu_memcpy"]
    gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(cs, cs[1:])]
    kernels = [e for e in evs if e["cat"] == "kernel"]
    kernel_spans = [(k["ts"], k["ts"] + k["dur"]) for k in kernels]

    def beside_kernel(c) -> bool:
        a, b = c["ts"], c["ts"] + c["dur"]
        return any(s < b and e > a for s, e in kernel_spans)
    gbps = [e["bytes"] / (e["dur"] * 1e3) for e in cs if e["bytes"] and e["dur"] > 0]
    small_h2d = [e for e in evs if e["cat"] == "gpu_memcpy" and e["stream"] != copy_stream]
    res.update(copy_stream=copy_stream, copies=len(cs), copies_per_step=len(cs) / steps,
               copy_busy_ms_per_step=sum(e["dur"] for e in cs) / 1e3 / steps,
               copy_span_ms_per_step=((cs[-1]["ts"] + cs[-1]["dur"] - cs[0]["ts"]) / 1e3 / steps) if cs else 0,
               gaps_over_50us=sum(g > 50 for g in gaps), gap_ms_total_per_step=sum(max(g, 0) for g in gaps) / 1e3 / steps,
               largest_gaps_us=sorted(gaps, reverse=True)[:20],
               copy_GBps_median=statistics.median(gbps) if gbps else None,
               copy_GBps_p10=sorted(gbps)[len(gbps) // 10] if gbps else None,
               copies_beside_a_kernel=sum(beside_kernel(c) for c in cs[:400]),
               other_stream_copies=len(small_h2d),
               other_stream_copy_us_median=statistics.median(e["dur"] for e in small_h2d) if small_h2d else None)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--style", default="offload-grouped", choices=["offload", "offload-grouped", "offload-graphs"])
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--profile", default="h200")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small dimensions (a CPU check of the script)")
    ap.add_argument("--upload-order", action="store_true",
                    help="also LRU, and LRU + prefetch with the grouped call's indices sent after its wait")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    built = build_model("olmoe-1b-7b", layers=a.layers, tiny=a.tiny, device=a.device)
    trace = record_routing(built, batch=a.batch, steps=a.steps, prompt_tokens=a.prompt, device=a.device)
    prof = load_profile(a.profile)
    host = host_experts(built, pinned=a.device.startswith("cuda"))
    report = {"batch": a.batch, "layers": a.layers, "style": a.style, "prompt": a.prompt,
              "build_s": time.perf_counter() - t0, "rows": {}}
    warm = 2
    for name, (pol, upload_first) in policies(built.spec.num_experts, a.upload_order).items():
        ex = ModelExecutor(built, pol, trace, device=a.device, host=host, prompt_tokens=a.prompt,
                           dispatch=EXECUTOR_STYLES[a.style])
        ex.upload_first = upload_first
        lat = [ex.run_step(s)[0].latency_ms for s in range(a.steps - 2)]
        path = a.out / f"{name}.trace.json"
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                         if a.device.startswith("cuda") else [])
        with torch.profiler.profile(activities=acts) as p:
            prof_lat = [ex.run_step(s)[0].latency_ms for s in range(a.steps - 2, a.steps)]
        p.export_chrome_trace(str(path))
        ex.release()
        evs = gpu_events(path)
        launched = launches(path)
        held = overtaken_uploads(live_events(json.loads(path.read_text()).get("traceEvents", []),
                                             cuda=a.device.startswith("cuda")))
        with open(path, "rb") as f, gzip.open(str(path) + ".gz", "wb") as g:
            g.write(f.read())
        path.unlink()
        try:
            one = row_scenario("probe", built.spec, pol, trace, a.prompt, a.profile, a.style, None, 0)
            sim = project(one, trace, prof)
        except InputError as e:   # --tiny: the profile has no tables for the small shape
            print(f"no projection: {e}")
            sim = [float("nan")] * a.steps
        report["rows"][name] = {"live_median_ms": statistics.median(lat[warm:]), "live_steps_ms": lat,
                                "profiled_steps_ms": prof_lat, "sim_median_ms": statistics.median(sim[warm:]),
                                "sim_steps_ms": sim, "overtaken_uploads": held, **summarise(evs, 2)}
        r = report["rows"][name]
        r["gaps"] = gap_detail(evs, launched, r.get("copy_stream"))
        print(f"{name}: live {r['live_median_ms']:.2f} ms, sim {r['sim_median_ms']:.2f} ms; "
              f"copy busy {r.get('copy_busy_ms_per_step', 0):.2f} ms/step, gaps {r.get('gap_ms_total_per_step', 0):.2f} "
              f"ms/step, copies {r.get('copy_GBps_median') or 0:.1f} GB/s median; uploads overtaken "
              f"{held['overtaken']}/{held['uploads']} ({held['held_ms']:.1f} ms over 2 steps)", flush=True)
    (a.out / "probe-live-timeline.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
