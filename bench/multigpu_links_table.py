"""The link tables of docs/multigpu.md from a several-GPU sweep: mean step latency (ms) per
(GPUs configuration, policy) and batch size, and at one batch size the bytes per step over the
host links (PCIe) and fetched from peers (peer fetch).
    simmoe sweep scenarios/multigpu_sweep_peer.yaml -j 2 -o results/multigpu_sweep_peer
    python bench/multigpu_links_table.py results/multigpu_sweep_peer [--policy lru-416] [--batch 16]"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def table(folder: str, policy: str | None, batch: int) -> str:
    df = pd.read_parquet(Path(folder) / "results.parquet")
    if policy:
        df = df[df["policy"] == policy]
    lat = df.pivot_table(index=["gpus", "policy"], columns="batch_size", values="latency_mean_ms", sort=False)
    at = df[df["batch_size"] == batch].set_index(["gpus", "policy"])
    lat[f"PCIe GB/step@{batch}"] = (at["gpus_bytes_pcie"] / at["steps"] / 1e9).round(2)
    lat[f"peer fetch GB/step@{batch}"] = (at["gpus_bytes_peer_fetch"] / at["steps"] / 1e9).round(2)
    lat = lat.round(1).reset_index()
    head = "| " + " | ".join(map(str, lat.columns)) + " |"
    rows = ["| " + " | ".join(str(v) for v in r) + " |" for r in lat.itertuples(index=False)]
    return "\n".join([head, "|" + "---|" * len(lat.columns), *rows])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--policy")
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    print(table(a.folder, a.policy, a.batch))
