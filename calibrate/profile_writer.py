"""Assemble a calibrated profile from the measurements, validate it, write it atomically.

The sections the cost model reads (``copy``, ``compute``, ``host``) hold fitted or median
values; ``fit`` holds every point's fit error; ``measurements`` holds the per-point
statistics and the side measurements (streams, coalescing, overheads, study table).
"""
from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
from pathlib import Path

from simulator.atomic import check_target, write_text
from simulator.errors import InputError
from simulator.profile import PROFILE_FORMAT, PROFILE_VERSION, parse_profile

from calibrate.measurements.executor_costs import host_costs
from calibrate.fit import compute_fit, copy_curve

TWO_ENGINES_SPEEDUP = 1.25   # two copy streams this much faster than one: two copy engines
BLOCKING_HOST_SHARE = 0.5    # pageable copies block the host if the call takes this share of the copy
BLOCKING_MIN_BYTES = 1 << 20
MIN_COPY_MS = 1e-6           # a copy is never free (tiny CPU-device copies can measure under their issue cost)


def _medians(points: list[dict], key: str) -> list[tuple[int, float]]:
    """``(point[key], median ms)`` of measured points."""
    return [(p[key], p["ms"]["median"]) for p in points]


def _copy_section(copies: dict, streams: dict | None) -> tuple[dict, dict]:
    """Profile ``copy`` section and its fit records from the copy sweep."""
    section: dict = {}
    fits: dict = {}
    for direction, kinds in copies.items():
        for kind, points in kinds.items():
            # on the CPU device the only kind is host-to-host pageable: it is the profile's pinned curve
            name = kind if "pinned" in kinds else "pinned"
            curve, record = copy_curve(_medians(points, "bytes"))
            section.setdefault(direction, {})[name] = curve
            fits[f"{direction}.{name}"] = record
    if streams:
        speedup = streams["one_stream_ms"]["median"] / streams["two_streams_ms"]["median"]
        section["copy_engines"] = 2 if speedup >= TWO_ENGINES_SPEEDUP else 1
    return section, fits


def _pageable_blocks_host(copies: dict) -> bool:
    """Whether the host call of a pageable host-to-device copy lasts about as long as the copy."""
    points = [p for p in copies["h2d"].get("pageable", []) if p["bytes"] >= BLOCKING_MIN_BYTES]
    if "pinned" not in copies["h2d"] or not points:
        return True  # CPU device: every copy is synchronous
    share = statistics.median(p["host_ms"]["median"] / p["ms"]["median"] for p in points)
    return share >= BLOCKING_HOST_SHARE


def _host_section(results: dict) -> dict:
    h2d = results["copies"]["h2d"]
    first_kind = "pinned" if "pinned" in h2d else "pageable"
    expert_us = statistics.median(rows[0]["host_ms"]["median"] * 1e3 for rows in results["compute_device"].values())
    over = results["overheads"]
    launch = {"copy": h2d[first_kind][0]["host_ms"]["median"] * 1e3, "expert": expert_us,
              "dense": over["dense_launch_ms"]["median"] * 1e3}
    tail = 0.0
    if "executor_runs" in results:     # CUDA: the live executor's own calls, inside its steps
        launch, tail = host_costs(results["executor_runs"])
    return {
        "launch_us": launch,
        "sync_us": over["sync_ms"]["median"] * 1e3,
        "pageable_blocks_host": _pageable_blocks_host(results["copies"]),
        "pageable_tail_us": tail,
        "cpu_path_includes_transfers": "executor_cpu" in results,
    }


def with_executor_copies(copy: dict, trains: dict, runs: dict | None) -> None:
    """Expert-sized copies as the executor issues them replace the lone-copy points of the same
    size in the host-to-device tables: pinned, back-to-back trains from cache-cold host memory;
    pageable, the blocking copy inside the executor's per-item steps, less its issue cost."""
    points = {kind: {r["bytes"]: r["ms"]["median"] for r in rows} for kind, rows in trains.items()}
    if runs:
        launch_ms = host_costs(runs)[0]["copy"] * 1e-3
        points.setdefault("pageable", {}).update(
            {r["expert_bytes"]: max(r["pageable_copy_ms"] - launch_ms, MIN_COPY_MS) for r in runs.values()})
    for kind, pts in points.items():
        curve = copy["h2d"].get(kind)
        if curve is None:
            continue
        table = dict(curve["table"]) | pts
        curve["table"] = sorted([b, ms] for b, ms in table.items())


def build_profile(name: str, provenance: dict, results: dict) -> dict:
    """The profile document (validated with :func:`simulator.profile.parse_profile`)."""
    copy, copy_fits = _copy_section(results["copies"], results.get("copy_streams"))
    if "copy_trains" in results:
        with_executor_copies(copy, results["copy_trains"], results.get("executor_runs"))
    # on the CPU device the device tables are the CPU tables (measured once)
    sources = {"gpu": results["compute_device"], "cpu": results.get("compute_cpu", results["compute_device"])}
    compute = {side: {key: [[t, ms] for t, ms in _medians(rows, "tokens")] for key, rows in tables.items()}
               for side, tables in sources.items()}
    if "executor_cpu" in results:   # CUDA: the executor's whole CPU-miss path (transfers included)
        compute["cpu"] = results["executor_cpu"]
    fit = {"copy": copy_fits,
           "compute": {side: {key: compute_fit([tuple(p) for p in pts]) for key, pts in tables.items()}
                       for side, tables in compute.items()}}
    measurements = dict(results)
    if "sleep" in results:
        measurements["sleep_cycles_per_ms"] = results["sleep"]["cycles_per_ms"]
    doc = {
        "format": PROFILE_FORMAT, "version": PROFILE_VERSION, "name": name, "provenance": provenance,
        "copy": copy, "compute": compute, "host": _host_section(results), "fit": fit, "measurements": measurements,
    }
    return parse_profile(doc, f"calibrated profile {name}").to_json()


def check_writable(path: Path) -> None:
    """Fail now, before measuring, if the profile could not be written to ``path``."""
    if path.is_dir():
        raise InputError(str(path), "--out", "is a directory; give a file path such as profiles/my-gpu.json")
    check_target(path, "--out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise InputError(str(path), "--out", f"cannot write here: {e.strerror or e}") from None


def write_atomic(doc: dict, path: Path) -> Path:
    """Write ``doc`` as JSON (:func:`simulator.atomic.write_text`): all of it or nothing."""
    return write_text(path, json.dumps(doc, indent=1, allow_nan=False) + "\n", "--out")


def write_or_keep(doc: dict, path: Path) -> Path:
    """Write the profile to ``path``; if that fails (a full disk, a folder gone), keep the
    measurements in a file of the temporary folder and say where, in the one-line error."""
    try:
        return write_atomic(doc, path)
    except InputError as e:
        slug = re.sub(r"[^\w.-]", "_", str(doc.get("name") or "calibrated"))[:64]
        kept = Path(tempfile.gettempdir()) / f"simmoe-profile-{slug}-{os.getpid()}.json"
        try:
            write_atomic(doc, kept)
            where = f"the measurements are kept in {kept}: move it there when there is room"
        except InputError as e2:
            where = f"and could not be kept in {kept} either ({e2.message})"
        raise InputError(e.source, e.field, f"{e.message}; {where}") from None
