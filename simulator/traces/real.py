"""Real recorded routing: a corpus of sequences, its importers, and batching into a Trace.

A recorded corpus is a :class:`SequenceSet`: every sequence's routing ``(tokens, layers,
top_k)``, concatenated. It is not a :class:`~simulator.traces.Trace` (which is already batched
into steps); :func:`batch_set` turns it into one for a batch size.

On disk a SequenceSet is one ``.npz`` file (format ``simmoe-sequences``, version 1) holding

- ``experts``: ``(tokens, layers, top_k)`` of :func:`~simulator.traces.trace.expert_dtype`
  (int16 when the experts fit, else int32), all sequences concatenated, stored
  uncompressed so that :func:`load_sequences` can memory-map it (a corpus larger than memory
  still opens);
- ``offsets``: int64 ``(sequences + 1,)``: sequence ``i`` is rows ``offsets[i]:offsets[i+1]``;
- ``names`` (str), ``prompt_lengths`` (int64, 0 = unknown), ``num_experts``, ``meta_json``.

:class:`SequenceWriter` writes that file one sequence at a time, so an import holds one
sequence in memory, whatever the corpus size. Importers (``--format``):

- ``layer-csv``: a folder of CSV files, one per sequence, columns ``Layer ID``, ``Batch
  Number``, ``Token``, ``Activated Expert IDs`` (``"[8, 26, 56, 57, 60, 43]"``), rows grouped
  by layer, tokens in order within a layer: the DeepSeek-V2-Lite Puffin layout.
- ``long-csv`` / ``parquet``: one row per (token, layer): columns ``sequence``, ``step``
  (or ``position``), ``layer``, optional ``token``, and the experts as one list column
  ``experts`` or as columns ``expert_0 .. expert_{k-1}``.
- ``jsonl``: one JSON object per (token, layer) with the same keys (serving-engine dumps;
  aliases: ``seq``/``request_id`` for sequence, ``pos`` for position, ``layer_id``,
  ``expert_ids``/``topk_ids``).
- ``simmoe``: an imported ``.npz`` (or a batched simmoe trace, split back into sequences).

Every malformed row raises :class:`~simulator.errors.InputError` naming the file and line:
non-UTF-8 text, CSV fields over the csv module's 128 KiB limit, JSONL lines over
:data:`MAX_LINE_BYTES`, corrupt Parquet; inputs that are not regular files are refused before
they are opened.
"""
from __future__ import annotations

import csv
import heapq
import io
import json
import os
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..atomic import atomic_path, cannot_write, partial_path, prepare_target
from ..errors import InputError
from ..models import MAX_EXPERTS
from ..safe_load import check_input_file, parse_json, utf8_error
from .trace import MAX_META_BYTES, MAX_TRACE_BYTES, TRACE_FORMAT, RoutingShape, Trace, expert_dtype, load_trace, npy_header

SEQUENCES_FORMAT = "simmoe-sequences"
SEQUENCES_VERSION = 1
from ..trace_formats import FORMATS  # noqa: E402  (re-exported)
#: sequence ``i`` (in corpus order) is in the test split when ``i % TEST_EVERY == TEST_EVERY - 1``
TEST_EVERY = 5
_CHUNK_BYTES = 1 << 18
#: the largest routing a sequences file may declare (memory-mapped, so it may exceed memory)
MAX_CORPUS_BYTES = 1 << 40
#: the longest JSONL line read
MAX_LINE_BYTES = 1 << 20


def ids_dtype(num_experts: int | None) -> np.dtype:
    """The dtype of parsed expert ids: the model's (:func:`expert_dtype`) when known, else one
    that holds any id up to MAX_EXPERTS."""
    return expert_dtype(num_experts or MAX_EXPERTS)


# ----------------------------------------------------------------------------- the corpus
@dataclass(frozen=True, eq=False)
class SequenceSet(RoutingShape):
    """Recorded sequences: routing ``(tokens, layers, top_k)`` of each, concatenated."""

    experts: np.ndarray
    offsets: np.ndarray
    num_experts: int
    names: np.ndarray
    prompt_lengths: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> np.ndarray:
        """Routing of sequence ``i``: ``(tokens, layers, top_k)``."""
        return self.experts[self.offsets[i]:self.offsets[i + 1]]

    def subset(self, indices: np.ndarray) -> "SequenceSet":
        """A new set holding the sequences ``indices`` (in that order), copied into memory."""
        indices = np.asarray(indices, dtype=np.int64)
        parts = [np.asarray(self.sequence(int(i))) for i in indices]
        lengths = np.array([len(p) for p in parts], dtype=np.int64)
        shape = (0, self.num_layers, self.top_k)
        experts = np.concatenate(parts) if parts else np.empty(shape, dtype=self.experts.dtype)
        return SequenceSet(experts=experts, offsets=np.concatenate([[0], np.cumsum(lengths)]),
                           num_experts=self.num_experts, names=self.names[indices],
                           prompt_lengths=self.prompt_lengths[indices], meta=dict(self.meta))

    def validate(self, source: str = "sequences") -> "SequenceSet":
        """Check shapes, offsets and every expert id (in chunks: a memory-mapped set stays on disk)."""
        e, off = self.experts, self.offsets
        if e.ndim != 3 or 0 in e.shape[1:]:
            raise InputError(source, "experts", f"must be (tokens, layers, top_k), got shape {e.shape}")
        if self.top_k > self.num_experts:
            raise InputError(source, "num_experts", f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if off.ndim != 1 or len(off) < 1 or off[0] != 0 or off[-1] != len(e) or np.any(np.diff(off) < 0):
            raise InputError(source, "offsets", "must start at 0, never fall and end at the number of token rows")
        n = self.num_sequences
        if self.names.shape != (n,) or self.prompt_lengths.shape != (n,):
            raise InputError(source, "names", f"names and prompt_lengths need one entry per sequence ({n})")
        rows = max(1, _CHUNK_BYTES // max(1, e.shape[1] * e.shape[2] * e.dtype.itemsize))
        for a in range(0, len(e), rows):
            _check_ids(np.asarray(e[a:a + rows]), self.num_experts, source, row0=a)
        return self

    def save(self, path: str | Path) -> Path:
        """Write atomically (through :class:`SequenceWriter`)."""
        with SequenceWriter(path, num_experts=self.num_experts, meta=self.meta) as w:
            for i in range(self.num_sequences):
                w.add(self.sequence(i), str(self.names[i]), int(self.prompt_lengths[i]))
        return Path(path)


def _check_ids(e: np.ndarray, num_experts: int, source: str, row0: int = 0, where: str = "token row") -> None:
    """Expert ids in ``[0, num_experts)`` and distinct within each (token, layer)."""
    if not np.issubdtype(e.dtype, np.integer):
        raise InputError(source, "experts", f"must be integers, got {e.dtype}")
    if not e.size:
        return
    bad = np.argwhere((e < 0) | (e >= num_experts))
    if len(bad):
        r, l, j = (int(x) for x in bad[0])
        raise InputError(source, f"{where} {row0 + r}",
                         f"layer {l}: expert id {int(e[r, l, j])} out of range [0, {num_experts})")
    srt = np.sort(e, axis=2)
    dup = np.argwhere(srt[:, :, 1:] == srt[:, :, :-1])
    if len(dup):
        raise InputError(source, f"{where} {row0 + int(dup[0][0])}", f"layer {int(dup[0][1])} repeats an expert")


# ------------------------------------------------------------------------------- writing
#: the writer's temporary raw routing: int32, narrowed to the model's dtype when the file is closed
_RAW = np.dtype("<i4")


class SequenceWriter:
    """Writes a ``simmoe-sequences`` .npz one sequence at a time.

    Routing goes to a temporary raw file next to the output; :meth:`close` streams it into the
    .npz and renames it into place, so memory holds one sequence and a crash leaves no partial
    output. Use as a context manager (an exception inside discards everything).
    """

    def __init__(self, path: str | Path, *, num_experts: int | None = None, meta: dict | None = None):
        self.path = Path(path)
        self.num_experts = num_experts
        self.meta = dict(meta or {})
        prepare_target(self.path, "--out")
        self._raw_path = partial_path(self.path)
        try:
            self._raw = open(self._raw_path, "xb")
        except OSError as e:
            raise cannot_write(self.path, "--out", e) from None
        self.shape: tuple[int, int] | None = None
        self.lengths: list[int] = []
        self.names: list[str] = []
        self.prompt_lengths: list[int] = []
        self.max_id = -1

    def add(self, experts: np.ndarray, name: str, prompt_length: int = 0) -> None:
        """Append one sequence's routing ``(tokens, layers, top_k)``."""
        e = np.asarray(experts)
        src = f"sequence {name}"
        if e.ndim != 3 or 0 in e.shape[1:]:
            raise InputError(src, "experts", f"must be (tokens, layers, top_k), got shape {e.shape}")
        if self.shape is None:
            self.shape = e.shape[1:]
        elif e.shape[1:] != self.shape:
            raise InputError(src, "experts", f"has {e.shape[1]} layers and top-{e.shape[2]}; earlier sequences "
                                             f"have {self.shape[0]} layers and top-{self.shape[1]}")
        _check_ids(e, self.num_experts or MAX_EXPERTS, src)
        if e.size:
            self.max_id = max(self.max_id, int(e.max()))
        try:
            self._raw.write(np.ascontiguousarray(e, dtype=_RAW).tobytes())
        except OSError as err:
            raise cannot_write(self.path, "--out", err) from None
        self.lengths.append(len(e))
        self.names.append(str(name))
        self.prompt_lengths.append(int(prompt_length))

    def close(self) -> Path:
        """Finish the .npz and move it into place."""
        try:
            self._raw.close()
        except OSError as e:
            self.abort()
            raise cannot_write(self.path, "--out", e) from None
        if self.shape is None:
            self.abort()
            raise InputError(str(self.path), "sequences", "no sequences to write")
        num_experts = self.num_experts or self.max_id + 1
        total = sum(self.lengths)
        try:
            with atomic_path(self.path, "--out") as tmp:
                with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                    with z.open("experts.npy", "w", force_zip64=True) as f, open(self._raw_path, "rb") as raw:
                        dtype = expert_dtype(num_experts).newbyteorder("<")
                        header = {"descr": dtype.str, "fortran_order": False, "shape": (total, *self.shape)}
                        np.lib.format.write_array_header_1_0(f, header)
                        buf = bytearray(_CHUNK_BYTES)
                        while n := raw.readinto(buf):
                            f.write(np.frombuffer(buf, dtype=_RAW, count=n // _RAW.itemsize).astype(dtype).tobytes())
                    small = {
                        "format": np.array(SEQUENCES_FORMAT), "version": np.array(SEQUENCES_VERSION),
                        "offsets": np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)]),
                        "names": np.array(self.names, dtype=str),
                        "prompt_lengths": np.array(self.prompt_lengths, dtype=np.int64),
                        "num_experts": np.array(num_experts),
                        "meta_json": np.array(json.dumps(self.meta, sort_keys=True)),
                    }
                    for key, arr in small.items():
                        data = io.BytesIO()
                        np.save(data, arr, allow_pickle=False)
                        z.writestr(f"{key}.npy", data.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
        finally:
            self._raw_path.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        """Discard everything written so far."""
        self._raw.close()
        self._raw_path.unlink(missing_ok=True)

    def __enter__(self) -> "SequenceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ------------------------------------------------------------------------------- reading
_KEYS = ("format", "version", "experts", "offsets", "names", "prompt_lengths", "num_experts", "meta_json")


def _npz_format(path: Path) -> str | None:
    """The ``format`` member of a simmoe .npz (sequences or trace), or None."""
    check_input_file(path, "file")
    try:
        with zipfile.ZipFile(path) as z:
            if "format.npy" not in z.namelist():
                return None
            with z.open("format.npy") as f:
                return str(np.lib.format.read_array(f, allow_pickle=False))
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise InputError(str(path), "file", f"not a readable .npz ({type(e).__name__}: {e})") from None


def _memmap_member(path: Path, z: zipfile.ZipFile, name: str) -> np.ndarray:
    """Memory-map an uncompressed .npy member of a zip; read it whole if compressed."""
    info = z.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        with z.open(name) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran or dtype.hasobject:
        raise ValueError(f"{name}: unsupported array layout")
    if 0 in shape:
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


#: per member of a sequences file: numpy kinds allowed and dimensions
_SEQ_MEMBERS = {"format": ("U", 0), "version": ("iu", 0), "experts": ("iu", 3), "offsets": ("iu", 1),
                "names": ("U", 1), "prompt_lengths": ("iu", 1), "num_experts": ("iu", 0), "meta_json": ("U", 0)}


def _check_member(z: zipfile.ZipFile, key: str, src: str) -> None:
    kinds, ndim = _SEQ_MEMBERS[key]
    most = MAX_CORPUS_BYTES if key == "experts" else MAX_TRACE_BYTES   # routing stays on disk (mmap)
    shape, dtype = npy_header(z, f"{key}.npy", src, key, most)
    if dtype.kind not in kinds or len(shape) != ndim:
        want = {"iu": "integers", "U": "text"}[kinds]
        raise InputError(src, key, f"must be {ndim}-d {want}, got {len(shape)}-d {dtype}")
    if key == "meta_json" and dtype.itemsize > MAX_META_BYTES * 4:
        raise InputError(src, key, f"longer than {MAX_META_BYTES:,} characters")


def load_sequences(path: str | Path, mmap: bool = True, check: bool = True) -> SequenceSet:
    """Read a ``simmoe-sequences`` .npz; ``mmap`` leaves the routing on disk; ``check`` scans
    every expert id (skip it only for a file :class:`SequenceWriter` has just checked)."""
    src = str(path)
    p = check_input_file(path, "sequences")
    try:
        with zipfile.ZipFile(p) as z:
            names = {n.removesuffix(".npy") for n in z.namelist()}
            missing = [k for k in _KEYS if k not in names]
            if missing:
                raise InputError(src, missing[0], "missing from the file (not a simmoe sequences file?)")
            small = {}
            for key in _KEYS:
                _check_member(z, key, src)
                if key != "experts":
                    with z.open(f"{key}.npy") as f:
                        small[key] = np.lib.format.read_array(f, allow_pickle=False)
            if str(small["format"]) != SEQUENCES_FORMAT:
                raise InputError(src, "format", f"expected {SEQUENCES_FORMAT!r}, got {str(small['format'])[:80]!r}")
            if int(small["version"]) != SEQUENCES_VERSION:
                raise InputError(src, "version", f"unsupported sequences version {int(small['version'])}")
            num_experts = int(small["num_experts"])
            if not 1 <= num_experts <= MAX_EXPERTS:
                raise InputError(src, "num_experts", f"{num_experts} out of range [1, {MAX_EXPERTS}]")
            if mmap:
                experts = _memmap_member(p, z, "experts.npy")
            else:
                with z.open("experts.npy") as f:
                    experts = np.lib.format.read_array(f, allow_pickle=False)
            meta = parse_json(str(small["meta_json"]), f"{src}: meta_json")
            if not isinstance(meta, dict):
                raise InputError(src, "meta_json", "must be a JSON object")
    except InputError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError, KeyError,
            NotImplementedError, RuntimeError) as e:
        raise InputError(src, "sequences", f"malformed or truncated file ({type(e).__name__}: {e})") from None
    off = small["offsets"]
    if off.size and (off.min() < 0 or off.max() > len(experts)):
        raise InputError(src, "offsets", "must start at 0, never fall and end at the number of token rows")
    ss = SequenceSet(experts=experts, offsets=off.astype(np.int64), num_experts=num_experts,
                     names=small["names"].astype(str), prompt_lengths=small["prompt_lengths"].astype(np.int64),
                     meta=meta)
    return ss.validate(src) if check else ss


def sequences_from_trace(trace: Trace) -> SequenceSet:
    """Split a batched trace back into its sequences (rows grouped by ``seq``, in step order);
    a sequence's prefill rows count as its prompt."""
    order = np.argsort(trace.seq, kind="stable")
    seq = trace.seq[order]
    ids, starts, lengths = np.unique(seq, return_index=True, return_counts=True)
    row_phase = np.repeat(trace.phase, np.diff(trace.step_offsets))[order]
    prompt = np.add.reduceat(row_phase.astype(np.int64), starts) if len(starts) else np.zeros(0, np.int64)
    return SequenceSet(experts=trace.experts[order], offsets=np.concatenate([[0], np.cumsum(lengths)]),
                       num_experts=trace.num_experts, names=ids.astype(str), prompt_lengths=prompt,
                       meta={"from_trace": trace.meta})


# ----------------------------------------------------------------------------- importers
#: a parsed sequence: (name, routing (tokens, layers, top_k) expert ids (ids_dtype), prompt length or 0)
Record = tuple[str, np.ndarray, int]


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _files(src: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if src.is_dir():
        files = sorted((p for p in src.iterdir() if p.is_file() and p.suffix.lower() in suffixes), key=_natural_key)
        if not files:
            raise InputError(str(src), "source", f"no {'/'.join(suffixes)} files in this folder")
        return files
    return [check_input_file(src, "source")]


def _short(v, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def parse_ids(text, source: str, where: str, num_experts: int | None) -> list[int]:
    """Expert ids from ``"[8, 26, 56]"``, ``"8 26 56"`` or a list; checked."""
    if isinstance(text, str):
        s = text.strip()
        if s.startswith("[") and s.endswith("]"):
            s = s[1:-1]
        try:
            ids = [int(x) for x in s.replace(",", " ").split()]
        except ValueError:
            raise InputError(source, where, f"expert ids {_short(text)} are not a list of integers") from None
    elif isinstance(text, (list, tuple, np.ndarray)):
        if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in text):
            raise InputError(source, where, f"expert ids {_short(list(text))} are not all integers")
        ids = [int(x) for x in text]
    else:
        raise InputError(source, where, f"expert ids must be a list, got {_short(text)}")
    if not ids:
        raise InputError(source, where, "no expert ids")
    if len(set(ids)) != len(ids):
        raise InputError(source, where, f"expert ids {_span(ids)} repeat an expert")
    if min(ids) < 0 or max(ids) >= (num_experts or MAX_EXPERTS):
        raise InputError(source, where, f"expert ids {_span(ids)} out of range [0, {num_experts or MAX_EXPERTS})")
    return ids


def _int(value, source: str, where: str, column: str) -> int:
    """An integer cell (int, integral float or decimal text)."""
    if value is None or value == "":
        raise InputError(source, where, f"no {column}")
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise InputError(source, where, f"{column} {_short(value)} is not an integer")


class _LayerIds:
    """The corpus's layer ids, fixed by its first sequence; later sequences must match."""

    def __init__(self):
        self.ids: list | None = None

    def check(self, ids: list, source: str, where: str) -> None:
        if self.ids is None:
            self.ids = ids
        elif ids != self.ids:
            raise InputError(source, where, f"layers {_span(ids)} differ from the corpus's layers {_span(self.ids)}")


def _span(ids: list) -> str:
    return f"{ids[0]}..{ids[-1]} ({len(ids)})" if len(ids) > 3 else str(ids)


@contextmanager
def _reading(src: str, where):
    """Decoding and parsing failures of a text source as InputError at ``where()`` (its line;
    for text that is not UTF-8, the line of the first bad byte)."""
    try:
        yield
    except UnicodeDecodeError:
        bad = utf8_error(src)
        line, byte = bad if bad else (where(), "?")
        raise InputError(src, f"line {line}" if bad else line, f"not UTF-8 text (byte {byte})") from None
    except (csv.Error, OSError, RecursionError, MemoryError) as e:
        if isinstance(e, csv.Error):
            msg = f"malformed CSV: {e}"
        else:
            msg = f"cannot read ({type(e).__name__}: {e})"
        raise InputError(src, where(), msg) from None


def _csv_line(rd) -> str:
    return f"line {rd.line_num + 1}"


def _csv_header(rd, src: str) -> list[str]:
    header = next(rd, None)
    if header is None:
        raise InputError(src, "line 1", "empty file (expected a header)")
    return header


def _rows(rd, header: list[str], src: str):
    """``(where, row)`` for each non-empty CSV row, each checked to have the header's width."""
    for row in rd:
        ln = f"line {rd.line_num}"
        if not row:
            continue
        if len(row) != len(header):
            raise InputError(src, ln, f"expected {len(header)} fields, found {len(row)}")
        yield ln, row

def _read_layer_csv(path: Path, layers: _LayerIds, num_experts: int | None) -> Iterator[Record]:
    """One CSV of the layer-major layout: yields one sequence per batch number."""
    src = str(path)
    with open(path, newline="", encoding="utf-8") as f:
        rd = csv.reader(f)
        with _reading(src, lambda: _csv_line(rd)):
            yield from _layer_csv_rows(path, rd, layers, num_experts)


def _layer_csv_rows(path: Path, rd, layers: _LayerIds, num_experts: int | None) -> Iterator[Record]:
    """The sequences of an open layer-major CSV reader."""
    src = str(path)
    header = _csv_header(rd, src)
    col = {h.strip().lower(): i for i, h in enumerate(header)}
    for need in ("layer id", "activated expert ids"):
        if need not in col:
            raise InputError(src, "line 1", f"no column {need.title()!r} (header: {', '.join(header)})")
    li, ei = col["layer id"], col["activated expert ids"]
    bi, ti = col.get("batch number"), col.get("token")
    groups: dict[int, dict[int, list]] = {}
    k = None
    for ln, row in _rows(rd, header, src):
        layer = _int(row[li], src, ln, "Layer ID")
        batch = _int(row[bi], src, ln, "Batch Number") if bi is not None else 0
        ids = parse_ids(row[ei], src, ln, num_experts)
        if k is None:
            k = len(ids)
        elif len(ids) != k:
            raise InputError(src, ln, f"{len(ids)} expert ids; earlier rows have {k}")
        g = groups.setdefault(batch, {}).setdefault(layer, ([], [], []))
        g[0].append(ids)
        g[1].append(row[ti] if ti is not None else None)
        g[2].append(rd.line_num)
    if not groups:
        raise InputError(src, "line 2", "no data rows")
    for batch in sorted(groups):
        by_layer = groups[batch]
        ids = sorted(by_layer)
        first = by_layer[ids[0]]
        for layer in ids[1:]:
            rows, toks, lines = by_layer[layer]
            if len(rows) != len(first[0]):
                raise InputError(src, f"line {lines[0]}", f"layer {layer} has {len(rows)} tokens, "
                                                          f"layer {ids[0]} has {len(first[0])}")
            if toks != first[1]:
                i = next(i for i, (a, b) in enumerate(zip(toks, first[1])) if a != b)
                raise InputError(src, f"line {lines[i]}", f"token {i} of layer {layer} is {toks[i]!r}, "
                                                          f"layer {ids[0]} has {first[1][i]!r}")
        layers.check(ids, src, f"line {first[2][0]}")
        arr = np.array([by_layer[layer][0] for layer in ids], dtype=ids_dtype(num_experts)).transpose(1, 0, 2)
        name = path.stem if len(groups) == 1 else f"{path.stem}#{batch}"
        yield name, np.ascontiguousarray(arr), 0


class _LongAssembler:
    """Builds sequences from long-form rows (one row per token and layer).

    Rows of one sequence must be contiguous. A token's place in its sequence is its
    ``position`` if given, else its ``step``; rows sharing (sequence, step, layer), as in a
    prefill step, are that step's tokens in order of appearance.
    """

    def __init__(self, source: str, layers: _LayerIds, num_experts: int | None):
        self.source, self.layers, self.num_experts = source, layers, num_experts
        self.current = None
        self.finished: set = set()
        self.rows: dict = {}        # (pos, layer) -> ids
        self.where: dict = {}       # (pos, layer) -> "line N"
        self.tokens: dict = {}      # pos -> token text/id (checked across layers)
        self.count: dict = {}       # (step, layer) -> rows seen (prefill order)
        self.k = None

    def add(self, seq, step, position, layer, ids, token, where: str) -> Record | None:
        """Add one row; returns the previous sequence when this row starts a new one."""
        done = None
        if seq != self.current:
            if seq in self.finished:
                raise InputError(self.source, where, f"sequence {seq!r} appears again: rows of a sequence "
                                                     "must be contiguous")
            done = self.finish()
            self.current = seq
        if self.k is None:
            self.k = len(ids)
        elif len(ids) != self.k:
            raise InputError(self.source, where, f"{len(ids)} expert ids; earlier rows have {self.k}")
        if position is not None:
            pos = (position, 0)
        else:
            n = self.count.get((step, layer), 0)
            self.count[(step, layer)] = n + 1
            pos = (step, n)
        key = (pos, layer)
        if key in self.rows:
            raise InputError(self.source, where, f"sequence {seq!r}: token {pos[0]} layer {layer} given twice "
                                                 f"(first at {self.where[key]})")
        self.rows[key] = ids
        self.where[key] = where
        if token is not None:
            seen = self.tokens.setdefault(pos, token)
            if seen != token:
                raise InputError(self.source, where, f"sequence {seq!r} token {pos[0]}: layer {layer} names token "
                                                     f"{token!r}, another layer {seen!r}")
        return done

    def finish(self) -> Record | None:
        """The sequence being built, complete (or None)."""
        if self.current is None:
            return None
        rows = self.rows
        positions = sorted({p for p, _ in rows})
        layer_ids = sorted({l for _, l in rows})
        first_where = min(self.where.values(), key=lambda w: int(w.split()[-1]))
        self.layers.check(layer_ids, self.source, first_where)
        if len(rows) != len(positions) * len(layer_ids):     # find the hole before allocating
            pos, layer = next((p, l) for p in positions for l in layer_ids if (p, l) not in rows)
            raise InputError(self.source, first_where, f"sequence {self.current!r}: token {pos[0]} has no "
                                                       f"row for layer {layer}")
        out = np.empty((len(positions), len(layer_ids), self.k), dtype=ids_dtype(self.num_experts))
        for t, pos in enumerate(positions):
            for j, layer in enumerate(layer_ids):
                out[t, j] = rows[(pos, layer)]
        name = str(self.current)
        self.finished.add(self.current)
        self.current = None
        self.rows, self.where, self.tokens, self.count = {}, {}, {}, {}
        return name, out, 0


_LONG_KEYS = {
    "sequence": ("sequence", "seq", "request_id", "req_id"),
    "step": ("step",),
    "position": ("position", "pos"),
    "layer": ("layer", "layer_id"),
    "token": ("token",),
    "experts": ("experts", "expert_ids", "topk_ids"),
}


def _pick(names, role: str):
    return next((n for n in _LONG_KEYS[role] if n in names), None)


def _long_columns(names: list[str], source: str, where: str) -> dict:
    """Which column plays which role in a long-form table."""
    low = {n.strip().lower(): n for n in names}
    cols = {}
    for role in _LONG_KEYS:
        found = _pick(low, role)
        cols[role] = low[found] if found else None
    for role in ("sequence", "layer"):
        if cols[role] is None:
            raise InputError(source, where, f"no {role!r} column (columns: {', '.join(names)})")
    if cols["step"] is None and cols["position"] is None:
        raise InputError(source, where, "needs a 'step' or 'position' column")
    if cols["experts"] is None:
        numbered = sorted((int(m.group(1)), low[n]) for n in low if (m := re.fullmatch(r"expert_(\d+)", n)))
        if not numbered:
            raise InputError(source, where, "needs an 'experts' column or columns expert_0, expert_1, ...")
        cols["expert_columns"] = [c for _, c in numbered]
    return cols


def _row_values(get, cols: dict, source: str, where: str, num_experts: int | None):
    """(sequence, step, position, layer, ids, token) of one long-form row; ``get(column)``."""
    seq = get(cols["sequence"])
    if seq is None or seq == "":
        raise InputError(source, where, "no sequence")
    if not isinstance(seq, (str, int)) or isinstance(seq, bool):
        raise InputError(source, where, f"sequence {_short(seq)} must be a text or an integer")
    step = _int(get(cols["step"]), source, where, "step") if cols["step"] else None
    pos = _int(get(cols["position"]), source, where, "position") if cols["position"] else None
    layer = _int(get(cols["layer"]), source, where, "layer")
    if cols["experts"]:
        ids = parse_ids(get(cols["experts"]), source, where, num_experts)
    else:
        ids = parse_ids([_int(get(c), source, where, c) for c in cols["expert_columns"]], source, where, num_experts)
    token = get(cols["token"]) if cols["token"] else None
    return seq, step, pos, layer, ids, token


def _read_long_csv(path: Path, layers: _LayerIds, num_experts: int | None) -> Iterator[Record]:
    src = str(path)
    with open(path, newline="", encoding="utf-8") as f:
        rd = csv.reader(f)
        with _reading(src, lambda: _csv_line(rd)):
            header = _csv_header(rd, src)
            cols = _long_columns(header, src, "line 1")
            index = {c: i for i, c in enumerate(header)}
            asm = _LongAssembler(src, layers, num_experts)
            for ln, row in _rows(rd, header, src):
                done = asm.add(*_row_values(lambda c: row[index[c]], cols, src, ln, num_experts), where=ln)
                if done:
                    yield done
        if (done := asm.finish()) is not None:
            yield done


def _read_parquet(path: Path, layers: _LayerIds, num_experts: int | None) -> Iterator[Record]:
    import pyarrow.parquet as pq

    src = str(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for bad files
        raise InputError(src, "file", f"not a readable Parquet file ({type(e).__name__}: {e})") from None
    cols = _long_columns(pf.schema_arrow.names, src, "schema")
    wanted = [c for k, c in cols.items() if k != "expert_columns" and c] + cols.get("expert_columns", [])
    asm = _LongAssembler(src, layers, num_experts)
    row0 = 0
    batches = pf.iter_batches(batch_size=65536, columns=wanted)
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                break
            data = {c: batch.column(c).to_pylist() for c in wanted}
        except Exception as e:      # pyarrow raises its own error types for corrupt data
            raise InputError(src, f"row {row0 + 1}", f"unreadable Parquet data ({type(e).__name__}: {e})") from None
        for i in range(batch.num_rows):
            where = f"row {row0 + i + 1}"
            done = asm.add(*_row_values(lambda c: data[c][i], cols, src, where, num_experts), where=where)
            if done:
                yield done
        row0 += batch.num_rows
    if (done := asm.finish()) is not None:
        yield done


def _read_jsonl(path: Path, layers: _LayerIds, num_experts: int | None) -> Iterator[Record]:
    src = str(path)
    asm = _LongAssembler(src, layers, num_experts)
    cols = None
    n = 0
    with open(path, encoding="utf-8") as f, _reading(src, lambda: f"line {n + 1}"):
        while line := f.readline(MAX_LINE_BYTES + 1):
            n += 1
            ln = f"line {n}"
            if len(line) > MAX_LINE_BYTES:
                raise InputError(src, ln, f"longer than {MAX_LINE_BYTES:,} characters")
            if not line.strip():
                continue
            try:
                rec = parse_json(line, src)
            except InputError as e:      # name the line; the key too where there is one
                inner = "" if e.field.startswith(("line ", "(document)")) else f"{e.field}: "
                raise InputError(src, ln, inner + e.message) from None
            if not isinstance(rec, dict):
                raise InputError(src, ln, "each line must be a JSON object")
            if cols is None:
                cols = _long_columns(list(rec), src, ln)
            done = asm.add(*_row_values(rec.get, cols, src, ln, num_experts), where=ln)
            if done:
                yield done
    if (done := asm.finish()) is not None:
        yield done


_READERS = {
    "layer-csv": ((".csv",), _read_layer_csv),
    "long-csv": ((".csv",), _read_long_csv),
    "parquet": ((".parquet", ".pq"), _read_parquet),
    "jsonl": ((".jsonl", ".ndjson", ".json"), _read_jsonl),
}


def detect_format(src: str | Path) -> str:
    """The importer for a file or folder, from its extension (and a CSV's header)."""
    p = Path(src)
    if not p.exists():
        raise InputError(str(p), "source", "file or folder not found")
    files = sorted((f for f in p.iterdir() if f.is_file()), key=_natural_key) if p.is_dir() else [p]
    for f in files:
        suf = f.suffix.lower()
        if suf == ".npz":
            return "simmoe"
        if suf == ".csv":
            check_input_file(f, "source")
            with open(f, newline="", encoding="utf-8") as fh, _reading(str(f), lambda: "line 1"):
                header = [h.strip().lower() for h in next(csv.reader(fh), [])]
            return "layer-csv" if "layer id" in header else "long-csv"
        for fmt, (suffixes, _) in _READERS.items():
            if suf in suffixes:
                return fmt
    raise InputError(str(p), "format", "cannot tell the format; give one of " + ", ".join(FORMATS[1:]))


def iter_records(src: str | Path, fmt: str = "auto", num_experts: int | None = None) -> Iterator[Record]:
    """Sequences of a source, one at a time (files in natural order: prompt_2 before prompt_10)."""
    src = Path(src)
    if fmt == "auto":
        fmt = detect_format(src)
    if fmt == "simmoe":
        ss = open_sequences(src, "simmoe")
        for i in range(ss.num_sequences):
            yield str(ss.names[i]), np.asarray(ss.sequence(i)), int(ss.prompt_lengths[i])
        return
    if fmt not in _READERS:
        raise InputError(str(src), "format", f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    suffixes, reader = _READERS[fmt]
    layers = _LayerIds()
    for f in _files(src, suffixes):
        yield from reader(f, layers, num_experts)


def import_sequences(src: str | Path, out: str | Path, fmt: str = "auto", num_experts: int | None = None,
                     meta: dict | None = None) -> SequenceSet:
    """Convert a source to a ``simmoe-sequences`` .npz, streaming: memory holds one sequence."""
    fmt = detect_format(src) if fmt == "auto" else fmt
    info = {"source": str(src), "source_format": fmt, **(meta or {})}
    with SequenceWriter(out, num_experts=num_experts, meta=info) as w:
        for name, experts, prompt in iter_records(src, fmt, num_experts):
            w.add(experts, name, prompt)
    return load_sequences(out, check=False)       # the writer checked every sequence


def read_sequences(src: str | Path, fmt: str = "auto", num_experts: int | None = None) -> SequenceSet:
    """A source parsed into memory (no file written)."""
    fmt = detect_format(src) if fmt == "auto" else fmt
    names, parts, prompts = [], [], []
    for name, experts, prompt in iter_records(src, fmt, num_experts):
        names.append(name)
        parts.append(experts)
        prompts.append(prompt)
    if not parts:
        raise InputError(str(src), "source", "no sequences")
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise InputError(str(src), "experts", f"sequences differ in (layers, top_k): {sorted(shapes)}")
    experts = np.concatenate(parts)
    lengths = np.array([len(p) for p in parts], dtype=np.int64)
    ss = SequenceSet(experts=experts, offsets=np.concatenate([[0], np.cumsum(lengths)]),
                     num_experts=num_experts or int(experts.max()) + 1, names=np.array(names, dtype=str),
                     prompt_lengths=np.array(prompts, dtype=np.int64), meta={"source": str(src), "source_format": fmt})
    return ss.validate(str(src))


_OPENED: dict[tuple, SequenceSet] = {}


def open_sequences(src: str | Path, fmt: str = "auto") -> SequenceSet:
    """Any routing source as a SequenceSet: an imported .npz (memory-mapped), a batched simmoe
    trace (split into its sequences), or a source folder/file parsed in memory. Parsed sources
    are kept for the process (keyed by path and modification time)."""
    p = Path(src)
    if not p.exists():
        raise InputError(str(p), "source", "file or folder not found")
    if fmt == "auto":
        fmt = detect_format(p)
    if fmt == "simmoe":
        kind = _npz_format(p)
        if kind == TRACE_FORMAT:
            return sequences_from_trace(load_trace(p))
        if kind != SEQUENCES_FORMAT:
            raise InputError(str(p), "format", f"not a simmoe sequences or trace file (format {kind!r})")
        return load_sequences(p)
    key = (str(p.resolve()), fmt, p.stat().st_mtime_ns)
    if key not in _OPENED:
        if len(_OPENED) >= 4:
            _OPENED.pop(next(iter(_OPENED)))
        _OPENED[key] = read_sequences(p, fmt)
    return _OPENED[key]


# ------------------------------------------------------------------------------ batching
def split_indices(num_sequences: int, split: str, max_sequences: int | None = None) -> np.ndarray:
    """Sequence indices of a split: ``test`` is every TEST_EVERY-th sequence in corpus order
    (indices 4, 9, 14, ...), ``train`` the others, ``all`` everything; then the first
    ``max_sequences`` of them."""
    idx = np.arange(num_sequences, dtype=np.int64)
    if split == "test":
        idx = idx[idx % TEST_EVERY == TEST_EVERY - 1]
    elif split == "train":
        idx = idx[idx % TEST_EVERY != TEST_EVERY - 1]
    elif split != "all":
        raise InputError("sequences", "split", f"unknown split {split!r} (all, train, test)")
    return idx[:max_sequences] if max_sequences else idx


def prompt_boundary(ss: SequenceSet, i: int) -> int:
    """Where sequence ``i``'s prompt ends: its recorded prompt length if known, else half its
    tokens; always leaving at least one token to decode."""
    n = int(ss.offsets[i + 1] - ss.offsets[i])
    p = int(ss.prompt_lengths[i]) or n // 2
    return max(0, min(p, n - 1))


def batch_set(ss: SequenceSet, indices: np.ndarray, *, batch_size: int, steps: int, seed: int,
              prefill: bool = False, num_experts: int | None = None, meta: dict | None = None) -> Trace:
    """``batch_size`` sequences advanced side by side for ``steps`` decode steps.

    Sequences are taken in a seeded random order of ``indices``; each step every batch slot
    emits its sequence's next token; a sequence that ends is replaced in its slot by the next
    one (the order wraps around when all have been used). With ``prefill``, a first step holds
    the prompt tokens of the first ``batch_size`` sequences (:func:`prompt_boundary`) and every
    sequence is decoded from its prompt's end. Row ``seq`` ids number admissions (0, 1, ...).
    """
    if len(indices) == 0:
        raise InputError("sequences", "split", "no sequences selected")
    B, L, k = batch_size, ss.num_layers, ss.top_k
    order = np.asarray(indices)[np.random.Generator(np.random.PCG64(seed)).permutation(len(indices))]
    start = {int(i): (prompt_boundary(ss, int(i)) if prefill else 0) for i in order}
    usable = [int(i) for i in order if ss.offsets[i + 1] - ss.offsets[i] > start[int(i)]]
    if not usable:
        raise InputError("sequences", "sequences", "every selected sequence is empty")
    out = np.empty((steps, B, L, k), dtype=expert_dtype(num_experts or ss.num_experts))
    seq = np.empty((steps, B), dtype=np.int32)
    prefill_parts = []
    admitted = 0
    free = [(0, b) for b in range(B)]   # heap of (step the slot frees up, slot)
    while free[0][0] < steps:
        t, b = heapq.heappop(free)
        i = usable[admitted % len(usable)]
        off, n = int(ss.offsets[i]), int(ss.offsets[i + 1] - ss.offsets[i])
        a = start[i]
        if prefill and t == 0 and a > 0:
            prefill_parts.append((np.asarray(ss.experts[off:off + a]), admitted))
        run = min(n - a, steps - t)
        out[t:t + run, b] = ss.experts[off + a:off + a + run]
        seq[t:t + run, b] = admitted
        admitted += 1
        heapq.heappush(free, (t + run, b))
    rows_e = [out.reshape(steps * B, L, k)]
    rows_s = [seq.reshape(-1)]
    sizes = [B] * steps
    phase = [0] * steps
    if prefill_parts:
        rows_e.insert(0, np.concatenate([p for p, _ in prefill_parts]))
        rows_s.insert(0, np.concatenate([np.full(len(p), a, dtype=np.int32) for p, a in prefill_parts]))
        sizes.insert(0, len(rows_e[0]))
        phase.insert(0, 1)
    info = {"generator": "real", "batch_size": B, "steps": steps, "seed": seed, "prefill": prefill,
            "sequences_available": len(usable), "sequences_admitted": admitted,
            "wrapped": admitted > len(usable), **(meta or {})}
    return Trace(experts=np.concatenate(rows_e), step_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                 seq=np.concatenate(rows_s), phase=np.array(phase, dtype=np.uint8),
                 num_experts=num_experts or ss.num_experts, meta=info)


def resolve_source(path: str, base_dir: Path | None) -> tuple[Path, bool]:
    """Where a scenario's sequences are: ``SIMMOE_TRACE_DIR`` when set (it replaces
    ``trace.sequences.path``), else ``path``, relative to the scenario's folder. Returns the
    path and whether the environment variable chose it."""
    env = os.environ.get("SIMMOE_TRACE_DIR")
    if env:
        return Path(env).expanduser(), True
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p, False


def batch_sequences(spec, *, model, batch_size: int, steps: int, seed: int, replication: int,
                    base_dir: Path | None) -> Trace:
    """The trace of a scenario's ``trace.sequences`` (a :class:`~simulator.scenario.SequencesSpec`)
    for one batch size and replication (the seed already depends on both)."""
    path, from_env = resolve_source(spec.path, base_dir)
    if not path.exists():
        where = "SIMMOE_TRACE_DIR" if from_env else "trace.sequences.path"
        get = f"; get it from {spec.download}" if getattr(spec, "download", None) else ""
        raise InputError(str(path), where, f"not found{get}: point SIMMOE_TRACE_DIR or trace.sequences.path at "
                                           "an imported .npz or a trace folder (docs/traces.md)")
    fmt = detect_format(path) if from_env or spec.format == "auto" else spec.format
    ss = open_sequences(path, fmt)
    if ss.num_experts > model.num_experts:
        raise InputError(str(path), "model", f"trace has expert ids up to {ss.num_experts - 1}; "
                                             f"model {model.name} has {model.num_experts} experts")
    idx = split_indices(ss.num_sequences, spec.split, spec.max_sequences)
    meta = {"source": str(path.resolve()), "format": fmt, "split": spec.split, "max_sequences": spec.max_sequences, "replication": replication}
    return batch_set(ss, idx, batch_size=batch_size, steps=steps, seed=seed, prefill=spec.prefill,
                     num_experts=model.num_experts, meta=meta)
