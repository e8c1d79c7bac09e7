"""Writing a run's results: all files or none.

``DIR/summary.json`` (per policy x batch size), ``DIR/steps.parquet`` or ``steps.csv`` (one row
per simulated step), ``DIR/scenario.yaml`` (the effective scenario), ``DIR/profile.json`` (the
profile used). Files are written to a temporary folder beside ``DIR`` and moved in at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from .errors import InputError

SUMMARY_VERSION = 1


def write_results(result, out_dir: str | Path, fmt: str = "parquet", extra: dict | None = None) -> list[Path]:
    from . import __version__

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".partial-"))
    except OSError as e:
        raise InputError(str(out), "--out", f"cannot write here: {e.strerror or e}") from None
    try:
        summary = {
            "format": "simmoe-summary", "version": SUMMARY_VERSION, "simmoe_version": __version__,
            "scenario": result.scenario.name, "profile": result.meta.get("profile"),
            "profile_kind": result.meta.get("profile_kind"),
            "model": {"name": result.scenario.model.name, "expert_bytes": result.scenario.model.expert_bytes},
            "results": result.summary,
        }
        if extra:
            summary.update(extra)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=False) + "\n")
        steps = result.steps
        if fmt == "parquet":
            steps.to_parquet(tmp / "steps.parquet", index=False)
        else:
            steps.to_csv(tmp / "steps.csv", index=False)
        (tmp / "scenario.yaml").write_text(yaml.safe_dump(result.scenario.effective(), sort_keys=False))
        (tmp / "profile.json").write_text(json.dumps(result.profile.to_json(), indent=1) + "\n")
        written = []
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
            written.append(out / f.name)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
