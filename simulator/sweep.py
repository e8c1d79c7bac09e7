"""Sweeps: one base scenario, a grid of overrides, many runs, resumable after any crash.

A sweep file (YAML)::

    name: batch_curve
    base: locality_high.yaml        # a scenario file (relative to this file), or an inline mapping
    set:                            # overrides applied to every point (optional)
      replications: 2
      trace.steps: 16
    grid:                           # every combination of these axes (product)
      batch_sizes: [1, 2, 4, 8]     # for batch_sizes, an integer means [integer]
      trace.batch_locality: [0.1, 0.8]
    zip:                            # groups of axes that move together (equal lengths)
      - model.num_experts: [32, 128]
        policies[dedup-lru].cache.capacity: [16, 64]

An axis is a dotted scenario field. ``[i]`` indexes a list, ``[name]`` picks the policy of
that name; missing mappings are created; a preset model name (``model: mixtral-8x7b``) becomes
``{preset: mixtral-8x7b}`` when a field inside it is set. A whole list (``policies``) can be an
axis value too. Points are numbered in product order: zip groups first, then grid axes, in
file order, the last one varying fastest.

A *point* is one fully resolved :class:`~simulator.scenario.Scenario` (with every policy and
batch size of it); its id is a hash of its canonical JSON and of the profile it runs on. Every
point is validated before anything runs. A point's rows depend on nothing but the point, so
results are identical, bit for bit, whichever backend and worker count ran them.

Output folder ``OUT``:

- ``OUT/sweep.json``: the expanded sweep (axes, point numbers and ids), rewritten at each start;
- ``OUT/parts/part-*.parquet``: finished points, one file per finished chunk, each written to a
  temporary name and renamed into place: a crash (even ``kill -9``) never leaves a partial
  file, and a restarted sweep reads the finished point ids from the parts and runs only the
  rest. A point that raises is recorded with ``status = "error"`` and its message;
- ``OUT/results.parquet``: every point's rows in point order, written (atomically) when a run
  of the sweep ends.

Rows: one per (point, policy, batch size): ``point``, ``point_id``, ``status``, ``error``, one
column per axis (named by its path, holding the value from the sweep file), the scenario's
context (``scenario``, ``model``, ``num_layers``, ``num_experts``, ``top_k``, ``expert_bytes``,
``profile_name``; ``load``, ``memory``, ``cache``, ``prefetch``, ``miss`` of the policy), the
flattened summary (:func:`flatten_summary`) and ``max_reuse_factor``. Where an axis has the same
name as one of these columns (``replications``), the axis column is kept.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import re
import socket
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .atomic import clean_stale, write_text, write_with
from .errors import InputError
from .names import name_problem, results_dir
from .profile import DEFAULT_PROFILE, Profile, load_profile
from .runner import run_scenario
from .safe_load import check_input_file, load_json, load_yaml
from .scenario import Scenario, parse_scenario

SWEEP_KEYS = ("name", "description", "base", "set", "grid", "zip")
#: the most points one sweep may expand to
MAX_POINTS = 100_000
BACKENDS = ("local", "ray")
MAX_CHUNK = 32
_PATH = re.compile(r"^[A-Za-z_]\w*(\[[^\[\]]+\])*(\.[A-Za-z_]\w*(\[[^\[\]]+\])*)*$")
_TOKEN = re.compile(r"([A-Za-z_]\w*)|\[([^\[\]]+)\]")


# ----------------------------------------------------------------------------- rows
def flatten_summary(row: dict) -> dict:
    """One summary row (see :mod:`simulator.metrics`) as flat columns: the step latency
    statistics become ``latency_mean_ms``, ``latency_std_ms``, ``latency_p50_ms``,
    ``latency_p99_ms``, ``latency_ci95_lo`` and ``latency_ci95_hi``; a several-GPU run's
    ``gpus`` fields ``gpus_count``, ``gpus_bytes_peer``, ``gpus_load_imbalance``, ... (the per-GPU
    list stays in summary.json)."""
    flat = {k: v for k, v in row.items() if k not in ("step_latency_ms", "gpus")}
    if row.get("gpus") is not None:        # several GPUs: scalars as gpus_*, per GPU left to the JSON
        flat.update({f"gpus_{k}": v for k, v in row["gpus"].items() if k != "per_gpu"})
    for k, v in row["step_latency_ms"].items():
        if k == "ci95":
            flat["latency_ci95_lo"], flat["latency_ci95_hi"] = v
        elif k not in ("replication_means", "ci95_method"):
            flat[f"latency_{k}_ms"] = v
    return flat


def max_reuse_factors(steps: pd.DataFrame, warmup_steps: int) -> dict[tuple[str, int], float]:
    """Per (policy, batch size): the seed's "max reuse factor", (requests - unique requests) /
    requests of the measured step where it is largest (the share of routed requests that repeat
    an expert already requested in the same step; 0 to 1)."""
    df = steps[steps["step"] >= warmup_steps]
    ratio = (df["requests"] - df["unique_requests"]) / df["requests"].where(df["requests"] > 0)
    best = ratio.groupby([df["policy"], df["batch_size"]]).max()
    return {(p, int(b)): float(v) for (p, b), v in best.items()}


def scenario_context(sc: Scenario, profile: Profile) -> dict:
    """Columns describing a point's scenario (the same for all its rows)."""
    from .what_if import describe

    m = sc.model
    return {"scenario": sc.name, "model": m.name, "num_layers": m.num_layers, "num_experts": m.num_experts,
            "top_k": m.top_k, "expert_bytes": m.expert_bytes, "profile_name": profile.name,
            "profile_source": describe(profile)}


def policy_context(sc: Scenario, policy: str) -> dict:
    """Columns describing one policy of a scenario."""
    p = next(p for p in sc.policies if p.name == policy)
    return {"load": p.load, "memory": p.memory, "cache": p.cache.kind, "prefetch": p.prefetch.kind,
            "miss": p.miss.kind}


# --------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class Axis:
    """One swept field: its path, its values as written, and where it is in the sweep file."""

    path: str
    values: tuple
    field: str


@dataclass
class Point:
    """One resolved scenario of a sweep."""

    index: int
    point_id: str
    scenario: Scenario
    profile: Profile
    axes: dict[str, Any]          # axis path -> column value


@dataclass
class Sweep:
    """An expanded sweep: its axes and every point, validated and numbered."""

    name: str
    source: str
    base_dir: Path | None
    axes: list[Axis]
    points: list[Point]

    def manifest(self) -> dict:
        return {"format": "simmoe-sweep", "version": 1, "name": self.name, "source": self.source,
                "axes": [{"path": a.path, "field": a.field, "values": list(a.values)} for a in self.axes],
                "points": [{"point": p.index, "point_id": p.point_id, "axes": p.axes} for p in self.points]}


def _read_yaml(path: Path, field: str) -> Any:
    return load_yaml(path, field)


def parse_path(path: Any, source: str, field: str) -> list[tuple[str, str]]:
    """``policies[1].cache.capacity`` -> [("key", "policies"), ("sel", "1"), ("key", "cache"), ...]."""
    if not isinstance(path, str) or not _PATH.match(path):
        raise InputError(source, field, f"{path!r} is not a field path (write e.g. trace.zipf or "
                                        "policies[0].cache.capacity)")
    return [("key", k) if k else ("sel", s) for k, s in _TOKEN.findall(path)]


def _select(items: list, sel: str, source: str, field: str) -> int:
    if sel.isdigit():
        if int(sel) >= len(items):
            raise InputError(source, field, f"index [{sel}] is past the end (the list has {len(items)} items)")
        return int(sel)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == sel:
            return i
    names = [str(it.get("name")) for it in items if isinstance(it, dict)]
    raise InputError(source, field, f"no item named {sel!r} (names: {', '.join(names) or 'none'})")


def set_path(doc: dict, tokens: list[tuple[str, str]], value: Any, source: str, field: str) -> str:
    """Set ``value`` at ``tokens`` in ``doc`` (in place); returns the path with list indices."""
    node: Any = doc
    resolved = ""
    for i, (kind, name) in enumerate(tokens):
        last = i == len(tokens) - 1
        if kind == "key":
            if not isinstance(node, dict):
                raise InputError(source, field, f"cannot set {name!r} inside {resolved or 'the scenario'} "
                                                f"(it is a {type(node).__name__}, not a mapping)")
            resolved += f".{name}" if resolved else name
            if last:
                node[name] = copy.deepcopy(value)
                break
            if node.get(name) is None:
                node[name] = {}
            elif name == "model" and isinstance(node[name], str):
                node[name] = {"preset": node[name]}
            node = node[name]
        else:
            if not isinstance(node, list):
                raise InputError(source, field, f"{resolved} is not a list: [{name}] selects nothing")
            idx = _select(node, name, source, field)
            resolved += f"[{idx}]"
            if last:
                node[idx] = copy.deepcopy(value)
                break
            node = node[idx]
    return resolved


def _column_values(values: list) -> list:
    """An axis's values as one Parquet column type: bools, ints, floats, strings, or JSON text."""
    kinds = {type(v) for v in values}
    if kinds == {bool} or kinds == {int} or kinds == {str}:
        return list(values)
    if kinds <= {int, float}:
        return [float(v) for v in values]
    return [json.dumps(v, sort_keys=True) for v in values]


def _groups(doc: dict, source: str) -> list[list[Axis]]:
    """The product's dimensions: each zip group, then each grid axis (a group of one)."""
    zips = doc.get("zip") or []
    if not isinstance(zips, list):
        raise InputError(source, "zip", "must be a list of mappings (each: axis path -> list of values)")
    grid = doc.get("grid") or {}
    if not isinstance(grid, dict):
        raise InputError(source, "grid", "must be a mapping (axis path -> list of values)")
    for g, grp in enumerate(zips):
        if not isinstance(grp, dict) or not grp:
            raise InputError(source, f"zip[{g}]", "must be a non-empty mapping (axis path -> list of values)")
    seen: set[str] = set()
    groups: list[list[Axis]] = []
    for where, grp in [(f"zip[{g}]", grp) for g, grp in enumerate(zips)] + [("grid", {p: v}) for p, v in grid.items()]:
        group = []
        for path, values in grp.items():
            field = f"{where}.{path}"
            parse_path(path, source, field)
            if path in seen:
                raise InputError(source, field, "this axis is swept twice")
            seen.add(path)
            if not isinstance(values, list) or not values:
                raise InputError(source, field, "needs a non-empty list of values")
            group.append(Axis(path, tuple(values), field))
        if len({len(a.values) for a in group}) > 1:
            raise InputError(source, where, "axes that move together need lists of one length "
                                            f"(got {', '.join(f'{a.path}: {len(a.values)}' for a in group)})")
        groups.append(group)
    return groups


def _blame(field: str, resolved: dict[str, str], axes: list[Axis], fallback: str) -> str:
    """The sweep-file field that most likely caused a scenario error at ``field``."""
    def related(a: str, b: str) -> bool:
        short, long_ = sorted((a, b), key=len)
        return long_ == short or long_.startswith((short + ".", short + "["))
    for a in axes:
        if related(field, resolved.get(a.path, a.path)):
            return a.field
    return fallback


def _point_id(sc: Scenario, profile_digest: str) -> str:
    canon = json.dumps(sc.effective(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((canon + profile_digest).encode()).hexdigest()[:16]


def _base(doc: dict, source: str, folder: Path | None) -> tuple[dict, Path | None]:
    """The base scenario document and the folder its relative paths are taken from."""
    base = doc.get("base")
    if isinstance(base, dict):
        return base, folder
    if not isinstance(base, str):
        raise InputError(source, "base", "required: a scenario file path or an inline scenario mapping")
    path = Path(base) if folder is None or Path(base).is_absolute() else folder / base
    if not path.is_file():
        raise InputError(source, "base", f"scenario file {path} not found")
    base_doc = _read_yaml(path, "base")
    if not isinstance(base_doc, dict):
        raise InputError(str(path), "(document)", "a scenario must be a YAML mapping")
    return base_doc, path.resolve().parent


class _Profiles:
    """Profiles by reference, loaded once, with a digest of their content (part of point ids)."""

    def __init__(self):
        self.cache: dict[str, tuple[Profile, str]] = {}

    def get(self, ref: str) -> tuple[Profile, str]:
        if ref not in self.cache:
            prof = load_profile(ref)
            digest = hashlib.sha256(json.dumps(prof.to_json(), sort_keys=True).encode()).hexdigest()
            self.cache[ref] = (prof, digest)
        return self.cache[ref]


def expand(doc: Any, source: str, folder: Path | None) -> Sweep:
    """Check a sweep document and resolve, validate and number all its points."""
    if not isinstance(doc, dict):
        raise InputError(source, "(document)", "a sweep must be a YAML mapping")
    for k in doc:
        if k not in SWEEP_KEYS:
            raise InputError(source, str(k), f"unknown key (a sweep has: {', '.join(SWEEP_KEYS)})")
    name = doc.get("name")
    if name is None:
        raise InputError(source, "name", "required: the sweep's name (results go to results/<name>)")
    problem = name_problem(name)
    if problem:
        raise InputError(source, "name", problem)
    base_doc, base_dir = _base(doc, source, folder)
    fixed = doc.get("set") or {}
    if not isinstance(fixed, dict):
        raise InputError(source, "set", "must be a mapping (field path -> value)")
    sets = [(f"set.{p}", parse_path(p, source, f"set.{p}"), p, v) for p, v in fixed.items()]
    groups = _groups(doc, source)
    axes = [a for g in groups for a in g]
    tokens = {a.path: parse_path(a.path, source, a.field) for a in axes}
    columns = {a.path: _column_values(list(a.values)) for a in axes}
    total = math.prod(len(g[0].values) for g in groups)
    if total > MAX_POINTS:
        raise InputError(source, "grid", f"{total:,} points: more than the {MAX_POINTS:,} one sweep may have "
                                         "(split it into several sweeps)")
    profiles = _Profiles()
    points: list[Point] = []
    ids: dict[str, int] = {}
    for index, combo in enumerate(itertools.product(*[range(len(g[0].values)) for g in groups])):
        chosen = [(a, i) for g, i in zip(groups, combo) for a in g]
        label = ", ".join(f"{a.path}={json.dumps(a.values[i])}" for a, i in chosen) or "the base scenario"
        sdoc = copy.deepcopy(base_doc)
        resolved: dict[str, str] = {}
        for field, toks, path, value in sets:
            resolved[path] = set_path(sdoc, toks, value, source, field)
        for a, i in chosen:
            value = a.values[i]
            if a.path == "batch_sizes" and type(value) is int:
                value = [value]
            resolved[a.path] = set_path(sdoc, tokens[a.path], value, source, a.field)
        try:
            sc = parse_scenario(sdoc, f"point {index}")
        except InputError as e:
            raise InputError(source, _blame(e.field, resolved, axes, "base"),
                             f"point {index} ({label}): {e.field}: {e.message}") from None
        try:
            prof, digest = profiles.get(sc.profile or DEFAULT_PROFILE)
        except InputError as e:
            raise InputError(source, _blame("profile", resolved, axes, "base"),
                             f"point {index} ({label}): profile: {e.message}") from None
        pid = _point_id(sc, digest)
        if pid in ids:
            raise InputError(source, "grid", f"points {ids[pid]} and {index} are the same scenario "
                                             f"({label}): remove the repeated value")
        ids[pid] = index
        points.append(Point(index, pid, sc, prof, {a.path: columns[a.path][i] for a, i in chosen}))
    return Sweep(name=name, source=source, base_dir=base_dir, axes=axes, points=points)


def load_sweep(sweep: str | Path | dict | Sweep) -> Sweep:
    """A sweep from a YAML path or a dict (relative paths in a dict are taken from the CWD)."""
    if isinstance(sweep, Sweep):
        return sweep
    if isinstance(sweep, dict):
        return expand(sweep, "sweep", None)
    p = Path(sweep)
    return expand(_read_yaml(p, "sweep"), str(p), p.resolve().parent)


# ----------------------------------------------------------------------- running
def run_point(point: Point, base_dir: Path | None) -> list[dict]:
    """The rows of one point; an exception becomes one row with status 'error'."""
    lead = {"point": point.index, "point_id": point.point_id, "status": "ok", "error": None, **point.axes}
    sc = point.scenario
    try:
        res = run_scenario(sc, profile=point.profile, base_dir=base_dir)
        reuse = max_reuse_factors(res.steps, sc.engine.warmup_steps)
    except Exception as e:  # noqa: BLE001  a failing point is recorded and the sweep goes on
        return [{**lead, "status": "error", "error": f"{type(e).__name__}: {e}"}]
    ctx = scenario_context(sc, res.profile)     # the profile it ran on (what-ifs applied)
    ctx["decision_warnings"] = "\n".join(res.decision["warnings"])
    rows = []
    for r in res.summary:
        row = dict(lead)
        rest = {**ctx, **policy_context(sc, r["policy"]), **flatten_summary(r),
                "max_reuse_factor": reuse.get((r["policy"], r["batch_size"]))}
        row.update((k, v) for k, v in rest.items() if k not in point.axes)
        rows.append(row)
    return rows


def run_chunk(points: list[Point], base_dir: Path | None) -> list[tuple[list[dict], float]]:
    """Run points one after the other: per point, its rows and its compute seconds."""
    out = []
    for p in points:
        t0 = time.perf_counter()
        rows = run_point(p, base_dir)
        out.append((rows, time.perf_counter() - t0))
    return out


def chunk_size(n: int, parallel: int) -> int:
    """Points per task: about 8 tasks per worker (balance), at most MAX_CHUNK (progress, loss)."""
    return max(1, min(MAX_CHUNK, math.ceil(n / (parallel * 8))))


def work_estimate(sc: Scenario) -> int:
    """Rough relative cost of a point (routed requests simulated), to start the longest first."""
    return (sc.replications * sc.trace.steps * sum(sc.batch_sizes) * len(sc.policies)
            * sc.model.num_layers * sc.model.top_k)


def _chunks(points: list[Point], size: int) -> list[list[Point]]:
    """Tasks of ``size`` points, the most expensive first (the last tasks are then short)."""
    ordered = sorted(points, key=lambda p: -work_estimate(p.scenario))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


OnChunk = Callable[[list[tuple[list[dict], float]]], None]


def _run_local(points: list[Point], base_dir, workers: int, size: int | None, on_chunk: OnChunk) -> None:
    chunks = _chunks(points, size or chunk_size(len(points), workers))
    if workers == 1:
        for c in chunks:
            on_chunk(run_chunk(c, base_dir))
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    pool = ProcessPoolExecutor(workers, mp_context=ctx)
    try:
        futures = [pool.submit(run_chunk, c, base_dir) for c in chunks]
        for f in as_completed(futures):
            on_chunk(f.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def import_ray():
    """``ray``, or an InputError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError("command line", "--backend", "ray is not installed: pip install 'simmoe[ray]'") from None
    return ray


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:       # not Linux
        return os.cpu_count() or 1


def cap_workers(requested: int, points: int, ncores: int | None = None) -> tuple[int, str | None]:
    """Workers to start: at most one per point to run and one per core; with a note when capped."""
    ncores = ncores or cores()
    n = max(1, min(requested, points, ncores))
    if n == requested:
        return n, None
    why = ([f"{points} point{'s' if points != 1 else ''} to run"] if n == points else []) + (
        [f"{ncores} core{'s' if ncores != 1 else ''}"] if n == ncores else [])
    return n, f"note: {requested} workers asked for, {n} started ({' and '.join(why)})"


RAY_CONNECT_TIMEOUT_S = 5.0
_RAY_ADDRESS = re.compile(r"^(?:ray://)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")


def check_ray_address(address: str, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Refuse an address that is not ``host:port``, ``ray://host:port`` or ``auto``, and one
    that does not accept a connection within ``timeout_s`` (Ray itself retries for minutes)."""
    if address == "auto":
        return
    m = _RAY_ADDRESS.match(address)
    if not m or not 0 < int(m["port"]) < 65536:
        raise InputError("command line", "--address", f"{address!r} is not a Ray address "
                                                      "(write host:port, ray://host:port or auto)")
    try:
        socket.create_connection((m["host"].strip("[]"), int(m["port"])), timeout=timeout_s).close()
    except OSError as e:
        raise InputError("command line", "--address", f"cannot reach the Ray cluster at {address} within "
                                                      f"{timeout_s:g} s: {e.strerror or e}") from None


@contextmanager
def _environ(**values: str | None):
    """Set (None: unset) environment variables for the block (Ray reads its settings there)."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _stderr_to_file():
    """Ray's C++ client logs a line per retry on file descriptor 2: keep them out of the terminal."""
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


@contextmanager
def _loopback_node(ray):
    """Make Ray take 127.0.0.1 as this node's address while it starts a local cluster.

    Ray's servers bind to loopback only when the node's address is 127.0.0.1 (GCS:
    ``listen_to_localhost_only = node_ip_address == "127.0.0.1"`` in gcs_server.cc; the raylet
    and the workers likewise), but ``ray.init(_node_ip_address="127.0.0.1")`` alone is turned
    into the machine's address by ``services.resolve_ip_for_localhost``, which keeps loopback
    only where ``ray_constants.ENABLE_RAY_CLUSTER`` is off (Ray's setting
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when ray is imported). So the start runs with
    that setting off, in the environment (for Ray's own processes) and in the imported module,
    both restored afterwards."""
    consts = getattr(getattr(ray, "_private", None), "ray_constants", None)
    saved = getattr(consts, "ENABLE_RAY_CLUSTER", None)
    with _environ(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"):
        if consts is not None:
            consts.ENABLE_RAY_CLUSTER = False
        try:
            yield
        finally:
            if consts is not None:
                consts.ENABLE_RAY_CLUSTER = saved


LOOPBACK = "127.0.0.1"


def _ray_init(ray, address: str | None, workers: int, stack: ExitStack) -> None:
    """Connect to the cluster at ``address`` (checked, retried at most RAY_CONNECT_TIMEOUT_S), or
    start a local Ray bound to 127.0.0.1 (:func:`_loopback_node`: GCS, raylet, workers and
    agents listen on loopback only), without a dashboard, and with Ray's token authentication
    on (Ray's token: ``RAY_AUTH_TOKEN``, else ``~/.ray/auth_token``, which Ray creates if
    missing). With ``RAY_AUTH_MODE`` unset, Ray turns token authentication on for a cluster it
    starts (and reloads its settings; set to ``token`` beforehand it would not), so a
    ``RAY_AUTH_MODE=disabled`` is unset for the start. The token is Ray's own: Ray caches it
    per process, so one of simmoe's would break a later ``ray.init`` of the caller."""
    import logging

    opts = {"include_dashboard": False, "logging_level": logging.ERROR}
    try:
        if address:
            check_ray_address(address)
            with _environ(RAY_gcs_server_port_wait_time_s=str(int(RAY_CONNECT_TIMEOUT_S))), _stderr_to_file():
                ray.init(address=address, **opts)
        else:
            stack.enter_context(_environ(RAY_AUTH_MODE=None))
            with _loopback_node(ray):
                ray.init(num_cpus=workers, _node_ip_address=LOOPBACK, **opts)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError("command line", "--address" if address else "--backend",
                         f"cannot {'reach' if address else 'start'} Ray: {first}") from None
    stack.callback(ray.shutdown)


def _run_ray(points: list[Point], base_dir, workers: int, address: str | None, size: int | None,
             on_chunk: OnChunk) -> None:
    ray = import_ray()
    with ExitStack() as stack:
        if not ray.is_initialized():
            _ray_init(ray, address, workers, stack)
        cpus = max(1, int(ray.cluster_resources().get("CPU", workers)))
        remote = ray.remote(num_cpus=1)(run_chunk)
        pending = [remote.remote(c, base_dir) for c in _chunks(points, size or chunk_size(len(points), cpus))]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            on_chunk(ray.get(done[0]))


# ------------------------------------------------------------------------ storage
class ResultStore:
    """The sweep's output folder: the manifest, the part files and the consolidated results."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.parts = self.out / "parts"
        try:
            self.parts.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(str(self.out), "--out", f"cannot write here: {e.strerror or e}") from None
        clean_stale(self.parts)   # partials of part files left by a killed run

    def write_manifest(self, sweep: Sweep) -> None:
        write_text(self.out / "sweep.json", json.dumps(sweep.manifest(), indent=1) + "\n")

    def append(self, rows: list[dict]) -> None:
        """One part file holding ``rows`` (all rows of some finished points)."""
        if not rows:
            return
        cols: dict[str, None] = {}
        for r in rows:
            cols.update(dict.fromkeys(r))
        table = pa.table({c: [r.get(c) for r in rows] for c in cols})
        name = f"part-{rows[0]['point']:07d}-{uuid.uuid4().hex[:8]}.parquet"
        write_with(self.parts / name, lambda p: pq.write_table(table, p))

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet"))

    def _index(self, files: list[Path]) -> dict[str, tuple[int, str]]:
        """point id -> (index in ``files``, status) of its record: 'ok' wins over 'error',
        else the first one (an error retried with ``retry_failed`` is recorded twice)."""
        best: dict[str, tuple[int, str]] = {}
        for i, f in enumerate(files):
            t = pq.read_table(f, columns=["point_id", "status"])
            for pid, st in zip(t["point_id"].to_pylist(), t["status"].to_pylist()):
                if pid not in best or (st == "ok" and best[pid][1] != "ok"):
                    best[pid] = (i, st)
        return best

    def finished(self) -> dict[str, str]:
        """point id -> status of every point recorded in the parts."""
        return {pid: st for pid, (_, st) in self._index(self._part_files()).items()}

    def collect(self, ids: Iterable[str]) -> pa.Table | None:
        """The rows of points ``ids`` from the parts, in point order (None if there are none)."""
        files = self._part_files()
        wanted = set(ids)
        best = {pid: i for pid, (i, _) in self._index(files).items() if pid in wanted}
        kept = []
        for i in sorted(set(best.values())):
            t = pq.read_table(files[i])
            kept.append(t.filter(pa.array([best.get(pid) == i for pid in t["point_id"].to_pylist()])))
        if not kept:
            return None
        table = pa.concat_tables(kept, promote_options="permissive")
        return table.take(pc.sort_indices(table, [("point", "ascending")]))

    def write_results(self, table: pa.Table) -> Path:
        path = self.out / "results.parquet"
        write_with(path, lambda p: pq.write_table(table, p))
        return path


def read_results(out: str | Path) -> tuple[pd.DataFrame, dict]:
    """A sweep folder's rows (results.parquet, else whatever the parts hold) and its manifest."""
    out = Path(out)
    manifest_path = out / "sweep.json"
    manifest = load_json(manifest_path, "sweep.json")
    if (not isinstance(manifest, dict) or not isinstance(manifest.get("points"), list)
            or not isinstance(manifest.get("axes"), list)
            or not all(isinstance(p, dict) and isinstance(p.get("point_id"), str) for p in manifest["points"])
            or not all(isinstance(a, dict) and isinstance(a.get("path"), str) for a in manifest["axes"])):
        raise InputError(str(manifest_path), "points", "not a sweep manifest (needs lists 'axes' and 'points' "
                                                       "of mappings with 'path' and 'point_id')")
    results = out / "results.parquet"
    try:
        if results.exists():
            check_input_file(results, "results.parquet")
            return pd.read_parquet(results), manifest
        table = ResultStore(out).collect(p["point_id"] for p in manifest["points"])
    except (pa.ArrowException, OSError, ValueError) as e:
        where = results if results.exists() else out / "parts"
        raise InputError(str(where), "parquet", f"unreadable results ({type(e).__name__}: {e})") from None
    return (table.to_pandas() if table is not None else pd.DataFrame()), manifest


def write_sweep_decision(df: pd.DataFrame, axes: list[str], out: Path) -> dict:
    """OUT/decision.json and OUT/decision.csv: the decision of every finished point per batch
    size (:func:`simulator.decision.sweep_decision`); returns it."""
    from .atomic import write_text
    from .decision import SWEEP_COLUMNS, sweep_decision
    from .output import provenance

    dec = sweep_decision(df.to_dict("records") if "baseline" in df.columns else [], axes)
    doc = {"format": "simmoe-sweep-decision", "version": 1, **dec, "provenance": provenance()}
    write_text(out / "decision.json", json.dumps(doc, indent=1, default=_json_value) + "\n")
    cols = ["point", *dec["axes"], *SWEEP_COLUMNS]
    write_text(out / "decision.csv", pd.DataFrame(dec["per_point"], columns=cols).to_csv(index=False))
    return dec


def _json_value(v):
    """numpy scalars in a decision (from Parquet rows) as plain numbers."""
    return v.item() if hasattr(v, "item") else str(v)


# -------------------------------------------------------------------------- entry
def sweep(sweep_file: str | Path | dict | Sweep, *, backend: str = "local", workers: int = 1, address: str | None = None,
          out: str | Path | None = None, progress: Callable[[int, int, int], None] | None = None,
          retry_failed: bool = False, chunk: int | None = None,
          notice: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Run a sweep (file path, dict or loaded :class:`Sweep`) and return its rows, one per (point, policy, batch size).

    ``backend``: "local" (``workers`` processes; 1 runs in this process) or "ray" (a Ray
    cluster at ``address``, or a local Ray with ``workers`` CPUs). ``out``: the results folder
    [default ``results/<sweep name>``]; points already finished there are not run again
    (failed ones are, with ``retry_failed``). ``progress(done, total, failed)`` is called as
    points finish. ``chunk``: points per task (default: automatic). ``workers`` is capped by the
    points to run and the cores (:func:`cap_workers`); ``notice`` gets that note. The DataFrame's
    ``attrs["sweep"]`` holds counts and timings of this run (never written to Parquet), ``attrs["decision"]``
    the decision per point and batch size (also written to OUT/decision.json and OUT/decision.csv).
    """
    t_start = time.perf_counter()
    if backend not in BACKENDS:
        raise InputError("command line", "--backend", f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if not isinstance(workers, int) or workers < 1:
        raise InputError("command line", "--workers", "needs a positive number of workers")
    if backend == "ray":
        import_ray()
        if address:
            check_ray_address(address)   # before anything: a bad address is one line, within seconds
    sw = load_sweep(sweep_file)
    store = ResultStore(Path(out) if out else results_dir(sw.name))
    store.write_manifest(sw)
    status = store.finished()
    redo = ("ok",) if retry_failed else ("ok", "error")
    todo = [p for p in sw.points if status.get(p.point_id) not in redo]
    total = len(sw.points)
    kept_errors = sum(1 for p in sw.points if status.get(p.point_id) == "error") if not retry_failed else 0
    state = {"done": total - len(todo), "failed": kept_errors, "compute_s": 0.0}

    def on_chunk(results: list[tuple[list[dict], float]]) -> None:
        store.append([row for rows, _ in results for row in rows])
        for rows, secs in results:
            state["done"] += 1
            state["failed"] += rows[0]["status"] == "error"
            state["compute_s"] += secs
        if progress:
            progress(state["done"], total, state["failed"])

    if progress:
        progress(state["done"], total, state["failed"])
    if todo and not (backend == "ray" and address):   # a cluster's own CPUs are used there
        workers, note = cap_workers(workers, len(todo))
        if note and notice:
            notice(note)
    if todo:
        if backend == "local":
            _run_local(todo, sw.base_dir, workers, chunk, on_chunk)
        else:
            _run_ray(todo, sw.base_dir, workers, address, chunk, on_chunk)
    table = store.collect(p.point_id for p in sw.points)
    store.write_results(table)
    df = table.to_pandas()
    decision = write_sweep_decision(df, [a.path for a in sw.axes], store.out)
    df.attrs["sweep"] = {"name": sw.name, "out": str(store.out), "points": total, "ran": len(todo),
                         "skipped": total - len(todo), "failed": state["failed"], "backend": backend,
                         "workers": workers, "wall_s": time.perf_counter() - t_start,
                         "compute_s": state["compute_s"]}
    df.attrs["decision"] = decision
    return df
