"""The table of docs/multigpu.md from a sweep of scenarios/sweep_multigpu.yaml:
mean step latency (ms) per (GPUs configuration, policy) and batch size, with the load
imbalance and the peer bytes per step.
    simmoe sweep scenarios/sweep_multigpu.yaml -j 2 -o results/sweep_multigpu
    python bench/multigpu_table.py results/sweep_multigpu"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def table(folder: str) -> str:
    df = pd.read_parquet(Path(folder) / "results.parquet")
    df["config"] = df["gpus"]
    lat = df.pivot_table(index=["config", "policy"], columns="batch_size", values="latency_mean_ms", sort=False)
    extra = df[df["batch_size"] == df["batch_size"].max()].set_index(["config", "policy"])
    lat["imbalance@Bmax"] = extra["gpus_load_imbalance"].round(2)
    lat["peer MB/step@Bmax"] = (extra["gpus_bytes_peer"] / extra["steps"] / 1e6).round(1)
    lat = lat.round(1).reset_index()
    head = "| " + " | ".join(map(str, lat.columns)) + " |"
    rows = ["| " + " | ".join(str(v) for v in r) + " |" for r in lat.itertuples(index=False)]
    return "\n".join([head, "|" + "---|" * len(lat.columns), *rows])


if __name__ == "__main__":
    print(table(sys.argv[1]))
