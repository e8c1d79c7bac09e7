"""Plots of serving runs (matplotlib, no display): latency CDFs per policy, the
throughput-latency curve over arrival rates, SLO attainment over rates."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter


def _labels(df: pd.DataFrame) -> pd.Series:
    many = df["batch_size"].nunique() > 1 if "batch_size" in df else False
    return df["policy"] + (" B=" + df["batch_size"].astype(str) if many else "")


def plot_latency_cdf(requests: pd.DataFrame, path: Path) -> None:
    fig = Figure(figsize=(12, 3.6))
    axes = fig.subplots(1, 3)
    lab = _labels(requests)
    for ax, col, name in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms"), ("TTFT", "TPOT", "end-to-end")):
        for key in dict.fromkeys(lab):
            g = requests[lab == key]
            if col == "tpot_ms":
                g = g[g["output_tokens"] > 1]
            v = np.sort(g[col].to_numpy())
            if len(v):
                ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=key)
        if col != "tpot_ms":
            ax.set_xscale("log")          # queueing makes TTFT and e2e heavy-tailed
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())   # labelled minor ticks overlap over a decade
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("share of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")


def plot_throughput_latency(rows: list[dict], path: Path) -> None:
    df = pd.DataFrame(rows).sort_values("rate")
    df["batch_size"] = df["max_batch"]
    fig = Figure(figsize=(9, 3.6))
    a1, a2 = fig.subplots(1, 2)
    lab = _labels(df)
    for key in dict.fromkeys(lab):
        g = df[lab == key]
        a1.plot(g["tokens_per_s"], g["e2e_ms_p90"], marker="o", label=key)
        a2.plot(g["tokens_per_s"], g["tpot_ms_mean"], marker="o", label=key)
    a1.set_xlabel("throughput (output tokens/s)")
    a1.set_ylabel("end-to-end p90 (ms)")
    a2.set_xlabel("throughput (output tokens/s)")
    a2.set_ylabel("TPOT mean (ms)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend(fontsize=7)
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")


def plot_attainment(rows: list[dict], target: float, path: Path) -> None:
    df = pd.DataFrame(rows).sort_values("rate")
    df["batch_size"] = df["max_batch"]
    fig = Figure(figsize=(5, 3.6))
    ax = fig.subplots()
    lab = _labels(df)
    for key in dict.fromkeys(lab):
        g = df[lab == key]
        ax.plot(g["rate"], g["slo_attainment"], marker="o", label=key)
    ax.axhline(target, color="k", lw=0.8, ls="--")
    ax.set_xlabel("arrival rate (requests/s)")
    ax.set_ylabel("share meeting the SLO")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
