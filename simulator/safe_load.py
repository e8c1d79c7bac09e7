"""Safe reading of every input file: one module, used by every loader.

- :func:`check_input_file` refuses what is not a regular file (a folder, ``/dev/zero``, a
  FIFO, a socket) *before* opening it, and files larger than a stated cap, so that nothing
  hangs or reads without end.
- :func:`read_text` reads a regular file (capped) as UTF-8.
- :func:`load_yaml` / :func:`load_json` parse a document and refuse, on one line naming the
  file and the key or line: duplicate keys (YAML and JSON), YAML aliases beyond
  :data:`MAX_ALIASES` or a document that aliases would expand past :data:`MAX_NODES` nodes
  (alias bombs), recursive aliases, nesting deeper than :data:`MAX_DEPTH`, and non-finite
  numbers (``.inf``, ``.nan``, ``1e999``, ``NaN``, ``Infinity``).

Every failure is an :class:`~simulator.errors.InputError`.
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError

#: the largest YAML/JSON document read (scenarios, sweeps, profiles, summaries)
MAX_DOCUMENT_BYTES = 16 << 20
#: YAML aliases (``*name``) allowed in one document
MAX_ALIASES = 64
#: nodes a YAML document may hold once its aliases are expanded
MAX_NODES = 200_000
#: deepest nesting of mappings and lists
MAX_DEPTH = 64


def check_input_file(path: str | Path, field: str, max_bytes: int | None = None) -> Path:
    """``path`` as a regular file no larger than ``max_bytes``; else InputError.

    Uses ``stat`` (no ``open``), so a FIFO or a device is refused without blocking on it."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InputError(str(p), field, "file not found") from None
    except OSError as e:
        raise InputError(str(p), field, f"cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(str(p), field, "is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(str(p), field, "not a regular file (a device, FIFO or socket); give a file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise InputError(str(p), field, f"file of {st.st_size:,} bytes is larger than the "
                                        f"{max_bytes:,} bytes this input may have")
    return p


def read_bytes(path: str | Path, field: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> bytes:
    p = check_input_file(path, field, max_bytes)
    try:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise InputError(str(p), field, f"cannot read: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise InputError(str(p), field, f"larger than the {max_bytes:,} bytes this input may have")
    return data


def read_text(path: str | Path, field: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> str:
    data = read_bytes(path, field, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputError(str(path), f"line {line}", f"not UTF-8 text (byte {e.start})") from None


def utf8_error(path: str | Path, chunk: int = 1 << 20) -> tuple[int, int] | None:
    """(line, byte offset) of the first byte of ``path`` that is not UTF-8, or None. Reads in
    chunks (a text reader's buffered decoding fails before it knows the line)."""
    offset = lines = 0
    pending = b""
    with open(path, "rb") as f:
        while True:
            more = f.read(chunk)
            data = pending + more
            good, pending = len(data), b""
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                if more and e.end == len(data) and len(data) - e.start < 4:   # a character split by the chunk
                    good, pending = e.start, data[e.start:]
                else:
                    return lines + data[:e.start].count(b"\n") + 1, offset + e.start
            lines += data[:good].count(b"\n")
            offset += good
            if not more:
                return None


# ------------------------------------------------------------------------------ checks
def _where(path: list) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(document)"


def check_document(doc: Any, source: str) -> Any:
    """Refuse nesting deeper than MAX_DEPTH and non-finite numbers, naming the field."""
    stack = [(doc, [])]
    while stack:
        node, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise InputError(source, _where(path[:MAX_DEPTH]), f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, float) and not math.isfinite(node):
            raise InputError(source, _where(path), f"{node} is not a finite number")
        if isinstance(node, dict):
            stack.extend((v, path + [str(k)]) for k, v in node.items())
            for k in node:
                if isinstance(k, float) and not math.isfinite(k):
                    raise InputError(source, _where(path), f"key {k} is not a finite number")
        elif isinstance(node, list):
            stack.extend((v, path + [i]) for i, v in enumerate(node))
    return doc


# -------------------------------------------------------------------------------- YAML
class _SafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, many aliases and alias bombs."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (line {mark.line + 1}): "
                                     "write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue          # SafeConstructor reports unhashable keys itself
                if key in seen:
                    raise _Duplicate(key, key_node.start_mark.line + 1, seen[key])
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _Duplicate(Exception):
    def __init__(self, key, line: int, first: int):
        self.key, self.line, self.first = key, line, first


def _expanded_size(root) -> int:
    """Nodes of the composed graph with every alias expanded (memoised over the DAG);
    raises ValueError on a recursive alias or past MAX_NODES."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        nid = id(node)
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [c for kv in node.value for c in kv]
        if done:
            active.discard(nid)
            sizes[nid] = min(MAX_NODES + 1, 1 + sum(sizes[id(c)] for c in children))
            if sizes[nid] > MAX_NODES:
                raise ValueError(f"aliases expand the document past {MAX_NODES:,} nodes "
                                 f"(line {node.start_mark.line + 1})")
            continue
        if nid in sizes:
            continue
        if nid in active:
            raise ValueError(f"recursive alias (line {node.start_mark.line + 1})")
        active.add(nid)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def parse_yaml(text: str, source: str) -> Any:
    """A YAML document from text (one document; ``None`` if empty)."""
    loader = None
    try:
        loader = _SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        doc = loader.construct_document(node)
    except _Duplicate as d:
        raise InputError(source, f"line {d.line}", f"duplicate key {d.key!r} (first at line {d.first})") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}" if mark else "(document)"
        raise InputError(source, where, f"malformed YAML: {e.problem or e.context or e}") from None
    except (yaml.YAMLError, ValueError) as e:
        raise InputError(source, "(document)", f"malformed YAML: {e}") from None
    except RecursionError:
        raise InputError(source, "(document)", "nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    return check_document(doc, source)


def load_yaml(path: str | Path, field: str = "file", max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """A YAML file, read and checked (see the module doc)."""
    return parse_yaml(read_text(path, field, max_bytes), str(path))


# -------------------------------------------------------------------------------- JSON
def _pairs(pairs: list) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k, 0, 0)
        out[k] = v
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


def parse_json(text: str, source: str) -> Any:
    """A JSON document from text: duplicate keys, NaN/Infinity and deep nesting refused."""
    try:
        doc = json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant)
    except _Duplicate as d:
        raise InputError(source, str(d.key), "duplicate key") from None
    except json.JSONDecodeError as e:
        raise InputError(source, f"line {e.lineno}", f"malformed JSON: {e.msg}") from None
    except ValueError as e:
        raise InputError(source, "(document)", f"malformed JSON: {e}") from None
    except RecursionError:
        raise InputError(source, "(document)", "nested too deeply") from None
    return check_document(doc, source)


def load_json(path: str | Path, field: str = "file", max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """A JSON file, read and checked (see the module doc)."""
    return parse_json(read_text(path, field, max_bytes), str(path))
