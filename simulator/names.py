"""Names are names, never paths.

A scenario's ``name`` and a sweep's ``name`` become the folder of their results
(``results/<name>``, ``results/<name>-validation``) when no ``--out`` is given, so a name must
stay one plain path component inside ``results/``: :func:`check_name` refuses path separators
(``/``, ``\\``), ``:`` (a drive on Windows), names made only of dots (``.``, ``..``), control
characters (NUL included), leading or trailing blanks, the empty name and names over
:data:`MAX_NAME` characters.
"""
from __future__ import annotations

import unicodedata
from pathlib import Path

MAX_NAME = 100
RESULTS = Path("results")
_FORBIDDEN = "/\\:"


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a results folder, or None when it can."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME:
        return f"is {len(name)} characters long (at most {MAX_NAME})"
    bad = next((c for c in name if c in _FORBIDDEN or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)
    if bad is not None:
        return (f"{name!r} contains {bad!r}: a name is a name, not a path (no '/', '\\', ':' or control "
                "characters); use --out to choose the folder")
    if set(name) == {"."}:
        return f"{name!r} is not a name (only dots); use --out to choose the folder"
    if name != name.strip():
        return f"{name!r} starts or ends with a blank"
    return None


def check_name(name: object) -> str:
    """``name`` if it is a valid name, else ValueError saying why (pydantic-friendly)."""
    problem = name_problem(name)
    if problem:
        raise ValueError(problem)
    return name  # type: ignore[return-value]


def results_dir(name: str, suffix: str = "") -> Path:
    """The default results folder of ``name``: ``results/<name><suffix>``, always inside ``results/``."""
    return RESULTS / (check_name(name) + suffix)
