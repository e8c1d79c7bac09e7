"""Writing a run's results: all files or none.

``DIR/summary.json`` (per policy x batch size, with the ``decision`` summary and the run's
``provenance``), ``DIR/summary.csv`` (the same rows as flat columns), ``DIR/steps.parquet`` or
``steps.csv`` (one row per simulated step), ``DIR/scenario.yaml`` (the effective scenario), ``DIR/profile.json`` (the
profile used), and any ``extra_files`` (e.g. ``timeline.json``). Everything is written into a
partial folder inside ``DIR`` (:func:`simulator.atomic.atomic_files`) and moved in only when
every file is complete and every target checked: a full disk, a target that is not a regular
file or a failing extra writer leaves ``DIR`` as it was.
"""
from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import yaml

from .atomic import atomic_files

SUMMARY_VERSION = 1


def git_commit(where: Path) -> str | None:
    """The commit of the git checkout holding ``where`` (simmoe's source), or None."""
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _program() -> str:
    """The command's name: ``simmoe``, or ``python -m simmoe`` for a package run with -m."""
    p = Path(sys.argv[0])
    return f"python -m {p.parent.name}" if p.name == "__main__.py" else p.name


def provenance() -> dict:
    """Where a result comes from: UTC time, the command line, the simmoe version and, when simmoe
    runs from a git checkout, its commit. The one part of summary.json that differs between two
    runs of the same scenario and seed."""
    from . import __version__

    return {"time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": [_program(), *sys.argv[1:]], "simmoe_version": __version__,
            "git_commit": git_commit(Path(__file__).resolve().parent)}


def write_results(result, out_dir: str | Path, fmt: str = "parquet", extra: dict | None = None,
                  extra_files: dict[str, Callable[[Path], object]] | None = None) -> list[Path]:
    """Write the run's files into ``out_dir``; ``extra_files`` maps a file name to a writer
    called with the path to write. Returns the paths written."""
    from . import __version__

    out = Path(out_dir)
    summary = {
        "format": "simmoe-summary", "version": SUMMARY_VERSION, "simmoe_version": __version__,
        "scenario": result.scenario.name, "profile": result.meta.get("profile"),
        "profile_kind": result.meta.get("profile_kind"), "profile_source": result.meta.get("profile_source"),
        "model": {"name": result.scenario.model.name, "expert_bytes": result.scenario.model.expert_bytes},
        "decision": result.decision,
        "results": result.summary,
        "provenance": provenance(),
    }
    if extra:
        summary.update(extra)
    import pandas as pd

    from .sweep import flatten_summary

    with atomic_files(out, "--out") as tmp:
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=False) + "\n")
        pd.DataFrame([flatten_summary(r) for r in result.summary]).to_csv(tmp / "summary.csv", index=False)
        write_frame(result.steps, tmp / "steps", fmt)
        write_run_files(tmp, result, extra_files)
        names = sorted(p.name for p in tmp.iterdir())
    return [out / n for n in names]


def write_frame(df, stem: Path, fmt: str) -> None:
    """``df`` as ``<stem>.parquet`` or ``<stem>.csv``."""
    if fmt == "parquet":
        df.to_parquet(stem.with_suffix(".parquet"), index=False)
    else:
        df.to_csv(stem.with_suffix(".csv"), index=False)


def write_run_files(tmp: Path, result, extra_files: dict | None) -> None:
    """The effective scenario, the profile used and any extra files, into ``tmp``."""
    (tmp / "scenario.yaml").write_text(yaml.safe_dump(result.scenario.effective(), sort_keys=False))
    (tmp / "profile.json").write_text(json.dumps(result.profile.to_json(), indent=1) + "\n")
    for name, write in (extra_files or {}).items():
        write(tmp / name)
