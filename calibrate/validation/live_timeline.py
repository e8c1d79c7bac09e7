"""One live step of a real-model row beside its projection, as one Perfetto/Chrome trace.

``simmoe validate --executor model --live-timeline``: after a row's timed steps, one more step
of its trace runs under ``torch.profiler`` (it is not one of the row's timed steps: the
profiler's own cost stays out of the medians). Its GPU activity (kernels, copies, memsets, per
CUDA stream; on a CPU, the host's operators) becomes one process of the trace, the engine's
timeline of the same step of the row's projection (:mod:`simulator.timeline`'s tracks)
another, both from the step's start. Beside it, :func:`copy_summary` states what a copy-bound
row's error is made of: the copies' count, their median time and rate, the copy engine's busy
and idle time within the step, live and projected, and the small uploads of the compute
stream that expert copies issued after them overtook (:func:`overtaken_uploads`).
"""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from simulator.timeline import policy_events

#: the profiler's GPU-side categories kept in the live process (CPU runs: "cpu_op")
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def profile_step(ex, s: int):
    """Run step ``s`` of the executor ``ex`` under ``torch.profiler``; returns (its ModelStep,
    its Decisions, the profiler's trace events of that step, shifted to start at 0 us)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ex.cuda else [])
    with profile(activities=acts) as prof:
        st, dec = ex.run_step(s)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        doc = json.loads(path.read_text())
    del torch
    events = doc.get("traceEvents", doc) if isinstance(doc, dict) else doc
    return st, dec, live_events(events, cuda=ex.cuda)


def live_events(events: list[dict], cuda: bool) -> list[dict]:
    """The profiler's complete events of the step's device work (on a CPU: its top operators),
    from the first one's start. A GPU event keeps, as ``args.launch_us``, when the host's
    runtime call that launched it began (the same clock, from the same start)."""
    keep = GPU_CATEGORIES if cuda else ("cpu_op",)
    out = [e for e in events if e.get("ph") == "X" and e.get("cat") in keep and "ts" in e]
    if not out:
        return []
    launched = {e["args"]["correlation"]: float(e["ts"]) for e in events
                if e.get("cat") == "cuda_runtime" and "ts" in e and "correlation" in (e.get("args") or {})}
    t0 = min(float(e["ts"]) for e in out)
    res = []
    for e in out:
        args = _args(e)
        corr = (e.get("args") or {}).get("correlation")
        if corr in launched:
            args["launch_us"] = launched[corr] - t0
        res.append({"name": e.get("name", "?"), "cat": e["cat"], "ph": "X", "ts": float(e["ts"]) - t0,
                    "dur": float(e.get("dur", 0.0)), "tid": e.get("tid", 0), "args": args})
    return res


def _args(e: dict) -> dict:
    a = e.get("args") or {}
    keep = {k: a[k] for k in ("stream", "bytes", "memory bandwidth (GB/s)") if k in a}
    return keep


def overtaken_uploads(live: list[dict], min_bytes: int = 1 << 20) -> dict:
    """The step's small host-to-device copies on streams other than the expert copies' that
    started only after an expert copy launched later than them had run: a copy engine that
    took the two streams' copies in the order they became ready, not the order the host
    issued them (the grouped call's index upload behind its wait, with the next layer's
    prefetch queued meanwhile). ``{"uploads", "overtaken", "copies_ahead", "held_ms"}``:
    small uploads, how many were overtaken, by how many expert copies in all, and the sum of
    the time from the first overtaking copy's start to the upload's start."""
    big = [e for e in live if is_h2d(e) and e["args"].get("bytes", 0) >= min_bytes]
    streams = {e["args"].get("stream", e["tid"]) for e in big}
    small = [e for e in live if is_h2d(e) and e["args"].get("bytes", min_bytes) < min_bytes
             and e["args"].get("stream", e["tid"]) not in streams and "launch_us" in e["args"]]
    over, ahead, held = 0, 0, 0.0
    for u in small:
        late = [b for b in big if b["args"].get("launch_us", -1.0) > u["args"]["launch_us"]
                and b["ts"] + b["dur"] <= u["ts"]]
        if late:
            over += 1
            ahead += len(late)
            held += (u["ts"] - min(b["ts"] for b in late)) / 1e3
    return {"uploads": len(small), "overtaken": over, "copies_ahead": ahead, "held_ms": held}


def is_h2d(e: dict) -> bool:
    return e["cat"] == "gpu_memcpy" and "HtoD" in e["name"]


def copy_summary(live: list[dict], sim_records: list[tuple], step_ms: float, min_bytes: int = 1 << 20) -> dict:
    """The step's host-to-device expert copies (``min_bytes`` or more), live and projected:
    count, median ms, median GB/s, the copy engine's busy ms and its idle ms between the first
    copy's start and the last one's end."""
    big = sorted((e for e in live if is_h2d(e) and e["args"].get("bytes", min_bytes) >= min_bytes),
                 key=lambda e: e["ts"])
    sim = sorted((r for r in sim_records if r[0] == "copy"), key=lambda r: r[1])

    def side(spans: list[tuple[float, float]], nbytes: list[int]):
        if not spans:
            return {"copies": 0}
        durs = [(b - a) for a, b in spans]
        busy = sum(durs)
        window = max(b for _, b in spans) - min(a for a, _ in spans)
        rate = [n / d / 1e6 for n, d in zip(nbytes, durs) if d > 0 and n]
        return {"copies": len(spans), "median_ms": statistics.median(durs), "busy_ms": busy,
                "idle_ms": max(0.0, window - busy), "window_ms": window,
                **({"median_GBps": statistics.median(rate)} if rate else {})}

    live_side = side([(e["ts"] / 1e3, (e["ts"] + e["dur"]) / 1e3) for e in big],
                     [int(e["args"].get("bytes", 0)) for e in big])
    sim_side = side([(r[1], r[2]) for r in sim], [0] * len(sim))
    return {"step_ms": step_ms, "live": live_side, "projected": sim_side,
            "overtaken_uploads": overtaken_uploads(live, min_bytes)}


def step_records(records: list[tuple], start_ms: float, end_ms: float) -> list[tuple]:
    """The engine's timeline records of one step (those that start within it), from its start."""
    return [(r[0], r[1] - start_ms, r[2] - start_ms, *r[3:]) for r in records if start_ms <= r[1] < end_ms]


def row_timeline(label: str, live: list[dict], sim_steps, sim_records: list[tuple], step: int,
                 num_experts: int, batch: int) -> dict:
    """A trace-event document: process 1 the live step (one track per CUDA stream), process 2
    its projection (the engine's tracks)."""
    row = sim_steps.iloc[step]
    start, lat = float(row["start_ms"]), float(row["latency_ms"])
    recs = step_records(sim_records, start, start + lat)
    one = sim_steps.iloc[[step]].copy()
    one["start_ms"] = 0.0
    events = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": f"live: {label} step {step}"}},
              {"name": "process_sort_index", "ph": "M", "pid": 1, "tid": 0, "args": {"sort_index": 1}}]
    for tid in sorted({e["tid"] for e in live}, key=str):
        events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": f"stream {tid}"}})
    events += [{**e, "pid": 1} for e in live]
    events += policy_events(2, f"projected: {label} step {step}", batch, recs, one, num_experts)
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"row": label, "step": step}}, recs
