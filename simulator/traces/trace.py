"""The routing trace: which experts each token of each step chose at each MoE layer.

In memory (:class:`Trace`), a trace is ragged over steps so that decode steps (one token per
sequence) and prefill steps (all prompt tokens of each sequence) share one form:

- ``experts``: int16 array ``(tokens, layers, top_k)``: the routed experts of every token, all
  steps concatenated, each row's ``top_k`` ids distinct and in ``[0, num_experts)``;
- ``step_offsets``: int64 ``(steps + 1,)``: step ``s`` is rows ``step_offsets[s]:step_offsets[s+1]``;
- ``seq``: int32 ``(tokens,)``: the sequence each row belongs to (a batch item in decode);
- ``phase``: uint8 ``(steps,)``: 0 = decode step, 1 = prefill step;
- ``num_experts`` and ``meta`` (a JSON-able dict: generator, seed, source, ...).

On disk it is one ``.npz`` file (``numpy.savez_compressed``) holding those arrays plus
``format = "simmoe-trace"``, ``version = 1``, ``num_experts`` and ``meta_json``; it is read
back with ``allow_pickle=False``. :func:`load_trace` checks every field and raises
:class:`~simulator.errors.InputError` naming it.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import InputError

TRACE_FORMAT = "simmoe-trace"
TRACE_VERSION = 1


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
        if off.ndim != 1 or len(off) < 1 or off[0] != 0 or off[-1] != len(e) or np.any(np.diff(off) <= 0):
            raise InputError(source, "step_offsets",
                             "must start at 0, rise strictly and end at the number of token rows")
        if self.seq.shape != (len(e),):
            raise InputError(source, "seq", f"must have one entry per token row ({len(e)})")
        if self.phase.shape != (self.num_steps,) or (self.phase.size and self.phase.max() > 1):
            raise InputError(source, "phase", f"must hold 0 (decode) or 1 (prefill) per step ({self.num_steps})")
        return self

    # ---- persistence -----------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write atomically: a crash leaves either the old file or the new one."""
        path = Path(path)
        with atomic_path(path, "--out") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(
                f, format=np.array(TRACE_FORMAT), version=np.array(TRACE_VERSION),
                experts=self.experts.astype(np.int16), step_offsets=self.step_offsets.astype(np.int64),
                seq=self.seq.astype(np.int32), phase=self.phase.astype(np.uint8),
                num_experts=np.array(self.num_experts), meta_json=np.array(json.dumps(self.meta, sort_keys=True)),
            )
        return path


_KEYS = ("format", "version", "experts", "step_offsets", "seq", "phase", "num_experts", "meta_json")


def load_trace(path: str | Path) -> Trace:
    """Read and check a ``.npz`` trace; bad files raise InputError naming the field."""
    src = str(path)
    p = Path(path)
    if not p.exists():
        raise InputError(src, "trace", "file not found")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in _KEYS if k not in z.files]
            if missing:
                raise InputError(src, missing[0], "missing from the trace file (not a simmoe trace?)")
            if str(z["format"]) != TRACE_FORMAT:
                raise InputError(src, "format", f"expected {TRACE_FORMAT!r}, got {str(z['format'])!r}")
            if int(z["version"]) != TRACE_VERSION:
                raise InputError(src, "version", f"unsupported trace version {int(z['version'])}")
            arrays = {k: z[k] for k in ("experts", "step_offsets", "seq", "phase")}
            num_experts = int(z["num_experts"])
            meta = json.loads(str(z["meta_json"]))
    except InputError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        raise InputError(src, "trace", f"malformed or truncated trace file ({type(e).__name__}: {e})") from None
    return Trace(num_experts=num_experts, meta=meta, **arrays).validate(src)


def concat_steps(parts: list[tuple[np.ndarray, np.ndarray, int]], num_experts: int, meta: dict) -> Trace:
    """Build a trace from per-step ``(routing (n, L, k), seq ids (n,), phase)`` parts."""
    experts = np.concatenate([p[0] for p in parts]).astype(np.int16, copy=False)
    seq = np.concatenate([p[1] for p in parts]).astype(np.int32, copy=False)
    sizes = np.array([len(p[0]) for p in parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    phase = np.array([p[2] for p in parts], dtype=np.uint8)
    return Trace(experts=experts, step_offsets=offsets, seq=seq, phase=phase,
                 num_experts=num_experts, meta=meta)
