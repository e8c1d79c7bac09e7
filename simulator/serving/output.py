"""Writing a serving run's results, all files or none (as :mod:`simulator.output`):

``summary.json`` (per policy x max batch: latency statistics with CIs, throughput, goodput,
the memory split; the run's provenance), ``summary.csv`` (the same rows, flat),
``requests.parquet`` (or .csv: one row per request and replication), ``steps.parquet`` (one
row per engine step), the effective ``scenario.yaml``, the ``profile.json`` used and any
``extra_files`` (plots).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pandas as pd

from ..atomic import atomic_files
from ..output import write_frame, write_run_files
from ..output import provenance

SERVING_SUMMARY_VERSION = 1


def flatten_serving(row: dict) -> dict:
    """A summary row as flat columns: ``ttft_ms_p90``, ``ttft_ms_mean_ci95_lo``, ``memory_kv_tokens``..."""
    flat: dict = {}
    for k, v in row.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, list) and len(vv) == 2:
                    flat[f"{k}_{kk}_lo"], flat[f"{k}_{kk}_hi"] = vv
                else:
                    flat[f"{k}_{kk}"] = vv
        elif isinstance(v, list) and len(v) == 2 and k.endswith("ci95"):
            flat[f"{k}_lo"], flat[f"{k}_hi"] = v
        elif isinstance(v, list):
            flat[k] = "; ".join(map(str, v))
        else:
            flat[k] = v
    return flat


def serving_summary(result) -> dict:
    from .. import __version__

    sc = result.scenario
    return {"format": "simmoe-serving-summary", "version": SERVING_SUMMARY_VERSION, "simmoe_version": __version__,
            "scenario": sc.name, "profile": result.meta.get("profile"), "profile_kind": result.meta.get("profile_kind"),
            "model": {"name": sc.model.name, "expert_bytes": sc.model.expert_bytes},
            "workload": sc.workload.model_dump(mode="json"), "results": result.summary,
            "provenance": provenance()}


def write_serving_results(result, out_dir: str | Path, fmt: str = "parquet",
                          extra_files: dict[str, Callable[[Path], object]] | None = None) -> list[Path]:
    out = Path(out_dir)
    with atomic_files(out, "--out") as tmp:
        (tmp / "summary.json").write_text(json.dumps(serving_summary(result), indent=1) + "\n")
        pd.DataFrame([flatten_serving(r) for r in result.summary]).to_csv(tmp / "summary.csv", index=False)
        for name, df in (("requests", result.requests), ("steps", result.steps)):
            write_frame(df, tmp / name, fmt)
        write_run_files(tmp, result, extra_files)
        names = sorted(p.name for p in tmp.iterdir())
    return [out / n for n in names]
