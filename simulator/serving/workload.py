"""Requests of a serving run: when they arrive, how long their prompts and outputs are, and
which experts each of their tokens routes to.

Everything is drawn from NumPy generators seeded by (scenario seed, replication, stream), so
one scenario and seed give the same requests bit for bit, and a request's routing depends on
its own id only (not on when the scheduler admits it):

- arrivals (ms): Poisson (exponential gaps), bursts (Poisson during the on-periods of an
  on/off cycle), gamma gaps of a stated coefficient of variation, or a CSV/JSONL file;
- lengths: fixed, uniform, lognormal (clipped) or an empirical table;
- routing per request (rows: the prompt's tokens, then one per decode step after the first
  output token, ``prompt + output - 1`` rows): the scenario's synthetic generator with its
  knobs (the per-layer popularity ranking and the cross-layer maps shared by every request,
  the draws the request's own), or one recorded sequence per request (``trace.sequences``;
  rows reused cyclically when the request needs more than the sequence holds).
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..safe_load import read_text
from .spec import MAX_REQUESTS, MAX_SECONDS, MAX_TOKENS, ArrivalSpec, LengthSpec, WorkloadSpec

#: the largest arrivals file read
MAX_WORKLOAD_FILE = 64 << 20
FILE_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")


@dataclass(frozen=True)
class Request:
    rid: int
    arrival_ms: float
    prompt: int
    output: int

    @property
    def kv_tokens(self) -> int:
        """Tokens this request holds in the KV cache at its end (prompt and every output but
        the last, which is never fed back)."""
        return self.prompt + self.output - 1


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *stream])))


# ------------------------------------------------------------------------------- lengths
def draw_lengths(spec: LengthSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    if spec.kind == "fixed":
        return np.full(n, spec.value, dtype=np.int64)
    if spec.kind == "uniform":
        return rng.integers(spec.min, spec.max + 1, size=n, dtype=np.int64)
    if spec.kind == "lognormal":   # mean tokens -> mu of the log: mean = exp(mu + sigma^2 / 2)
        mu = math.log(spec.mean) - spec.sigma ** 2 / 2
        x = np.rint(rng.lognormal(mu, spec.sigma, size=n))
        return np.clip(x, spec.min, spec.upper).astype(np.int64)
    vals = np.asarray(spec.values, dtype=np.int64)
    w = np.asarray(spec.weights if spec.weights is not None else [1.0] * len(vals), dtype=float)
    return vals[rng.choice(len(vals), size=n, p=w / w.sum())]


# ------------------------------------------------------------------------------ arrivals
def draw_arrivals(spec: ArrivalSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    """Arrival times in ms, ascending, the first gap drawn like the others."""
    mean_gap = 1e3 / spec.rate
    if spec.kind == "poisson":
        return np.cumsum(rng.exponential(mean_gap, size=n))
    if spec.kind == "gamma":
        shape = 1.0 / spec.cv ** 2
        return np.cumsum(rng.gamma(shape, mean_gap / shape, size=n))
    # burst: Poisson time on the on-periods' clock, mapped onto the wall clock
    on, off = spec.on_s * 1e3, spec.off_s * 1e3
    busy = np.cumsum(rng.exponential(mean_gap, size=n))
    return busy + np.floor(busy / on) * off


def read_arrivals_file(path: Path, limit: int) -> list[tuple[float, int, int]]:
    """``(arrival_ms, prompt, output)`` per line of a CSV (header ``arrival_s,prompt_tokens,
    output_tokens``) or JSONL file (one object with those keys per line); one clear line per
    bad field; at most ``limit`` requests are read."""
    src = str(path)
    text = read_text(path, "workload.arrivals.path", MAX_WORKLOAD_FILE)
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    rows: list[dict] = []
    if jsonl:
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
            except ValueError as e:
                raise InputError(src, f"line {i}", f"not JSON ({e})") from None
            if not isinstance(obj, dict):
                raise InputError(src, f"line {i}", "must be a JSON object with " + ", ".join(FILE_COLUMNS))
            rows.append((i, obj))
            if len(rows) >= limit:
                break
    else:
        rd = csv.DictReader(io.StringIO(text))
        header = rd.fieldnames or []
        missing = [c for c in FILE_COLUMNS if c not in header]
        if missing:
            raise InputError(src, "header", f"needs columns {', '.join(FILE_COLUMNS)} (missing {missing[0]})")
        for row in rd:
            rows.append((rd.line_num, row))
            if len(rows) >= limit:
                break
    if not rows:
        raise InputError(src, "workload.arrivals.path", "holds no request")
    out = []
    last = -math.inf
    for line, row in rows:
        unknown = sorted(set(row) - set(FILE_COLUMNS)) if jsonl else []
        if unknown:
            raise InputError(src, f"line {line}: {unknown[0]}", "unknown key")
        vals = []
        for c in FILE_COLUMNS:
            v = row.get(c)
            where = f"line {line}: {c}"
            if v is None or v == "":
                raise InputError(src, where, "missing")
            try:
                x = float(v) if c == "arrival_s" else _int(v)
            except (TypeError, ValueError):
                raise InputError(src, where, f"{str(v)[:40]!r} is not a number") from None
            if c == "arrival_s":
                if not math.isfinite(x) or not 0 <= x <= MAX_SECONDS:
                    raise InputError(src, where, f"must be a time in [0, {MAX_SECONDS:g}] seconds")
            elif not 1 <= x <= MAX_TOKENS:
                raise InputError(src, where, f"must be 1..{MAX_TOKENS:,} tokens")
            vals.append(x)
        if vals[0] < last:
            raise InputError(src, f"line {line}: arrival_s", "arrivals must not go back in time")
        last = vals[0]
        out.append((vals[0] * 1e3, int(vals[1]), int(vals[2])))
    return out


def _int(v) -> int:
    if isinstance(v, bool):
        raise ValueError(v)
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError(v)
        return int(v)
    if isinstance(v, int):
        return v
    s = str(v).strip()
    return int(s)


def make_requests(w: WorkloadSpec, seed: int, replication: int, base_dir: Path | None = None) -> list[Request]:
    """The run's requests, in arrival order (ties: by id)."""
    if w.arrivals.kind == "file":
        p = Path(w.arrivals.path)
        if base_dir is not None and not p.is_absolute():
            p = base_dir / p
        rows = read_arrivals_file(p, min(w.requests, MAX_REQUESTS))
        return [Request(i, a, pr, o) for i, (a, pr, o) in enumerate(rows)]
    n = w.requests
    arr = draw_arrivals(w.arrivals, n, _rng(seed, replication, 1))
    prompt = draw_lengths(w.prompt, n, _rng(seed, replication, 2))
    output = draw_lengths(w.output, n, _rng(seed, replication, 3))
    return [Request(i, float(arr[i]), int(prompt[i]), int(output[i])) for i in range(n)]


# ------------------------------------------------------------------------------- routing
class SyntheticRouting:
    """A request's routing from the scenario's generator: the model-wide parts of the sampler
    (popularity ranking, cross-layer maps) from the scenario seed, each request's draws from
    its own seed."""

    def __init__(self, sc, seed: int, replication: int):
        from ..traces.synthetic import _Sampler

        t, m = sc.trace, sc.model
        if t.generator == "item_copy":
            raise InputError(f"scenario {sc.name}", "trace.generator",
                             "item_copy copies experts between the items of one batch; a serving run "
                             "routes each request alone (use another generator)")
        self.sampler = _Sampler(num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k, batch_size=1,
                                steps=1, seed=seed, generator=t.generator, zipf=t.zipf, temporal=t.temporal,
                                batch_locality=t.batch_locality, batch_pool=t.batch_pool,
                                cross_layer=t.cross_layer, prefill_tokens=0)
        self.seed, self.replication = seed, replication

    def rows(self, req: Request) -> np.ndarray:
        s = self.sampler
        s.rng = _rng(self.seed, self.replication, 4, req.rid)
        s.P, s.S = req.prompt, max(1, req.output - 1)
        return s.trace().experts[:req.kv_tokens]


class RecordedRouting:
    """One recorded sequence per request (a seeded order of the selected sequences, wrapping
    around); its rows reused cyclically when the request is longer."""

    def __init__(self, sc, seed: int, replication: int, base_dir: Path | None):
        from ..traces.real import detect_format, open_sequences, resolve_source, split_indices

        spec = sc.trace.sequences
        path, from_env = resolve_source(spec.path, base_dir)
        if not path.exists():
            raise InputError(str(path), "trace.sequences.path", "not found")
        fmt = detect_format(path) if from_env or spec.format == "auto" else spec.format
        self.ss = ss = open_sequences(path, fmt)
        if ss.num_experts > sc.model.num_experts or ss.num_layers != sc.model.num_layers or ss.top_k != sc.model.top_k:
            raise InputError(str(path), "model", f"sequences have {ss.num_layers} layers, top-{ss.top_k} of "
                                                 f"{ss.num_experts}; model {sc.model.name} has {sc.model.num_layers}, "
                                                 f"top-{sc.model.top_k} of {sc.model.num_experts}")
        idx = split_indices(ss.num_sequences, spec.split, spec.max_sequences)
        idx = idx[ss.lengths[idx] > 0]
        if len(idx) == 0:
            raise InputError(str(path), "trace.sequences", "no non-empty sequence selected")
        self.order = idx[_rng(seed, replication, 5).permutation(len(idx))]

    def rows(self, req: Request) -> np.ndarray:
        seq = np.asarray(self.ss.sequence(int(self.order[req.rid % len(self.order)])))
        reps = -(-req.kv_tokens // len(seq))
        return np.concatenate([seq] * reps)[:req.kv_tokens] if reps > 1 else seq[:req.kv_tokens]


def routing_source(sc, seed: int, replication: int, base_dir: Path | None = None):
    t = sc.trace
    if t.generator:
        return SyntheticRouting(sc, seed, replication)
    if t.sequences is not None:
        return RecordedRouting(sc, seed, replication, base_dir)
    raise InputError(f"scenario {sc.name}", "trace.path", "a serving run routes each request on its own: give "
                                                       "trace.generator or trace.sequences, not a batched .npz")
