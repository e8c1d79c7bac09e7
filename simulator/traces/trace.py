"""The routing trace: which experts each token of each step chose at each MoE layer.

In memory (:class:`Trace`), a trace is ragged over steps so that decode steps (one token per
sequence) and prefill steps (all prompt tokens of each sequence) share one form:

- ``experts``: integer array ``(tokens, layers, top_k)`` of :func:`expert_dtype` (int16 when the
  model's experts fit, else int32): the routed experts of every token, all steps concatenated,
  each row's ``top_k`` ids distinct and in ``[0, num_experts)``;
- ``step_offsets``: int64 ``(steps + 1,)``: step ``s`` is rows ``step_offsets[s]:step_offsets[s+1]``;
- ``seq``: int32 ``(tokens,)``: the sequence each row belongs to (a batch item in decode);
- ``phase``: uint8 ``(steps,)``: 0 = decode step, 1 = prefill step;
- ``num_experts`` and ``meta`` (a JSON-able dict: generator, seed, source, ...).

On disk it is one ``.npz`` file (``numpy.savez_compressed``) holding those arrays plus
``format = "simmoe-trace"``, ``version = 1``, ``num_experts`` and ``meta_json``; it is read
back with ``allow_pickle=False``. :func:`load_trace` checks every field (kinds, shapes, the
sizes each member declares against its bytes, integral scalars, phases 0/1) before reading the
arrays, and raises :class:`~simulator.errors.InputError` naming it.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import InputError
from ..models import MAX_EXPERTS
from ..safe_load import check_input_file, parse_json

TRACE_FORMAT = "simmoe-trace"
TRACE_VERSION = 1
#: the largest trace array (uncompressed bytes) a .npz may declare
MAX_TRACE_BYTES = 16 << 30
#: the largest ``meta_json`` text
MAX_META_BYTES = 1 << 20


def expert_dtype(num_experts: int) -> np.dtype:
    """The smallest signed integer type holding expert ids ``0 .. num_experts - 1``: int16 when
    they fit (every published model), else int32."""
    if num_experts <= np.iinfo(np.int16).max + 1:
        return np.dtype(np.int16)
    if num_experts <= np.iinfo(np.int32).max + 1:
        return np.dtype(np.int32)
    raise ValueError(f"{num_experts} experts do not fit int32 ids")


class RoutingShape:
    """Shape accessors of anything holding routing as ``experts (tokens, layers, top_k)``."""

    experts: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])


@dataclass(frozen=True, eq=False)
class Trace(RoutingShape):
    experts: np.ndarray
    step_offsets: np.ndarray
    seq: np.ndarray
    phase: np.ndarray
    num_experts: int
    meta: dict = field(default_factory=dict)

    # ---- shape -----------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.step_offsets) - 1

    @property
    def num_requests(self) -> int:
        """Routed (token, layer, expert) requests in the whole trace."""
        return int(self.experts.size)

    @property
    def max_step_tokens(self) -> int:
        return int(np.diff(self.step_offsets).max()) if self.num_steps else 0

    def step(self, s: int) -> np.ndarray:
        """Routing of step ``s``: ``(tokens_in_step, layers, top_k)``."""
        return self.experts[self.step_offsets[s]:self.step_offsets[s + 1]]

    # ---- checks ----------------------------------------------------------------------
    def validate(self, source: str = "trace") -> "Trace":
        e = self.experts
        if e.ndim != 3 or 0 in e.shape[1:]:
            raise InputError(source, "experts", f"must be (tokens, layers, top_k), got shape {e.shape}")
        if not np.issubdtype(e.dtype, np.integer):
            raise InputError(source, "experts", f"must be integers, got {e.dtype}")
        if self.num_experts <= 0:
            raise InputError(source, "num_experts", "must be positive")
        if self.top_k > self.num_experts:
            raise InputError(source, "experts", f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if e.size:
            lo, hi = int(e.min()), int(e.max())
            if lo < 0 or hi >= self.num_experts:
                bad = lo if lo < 0 else hi
                row = int(np.argwhere((e < 0) | (e >= self.num_experts))[0][0])
                raise InputError(source, "experts",
                                 f"expert id {bad} out of range [0, {self.num_experts}) at token row {row}")
            srt = np.sort(e, axis=2)
            dup = np.argwhere(srt[:, :, 1:] == srt[:, :, :-1])
            if len(dup):
                raise InputError(source, "experts",
                                 f"token row {int(dup[0][0])} layer {int(dup[0][1])} repeats an expert")
        off = self.step_offsets
        if (off.ndim != 1 or not np.issubdtype(off.dtype, np.integer) or len(off) < 1 or off[0] != 0
                or off.max() > len(e) or off[-1] != len(e) or np.any(np.diff(off.astype(np.int64)) <= 0)):
            raise InputError(source, "step_offsets",
                             "must be integers that start at 0, rise strictly and end at the number of token rows")
        seq = self.seq
        if seq.shape != (len(e),) or not np.issubdtype(seq.dtype, np.integer):
            raise InputError(source, "seq", f"must have one integer per token row ({len(e)})")
        if seq.size and (seq.min() < 0 or seq.max() > np.iinfo(np.int32).max):
            raise InputError(source, "seq", f"sequence ids must be in [0, {np.iinfo(np.int32).max}]")
        ph = self.phase
        if (ph.shape != (self.num_steps,) or not np.issubdtype(ph.dtype, np.integer)
                or (ph.size and (ph.min() < 0 or ph.max() > 1))):
            raise InputError(source, "phase", f"must hold 0 (decode) or 1 (prefill) per step ({self.num_steps})")
        return self

    # ---- persistence -----------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write atomically: a crash leaves either the old file or the new one."""
        path = Path(path)
        with atomic_path(path, "--out") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(
                f, format=np.array(TRACE_FORMAT), version=np.array(TRACE_VERSION),
                experts=self.experts.astype(expert_dtype(self.num_experts), copy=False), step_offsets=self.step_offsets.astype(np.int64),
                seq=self.seq.astype(np.int32), phase=self.phase.astype(np.uint8),
                num_experts=np.array(self.num_experts), meta_json=np.array(json.dumps(self.meta, sort_keys=True)),
            )
        return path


_KEYS = ("format", "version", "experts", "step_offsets", "seq", "phase", "num_experts", "meta_json")
#: per member: numpy kinds allowed ("i" signed, "u" unsigned integers; "U" text) and dimensions
_MEMBERS = {"format": ("U", 0), "version": ("iu", 0), "experts": ("iu", 3), "step_offsets": ("iu", 1),
            "seq": ("iu", 1), "phase": ("iu", 1), "num_experts": ("iu", 0), "meta_json": ("U", 0)}


def npy_header(z: zipfile.ZipFile, member: str, src: str, field: str,
               max_bytes: int = MAX_TRACE_BYTES) -> tuple[tuple, np.dtype]:
    """Shape and dtype a ``.npy`` member of a zip declares, checked against its stored size
    (before anything is allocated): no object arrays, no Fortran order, no size it lacks."""
    info = z.getinfo(member)
    with z.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise InputError(src, field, f"unsupported .npy version {version}")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        header_len = f.tell()
    if dtype.hasobject:
        raise InputError(src, field, "holds Python objects (refused: a trace holds numbers and text)")
    if fortran:
        raise InputError(src, field, "Fortran-ordered array (refused)")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > max_bytes:
        raise InputError(src, field, f"declares {nbytes:,} bytes, more than the {max_bytes:,} it may hold")
    if header_len + nbytes != info.file_size:
        raise InputError(src, field, f"declares shape {shape} of {dtype} ({nbytes:,} bytes) but stores "
                                     f"{info.file_size - header_len:,}")
    return shape, dtype


def _read_member(z: zipfile.ZipFile, key: str, src: str) -> np.ndarray:
    kinds, ndim = _MEMBERS[key]
    shape, dtype = npy_header(z, f"{key}.npy", src, key)
    if dtype.kind not in kinds or len(shape) != ndim:
        want = {"iu": "integers", "U": "text"}[kinds]
        raise InputError(src, key, f"must be {ndim}-d {want}, got {len(shape)}-d {dtype}")
    if key == "meta_json" and dtype.itemsize > MAX_META_BYTES * 4:
        raise InputError(src, key, f"longer than {MAX_META_BYTES:,} characters")
    with z.open(f"{key}.npy") as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def _scalar_int(a: np.ndarray, src: str, field: str, lo: int, hi: int) -> int:
    v = int(a)
    if not lo <= v <= hi:
        raise InputError(src, field, f"{v} out of range [{lo}, {hi}]")
    return v


def load_trace(path: str | Path) -> Trace:
    """Read and check a ``.npz`` trace; bad files raise InputError naming the field."""
    src = str(path)
    p = check_input_file(path, "trace")
    try:
        with zipfile.ZipFile(p) as z:
            names = set(z.namelist())
            missing = [k for k in _KEYS if f"{k}.npy" not in names]
            if missing:
                raise InputError(src, missing[0], "missing from the trace file (not a simmoe trace?)")
            fmt = str(_read_member(z, "format", src))
            if fmt != TRACE_FORMAT:
                raise InputError(src, "format", f"expected {TRACE_FORMAT!r}, got {fmt[:80]!r}")
            version = int(_read_member(z, "version", src))
            if version != TRACE_VERSION:
                raise InputError(src, "version", f"unsupported trace version {version}")
            num_experts = _scalar_int(_read_member(z, "num_experts", src), src, "num_experts", 1, MAX_EXPERTS)
            meta = parse_json(str(_read_member(z, "meta_json", src)), f"{src}: meta_json")
            if not isinstance(meta, dict):
                raise InputError(src, "meta_json", "must be a JSON object")
            arrays = {k: _read_member(z, k, src) for k in ("experts", "step_offsets", "seq", "phase")}
    except InputError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError, KeyError,
            NotImplementedError, RuntimeError) as e:
        raise InputError(src, "trace", f"malformed or truncated trace file ({type(e).__name__}: {e})") from None
    tr = Trace(num_experts=num_experts, meta=meta, **arrays).validate(src)
    return Trace(experts=tr.experts.astype(expert_dtype(num_experts), copy=False), step_offsets=tr.step_offsets.astype(np.int64), seq=tr.seq.astype(np.int32),
                 phase=tr.phase.astype(np.uint8), num_experts=num_experts, meta=meta)


def concat_steps(parts: list[tuple[np.ndarray, np.ndarray, int]], num_experts: int, meta: dict) -> Trace:
    """Build a trace from per-step ``(routing (n, L, k), seq ids (n,), phase)`` parts."""
    experts = np.concatenate([p[0] for p in parts]).astype(expert_dtype(num_experts), copy=False)
    seq = np.concatenate([p[1] for p in parts]).astype(np.int32, copy=False)
    sizes = np.array([len(p[0]) for p in parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    phase = np.array([p[2] for p in parts], dtype=np.uint8)
    return Trace(experts=experts, step_offsets=offsets, seq=seq, phase=phase,
                 num_experts=num_experts, meta=meta)
