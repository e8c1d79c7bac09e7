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


def _bar(console: Console, *left, counts: bool = True) -> Progress:
    cols = [TextColumn("[bold]{task.description}"), BarColumn()] + ([MofNCompleteColumn()] if counts else [])
    return Progress(*cols, TextColumn("{task.fields[what]}"), *left, console=console, transient=True)


#: jobs estimated shorter than this get no estimate line and no bar (errors stay one line)
ANNOUNCE_S = 2.0


def announce(quiet: bool, label: str, est) -> Console:
    """The one line printed at the start of a job expected to take more than ANNOUNCE_S:
    ``label: about 40 s, 300.0 MiB`` (stderr)."""
    console = Console(stderr=True)
    if not quiet and est is not None and est.seconds >= ANNOUNCE_S:
        console.print(f"{label}: {est.text()}", highlight=False, soft_wrap=True)
    return console


@contextlib.contextmanager
def progress_bar(quiet: bool, label: str, est=None, announced: bool = False):
    """Yields a callback ``cb(done, total, what)`` (None when quiet). With an estimate
    (:class:`simulator.estimate.Estimate`), it is announced first, and the bar's time left is
    the estimate of what is left, scaled by the pace so far. The bar is drawn on stderr only
    when stderr is a terminal."""
    if quiet:
        yield None
        return
    console = announce(quiet or announced, label, est)
    if est is None:
        with _bar(console, TimeRemainingColumn()) as prog:
            task = prog.add_task(label, total=None, what="")

            def cb(done, total, what):
                prog.update(task, completed=done, total=total, what=what)
            yield cb
        return
    from simulator.estimate import Tracker, fmt_seconds

    if not console.is_terminal or est.seconds < ANNOUNCE_S:
        yield Tracker(est, lambda *a: None)
        return
    with _bar(console, TextColumn("{task.fields[left]}")) as prog:
        task = prog.add_task(label, total=None, what="", left="")

        def update(done, total, what, left):
            prog.update(task, completed=done, total=total, what=what, left=f"{fmt_seconds(left)} left")
        yield Tracker(est, update)


@contextlib.contextmanager
def timed_bar(quiet: bool, label: str, est):
    """For a job with no progress callbacks: announce the estimate, and on a terminal draw a
    bar that follows the clock against the estimate (time left = estimate - elapsed)."""
    import threading
    import time

    from simulator.estimate import fmt_seconds

    console = announce(quiet, label, est)
    if quiet or not console.is_terminal or est.seconds < ANNOUNCE_S:
        yield
        return
    stop = threading.Event()
    with _bar(console, TextColumn("{task.fields[left]}"), counts=False) as prog:
        total = max(est.seconds, 1e-3)
        task = prog.add_task(label, total=total, what="", left="")
        t0 = time.perf_counter()

        def tick():
            while not stop.wait(0.25):
                el = time.perf_counter() - t0
                left = f"{fmt_seconds(total - el)} left" if el < total else "taking longer than estimated"
                prog.update(task, completed=min(el, total * 0.99), left=left)
        th = threading.Thread(target=tick, daemon=True)
        th.start()
        try:
            yield
        finally:
            stop.set()
            th.join()


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
