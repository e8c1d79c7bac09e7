"""The run timeline: a Chrome/Perfetto trace-event JSON, checked against the format's rules."""
from __future__ import annotations

import json
import math
from collections import defaultdict

import pytest
import yaml
from click.testing import CliRunner

from simmoe.cli import main
from simulator.profile import load_profile
from simulator.runner import run_scenario
from simulator.scenario import parse_scenario
from simulator.timeline import write_timeline

# Phases of the trace-event format (Chrome "Trace Event Format" document) and what each needs.
PHASES = set("BEXIiCbnesPOND(Mfst)RcvV") | {"T", "p", "F", "S", "P"}
METADATA_NAMES = {"process_name", "process_labels", "process_sort_index", "thread_name", "thread_sort_index"}
TIME_UNITS = {"ms", "ns"}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_trace_events(doc) -> list[str]:
    """Problems with ``doc`` as a JSON-object-format trace (empty list: valid)."""
    errs: list[str] = []
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        return ["top level must be an object with a traceEvents array"]
    if "displayTimeUnit" in doc and doc["displayTimeUnit"] not in TIME_UNITS:
        errs.append(f"displayTimeUnit must be one of {sorted(TIME_UNITS)}")
    named_procs, named_threads = set(), set()
    spans = defaultdict(list)
    for i, e in enumerate(doc["traceEvents"]):
        where = f"event {i}"
        if not isinstance(e, dict):
            errs.append(f"{where}: not an object")
            continue
        ph = e.get("ph")
        if ph not in PHASES:
            errs.append(f"{where}: unknown phase {ph!r}")
            continue
        if not isinstance(e.get("name"), str):
            errs.append(f"{where}: name must be a string")
        for key in ("pid", "tid"):
            if not isinstance(e.get(key), int) or isinstance(e.get(key), bool):
                errs.append(f"{where}: {key} must be an integer")
        if "args" in e and not isinstance(e["args"], dict):
            errs.append(f"{where}: args must be an object")
        if "cat" in e and not isinstance(e["cat"], str):
            errs.append(f"{where}: cat must be a string")
        if ph == "M":
            if e.get("name") not in METADATA_NAMES:
                errs.append(f"{where}: unknown metadata event {e.get('name')!r}")
            args = e.get("args", {})
            if e.get("name", "").endswith("_name"):
                if not isinstance(args.get("name"), str):
                    errs.append(f"{where}: {e['name']} needs args.name (a string)")
                if e["name"] == "process_name":
                    named_procs.add(e.get("pid"))
                else:
                    named_threads.add((e.get("pid"), e.get("tid")))
            if e.get("name", "").endswith("_sort_index") and not isinstance(args.get("sort_index"), int):
                errs.append(f"{where}: {e['name']} needs args.sort_index (an integer)")
            continue
        if not _number(e.get("ts")) or e["ts"] < 0:
            errs.append(f"{where}: ts must be a non-negative number (microseconds)")
        if ph == "X":
            if not _number(e.get("dur")) or e["dur"] < 0:
                errs.append(f"{where}: a complete event needs a non-negative dur")
            else:
                spans[(e.get("pid"), e.get("tid"))].append((e["ts"], e["ts"] + e["dur"], i))
    for (pid, tid), evs in spans.items():
        if pid not in named_procs:
            errs.append(f"pid {pid}: no process_name metadata")
        if (pid, tid) not in named_threads:
            errs.append(f"pid {pid} tid {tid}: no thread_name metadata")
        evs.sort()
        stack: list[float] = []          # complete events on one thread must nest, never cross
        for start, end, i in evs:
            while stack and stack[-1] <= start + 1e-6:
                stack.pop()
            if stack and end > stack[-1] + 1e-6:
                errs.append(f"event {i}: overlaps an enclosing event on pid {pid} tid {tid} without nesting")
            stack.append(end)
    return errs


SCENARIO = {
    "name": "tl",
    "model": {"preset": "published-study", "num_layers": 3, "num_experts": 16},
    "replications": 2,
    "batch_sizes": [4, 2],
    "trace": {"generator": "mixed", "steps": 5, "zipf": 0.5, "batch_locality": 0.5, "batch_pool": 4},
    "engine": {"dense_ms_per_layer": 0.05},
    "policies": [
        {"name": "per-item", "load": "per-item", "memory": "pageable"},
        {"name": "lru-prefetch", "cache": {"kind": "lru", "capacity": 12}, "prefetch": {"kind": "oracle"}},
        {"name": "lru-cpu", "cache": {"kind": "lru", "capacity": 12}, "miss": "cpu"},
    ],
}


@pytest.fixture
def cpu_profile(tmp_path):
    """The default profile plus CPU expert timings (for the cpu miss policy)."""
    doc = load_profile("h100-pcie5").to_json()
    doc["name"] = "h100-with-cpu"
    doc["compute"]["cpu"] = {"768x3072-fp32-gated": [[1, 0.8], [8, 2.0], [64, 9.0]]}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(doc))
    return path


def _timeline(tmp_path, cpu_profile):
    sc = parse_scenario({**SCENARIO, "profile": str(cpu_profile)})
    profile = load_profile(sc.profile)
    path = write_timeline(sc, profile, None, tmp_path / "out" / "timeline.json")
    return sc, profile, json.loads(path.read_text())


def test_timeline_validates_against_the_trace_event_format(tmp_path, cpu_profile):
    _, _, doc = _timeline(tmp_path, cpu_profile)
    assert validate_trace_events(doc) == []
    assert doc["displayTimeUnit"] == "ms" and doc["otherData"]["batch_size"] == 2


def test_one_process_per_policy_one_track_per_resource(tmp_path, cpu_profile):
    _, _, doc = _timeline(tmp_path, cpu_profile)
    ev = doc["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in ev if e["name"] == "process_name"}
    assert procs == {1: "per-item (batch 2)", 2: "lru-prefetch (batch 2)", 3: "lru-cpu (batch 2)"}
    threads = {(e["pid"], e["args"]["name"]) for e in ev if e["name"] == "thread_name"}
    for pid in procs:
        assert {n for p, n in threads if p == pid} == {"steps", "compute stream", "copy engine", "cpu",
                                                        "stall (compute idle)"}
    cats = defaultdict(set)
    for e in ev:
        if e["ph"] == "X":
            cats[e["pid"]].add(e["cat"])
    assert {"step", "dense", "expert", "copy", "stall"} <= cats[1]
    assert "prefetch" in cats[2] and "prefetch" not in cats[1]
    assert "cpu" in cats[3]
    pf = [e for e in ev if e["ph"] == "X" and e["cat"] == "prefetch"]
    assert all(e["args"]["prefetch"] is True and e["name"].startswith("prefetch L") for e in pf)
    copies = [e for e in ev if e["ph"] == "X" and e["cat"] == "copy"]
    assert all(e["args"]["prefetch"] is False for e in copies)


def test_timeline_matches_the_run_and_stalls_fill_compute_gaps(tmp_path, cpu_profile):
    sc, profile, doc = _timeline(tmp_path, cpu_profile)
    steps = run_scenario(sc, profile=profile).steps
    ev = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    tid = {e["args"]["name"]: e["tid"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    for pid, pol in enumerate(sc.policies, start=1):
        run = steps[(steps["policy"] == pol.name) & (steps["batch_size"] == 2) & (steps["replication"] == 0)]
        compute = [e for e in ev if e["pid"] == pid and e["tid"] == tid["compute stream"]]
        copy = [e for e in ev if e["pid"] == pid and e["tid"] == tid["copy engine"]]
        stalls = [e for e in ev if e["pid"] == pid and e["tid"] == tid["stall (compute idle)"]]
        step_ev = [e for e in ev if e["pid"] == pid and e["tid"] == tid["steps"]]
        assert sum(e["dur"] for e in compute) / 1e3 == pytest.approx(run["compute_ms"].sum(), rel=1e-9)
        assert sum(e["dur"] for e in copy) / 1e3 == pytest.approx(run["transfer_ms"].sum(), rel=1e-9)
        assert [e["dur"] / 1e3 for e in step_ev] == pytest.approx(list(run["latency_ms"]), rel=1e-9)
        # compute busy + stalls cover the compute stream from its first to its last operation
        first, last = min(e["ts"] for e in compute), max(e["ts"] + e["dur"] for e in compute)
        busy = sum(e["dur"] for e in compute) + sum(e["dur"] for e in stalls)
        assert busy == pytest.approx(last - first, rel=1e-9)


def test_validator_rejects_malformed_traces():
    good = {"traceEvents": [
        {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "p"}},
        {"name": "thread_name", "ph": "M", "pid": 1, "tid": 2, "args": {"name": "t"}},
        {"name": "a", "ph": "X", "ts": 0.0, "dur": 10.0, "pid": 1, "tid": 2},
        {"name": "b", "ph": "X", "ts": 2.0, "dur": 3.0, "pid": 1, "tid": 2},       # nested: fine
    ]}
    assert validate_trace_events(good) == []
    crossing = {"traceEvents": good["traceEvents"] + [{"name": "c", "ph": "X", "ts": 8.0, "dur": 5.0, "pid": 1, "tid": 2}]}
    assert any("overlaps" in e for e in validate_trace_events(crossing))
    no_dur = {"traceEvents": good["traceEvents"][:2] + [{"name": "a", "ph": "X", "ts": 0, "pid": 1, "tid": 2}]}
    assert any("dur" in e for e in validate_trace_events(no_dur))
    unnamed = {"traceEvents": [{"name": "a", "ph": "X", "ts": 0, "dur": 1, "pid": 1, "tid": 5}]}
    assert len(validate_trace_events(unnamed)) == 2
    assert validate_trace_events({"traceEvents": [{"name": "a", "ph": "Q", "pid": 1, "tid": 1}]})
    assert validate_trace_events([])


def test_cli_run_timeline_writes_a_valid_trace(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(SCENARIO | {"policies": SCENARIO["policies"][:2]}))
    res = CliRunner().invoke(main, ["run", str(f), "--timeline", "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "out" / "timeline.json").read_text())
    assert validate_trace_events(doc) == []
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]   # no temporary left
