"""Terminal output: progress bars and the results table (rich)."""
from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table



def _console() -> Console:
    """Wide enough for the results table when output is not a terminal (files, CI logs)."""
    c = Console()
    return c if c.is_terminal else Console(width=160)


@contextlib.contextmanager
def progress_bar(quiet: bool, label: str):
    """Yields a callback ``cb(done, total, what)``."""
    if quiet:
        yield None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[what]}"), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as prog:
        task = prog.add_task(label, total=None, what="")

        def cb(done, total, what):
            prog.update(task, completed=done, total=total, what=what)
        yield cb


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def print_summary(result) -> None:
    sc = result.scenario
    t = Table(title=f"{sc.name}: {sc.model.name} on {result.meta.get('profile')} "
                    f"({result.meta.get('profile_kind')}); {sc.replications} replication(s)")
    for col, just in [("policy", "left"), ("batch", "right"), ("step ms (95% CI)", "right"), ("p99 ms", "right"),
                      ("tok/s", "right"), ("speed-up", "right"), ("hit rate", "right"), ("dedup", "right"),
                      ("moved/step", "right"), ("stall", "right")]:
        t.add_column(col, justify=just)
    for r in result.summary:
        lat = r["step_latency_ms"]
        lo, hi = lat["ci95"]
        sp = r["speedup_vs_first"]
        steps = max(1, r["steps"])
        t.add_row(
            r["policy"], str(r["batch_size"]), f"{lat['mean']:.3f} ±{(hi - lo) / 2:.3f}", f"{lat['p99']:.3f}",
            f"{r['tokens_per_s']:.1f}", f"{sp:.2f}x" if sp else "-", f"{r['hit_rate']:.1%}",
            f"{r['dedup_savings']:.1%}", fmt_bytes(r["bytes_h2d"] / steps),
            f"{r['stall_ms'] / lat['mean']:.0%}" if lat["mean"] else "-",
        )
    _console().print(t)
