"""A run's timeline as a Chrome/Perfetto trace (JSON trace-event format).

For the first replication at the smallest batch size, every policy is simulated again with the
engine recording each operation (same trace, same seeds as :func:`~simulator.runner.run_scenario`,
so the timeline is the run's own). The file holds one process per policy, and in each one
track (thread) per resource:

- ``steps``: each decode/prefill step, from the host starting it to the synchronise returning;
- ``compute stream``: dense work (``dense``) and expert FFNs (``expert L3.E17``);
- ``copy engine``: host-to-device copies (``copy L3.E17``), prefetches (``prefetch L4.E9``,
  category ``prefetch``, ``args.prefetch = true``);
- ``cpu``: experts run on the host CPU (``cpu expert L3.E17``);
- ``disk``: reads of a disk tier into host memory (``read L3.E17``; lookahead reads category
  ``prefetch``); dequantise ops (``dequant L3.E17``) and direct host reads (``direct L3.E17``)
  are on the compute stream;
- ``stall``: the compute stream idle between two of its operations (waiting for a copy, the
  host or the end of the step), ``args.next`` naming what it waited for.

Several GPUs (``gpus:``, docs/multigpu.md): per GPU its own ``GPU g compute stream``, ``copy
engine`` and ``stall`` tracks, and the tracks the GPUs share: ``host`` (CPU experts and the
host's staging of pageable copies, each named for its GPU), ``peer link`` (dispatch and combine
all-to-alls of each layer, peer copies ``GPU 1 -> 0``) and ``disk``.

Events are complete events (``ph: "X"``) with ``ts``/``dur`` in microseconds; metadata events
(``ph: "M"``) name the processes and threads. Open the file in https://ui.perfetto.dev or
chrome://tracing.

A serving run (:func:`serving_timeline_doc`): the same tracks per policy (its smallest max
batch, replication 0) on the serving clock (idle gaps between steps included), and one track
per request (``request 7``) with its spans: ``queued`` (arrival to admission), ``prefill``
(admission to the first token) and ``decode`` (first token to the last; none for a one-token
output), each with the request's prompt and output tokens in ``args``.
"""
from __future__ import annotations

import json
from pathlib import Path

from .atomic import write_with
from .planner import COMPUTE, CPU, DENSE, DEQUANT, DIRECT, LOAD, READ
from .profile import Profile
from .runner import build_trace, cost_model, derive_seed, simulate
from .scenario import Scenario

TRACKS = {"steps": 1, "compute": 2, "copy": 3, "cpu": 4, "stall": 5, "disk": 6}
TRACK_NAMES = {"steps": "steps", "compute": "compute stream", "copy": "copy engine", "cpu": "cpu",
               "stall": "stall (compute idle)", "disk": "disk reads"}
SINGLE = {CPU: ("cpu expert", "cpu"), DEQUANT: ("dequant", "dequant"), DIRECT: ("direct", "direct"),
          READ: ("read", "disk")}
MIN_STALL_MS = 1e-6


def _expert(key: int, num_experts: int) -> str:
    return f"L{key // num_experts}.E{key % num_experts}"


def _op_event(rec: tuple, num_experts: int) -> dict:
    """A complete event (without pid/tid) for one engine timeline record."""
    stream, start, end, kind, label, prefetch = rec
    args: dict = {}
    if kind == DENSE:
        name, cat = ("embedding, LM head, dense layers", "dense") if label == "step" else ("dense", "dense")
    elif kind == COMPUTE and isinstance(label, str):   # a grouped style's call ("group of 5")
        name, cat = f"experts: {label}", "expert"
    elif kind == COMPUTE:
        name, cat = f"expert {_expert(label, num_experts)}", "expert"
        args = {"key": label}
    elif kind in SINGLE:
        what, cat = SINGLE[kind]
        name = f"{what} {_expert(label, num_experts)}"
        if kind == READ and prefetch:
            cat = "prefetch"
        args = {"key": label}
    elif kind == LOAD:
        keys = list(label)
        what = _expert(keys[0], num_experts) if len(keys) == 1 else f"{len(keys)} experts"
        name, cat = f"{'prefetch' if prefetch else 'copy'} {what}", "prefetch" if prefetch else "copy"
        args = {"keys": keys, "prefetch": bool(prefetch)}
    else:
        raise ValueError(f"unknown opcode {kind} on stream {stream}")
    return {"name": name, "cat": cat, "ph": "X", "ts": start * 1e3, "dur": (end - start) * 1e3, "args": args}


def _stalls(compute: list[dict]) -> list[dict]:
    """Gaps between consecutive operations of the compute stream."""
    out = []
    for prev, nxt in zip(compute, compute[1:]):
        gap_us = nxt["ts"] - (prev["ts"] + prev["dur"])
        if gap_us > MIN_STALL_MS * 1e3:
            out.append({"name": "stall", "cat": "stall", "ph": "X", "ts": prev["ts"] + prev["dur"], "dur": gap_us,
                        "args": {"next": nxt["name"]}})
    return out


def policy_events(pid: int, policy_name: str, batch_size: int, records: list[tuple], steps, num_experts: int) -> list[dict]:
    """All events of one policy's run: metadata, steps, streams and stalls."""
    events: list[dict] = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                           "args": {"name": f"{policy_name} (batch {batch_size})"}},
                          {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}}]
    has_disk = any(r[0] == "disk" for r in records)
    for track, tid in TRACKS.items():
        if track == "disk" and not has_disk:      # only a disk tier has a disk track
            continue
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": TRACK_NAMES[track]}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
    by_track: dict[str, list[dict]] = {t: [] for t in TRACKS}
    for s in steps.itertuples():
        by_track["steps"].append({"name": f"step {s.step}", "cat": "step", "ph": "X", "ts": s.start_ms * 1e3,
                                  "dur": s.latency_ms * 1e3, "args": {"step": int(s.step), "phase": int(s.phase)}})
    for rec in sorted(records, key=lambda r: (r[1], r[2])):
        by_track[rec[0]].append(_op_event(rec, num_experts))
    by_track["stall"] = _stalls(by_track["compute"])
    for track, evs in by_track.items():
        for e in evs:
            e["pid"], e["tid"] = pid, TRACKS[track]
        events.extend(evs)
    return events


GPU_TRACKS = {"compute": (1, "compute stream"), "copy": (2, "copy engine"), "stall": (3, "stall (compute idle)")}
SHARED_TRACKS = {"host": (2, "host (CPU experts, pageable staging)"), "peer": (3, "peer link (all-to-all, peer copies)"),
                 "disk": (4, "disk reads")}


def _gpu_op_event(rec: tuple, num_experts: int) -> dict:
    """A several-GPU record (``simulator.multigpu``): the engine's events, named for their GPU;
    the peer link's all-to-alls and peer copies, and the host's staging, by their label."""
    stream, start, end, kind, label, prefetch, gpu = rec
    if kind < 0:                    # multigpu.A2A, multigpu.STAGE
        cat = "peer" if stream == "peer" else "staging"
        return {"name": label, "cat": cat, "ph": "X", "ts": start * 1e3, "dur": (end - start) * 1e3,
                "args": {"prefetch": bool(prefetch)}}
    e = _op_event(rec[:6], num_experts)
    if stream in ("cpu", "disk"):   # the host's CPU and the disk serve every GPU
        e["name"] += f" (GPU {gpu})"
    e["args"]["gpu"] = gpu
    return e


def gpu_policy_events(pid: int, policy_name: str, batch_size: int, records: list[tuple], steps, num_experts: int,
                      count: int) -> list[dict]:
    """:func:`policy_events` of a several-GPU run: the steps, per GPU its compute stream, copy
    engine and stalls, and the shared tracks (host, peer link, disk)."""
    events: list[dict] = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                           "args": {"name": f"{policy_name} (batch {batch_size}, {count} GPUs)"}},
                          {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}}]
    tracks = {"steps": (1, "steps")}
    tracks.update({k: v for k, v in SHARED_TRACKS.items() if k != "disk" or any(r[0] == "disk" for r in records)})
    for g in range(count):
        tracks.update({(g, k): (10 * (g + 1) + tid, f"GPU {g} {name}") for k, (tid, name) in GPU_TRACKS.items()})
    for track, (tid, name) in tracks.items():
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
    by_track: dict = {t: [] for t in tracks}
    for s in steps.itertuples():
        by_track["steps"].append({"name": f"step {s.step}", "cat": "step", "ph": "X", "ts": s.start_ms * 1e3,
                                  "dur": s.latency_ms * 1e3, "args": {"step": int(s.step), "phase": int(s.phase)}})
    for rec in sorted(records, key=lambda r: (r[1], r[2])):
        stream = "host" if rec[0] == "cpu" else rec[0]
        by_track[stream if stream in SHARED_TRACKS else (rec[6], stream)].append(_gpu_op_event(rec, num_experts))
    for g in range(count):
        by_track[(g, "stall")] = _stalls(by_track[(g, "compute")])
    for track, evs in by_track.items():
        for e in evs:
            e["pid"], e["tid"] = pid, tracks[track][0]
        events.extend(evs)
    return events


def timeline_events(sc: Scenario, profile: Profile, base_dir: Path | None) -> list[dict]:
    """Trace events of every policy at the smallest batch size, replication 0."""
    b, rep = min(sc.batch_sizes), 0
    trace = build_trace(sc, b, rep, base_dir)
    cost = cost_model(sc, profile, trace.max_step_tokens)
    events: list[dict] = []
    for pid, pol in enumerate(sc.policies, start=1):
        records: list[tuple] = []
        # the seed run_scenario gives this (replication, batch size)
        steps = simulate(sc, pol, trace, cost, seed=derive_seed(sc.seed, rep, b, 7), timeline=records)
        if sc.gpus is not None:     # several GPUs (simulator.multigpu)
            events += gpu_policy_events(pid, pol.name, b, records, steps, sc.model.num_experts, sc.gpus.count)
        else:
            events += policy_events(pid, pol.name, b, records, steps, sc.model.num_experts)
    return events


def timeline_doc(sc: Scenario, profile: Profile, base_dir: Path | None) -> dict:
    """The whole Chrome trace-event document (built in memory, before anything is written)."""
    return {"traceEvents": timeline_events(sc, profile, base_dir), "displayTimeUnit": "ms",
            "otherData": {"scenario": sc.name, "profile": profile.name, "model": sc.model.name,
                          "batch_size": min(sc.batch_sizes), "replication": 0}}


def dump_timeline(doc: dict, path: str | Path) -> None:
    """Write a :func:`timeline_doc` as compact JSON (no atomicity: see :func:`write_timeline`)."""
    with open(path, "w") as f:
        json.dump(doc, f, separators=(",", ":"))


def write_timeline(sc: Scenario, profile: Profile, base_dir: Path | None, path: str | Path) -> Path:
    """Write ``path`` (Chrome trace-event JSON), atomically; returns the path."""
    doc = timeline_doc(sc, profile, base_dir)
    return write_with(path, lambda p: dump_timeline(doc, p), "--timeline")


REQUEST_TID0 = 100      # request r's track: tid REQUEST_TID0 + r (after the resource tracks)


def request_events(pid: int, requests) -> list[dict]:
    """One track per request of a serving run's request table, with its queued, prefill and
    decode spans."""
    events: list[dict] = []
    for r in requests.itertuples():
        tid = REQUEST_TID0 + int(r.request)
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": f"request {r.request}"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
        args = {"request": int(r.request), "prompt_tokens": int(r.prompt_tokens), "output_tokens": int(r.output_tokens)}
        for name, a, b in (("queued", r.arrival_ms, r.admit_ms), ("prefill", r.admit_ms, r.first_token_ms),
                           ("decode", r.first_token_ms, r.finish_ms)):
            if b > a:
                events.append({"name": name, "cat": name, "ph": "X", "pid": pid, "tid": tid, "ts": a * 1e3,
                               "dur": (b - a) * 1e3, "args": args})
    return events


def serving_timeline_doc(sc: Scenario, profile: Profile, base_dir: Path | None) -> dict:
    """The trace-event document of a serving scenario: every policy at its smallest max batch,
    replication 0, as :func:`~simulator.serving.runner.serve_scenario` runs it (same seeds)."""
    from .serving.runner import serve_one
    from .serving.workload import make_requests

    b = min(sc.batch_sizes)
    reqs = make_requests(sc.workload, sc.seed, 0, base_dir)
    events: list[dict] = []
    for pid, pol in enumerate(sc.policies, start=1):
        records: list[tuple] = []
        run = serve_one(sc, pol, b, 0, profile, index=pid - 1, base_dir=base_dir, requests=reqs, timeline=records)
        events += policy_events(pid, pol.name, b, records, run.steps, sc.model.num_experts)
        events += request_events(pid, run.requests)
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"scenario": sc.name, "profile": profile.name, "model": sc.model.name, "max_batch": b,
                          "replication": 0, "serving": True}}
