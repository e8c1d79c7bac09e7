"""Terminal output: progress bars and the results table (rich)."""
from __future__ import annotations

import contextlib
import os

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table



def _console() -> Console:
    """The terminal's width, or $COLUMNS, or 100 columns when output is not a terminal."""
    c = Console()
    return c if c.is_terminal or "COLUMNS" in os.environ else Console(width=100)


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


LEGEND = ("* best at its batch size; ms/step: mean step latency ± half its 95% CI; x base: speed-up over "
          "the baseline named below (base: the baseline itself); hit d/p: demand / prefetch hits per "
          "served request; dedup: routed requests that repeat an expert in their layer-step; "
          "GiB/st: copied per step; stall: step time waiting for copies")


def _ms_ci(mean: float, half: float) -> str:
    """``mean±half`` to three significant digits of the mean or more: 1753±0, 110.9±1.2, 8.35±1.77."""
    d = 0 if mean >= 100 else 1 if mean >= 10 else 2
    return f"{mean:.{d}f}±{half:.{d}f}"


def summary_table(result) -> Table:
    """The results table, one section per batch size; fits 80 columns (long policy names fold)."""
    sc = result.scenario
    best = {d["batch_size"]: d["best"] for d in result.decision["per_batch"]}
    t = Table(title=f"{sc.name}: {sc.model.name} on {result.meta.get('profile_source')}; "
                    f"{sc.replications} replication(s)",
              box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0, 0, 1), pad_edge=False)
    t.add_column("policy", overflow="fold", min_width=12)
    for col in ("B", "ms/step", "tok/s", "x base", "hit d/p", "dedup", "GiB/st", "stall"):
        t.add_column(col, justify="right", no_wrap=True)
    last = None
    for r in result.summary:
        b = r["batch_size"]
        if last is not None and b != last:
            t.add_section()
        last = b
        lat = r["step_latency_ms"]
        lo, hi = lat["ci95"]
        sp = r.get("speedup_vs_baseline")
        served = max(1, r["hits"] + r["misses"])
        mark = "*" if best.get(b) == r["policy"] else " "
        t.add_row(
            f"{mark}{r['policy']}", str(b), _ms_ci(lat["mean"], (hi - lo) / 2), f"{r['tokens_per_s']:.0f}",
            "base" if r.get("baseline") == r["policy"] else (f"{sp:.2f}" if sp else "-"),
            f"{r['demand_hits'] / served:.0%}/{r['prefetch_hits'] / served:.0%}", f"{r['dedup_savings']:.0%}",
            f"{r['bytes_h2d'] / max(1, r['steps']) / 2**30:.2f}", f"{r['stall_ms'] / lat['mean']:.0%}" if lat["mean"] else "-",
        )
    return t


def gpus_table(result) -> Table | None:
    """Several GPUs (a ``gpus:`` section): per (policy, batch) the bytes over the host links and
    the peer link per step, peer fetches and the load imbalance; None on one GPU."""
    g = result.scenario.gpus
    if g is None:
        return None
    mode = g.mode + (f", {g.placement}" if g.mode == "expert-parallel" else "") + (", peer fetch" if g.peer_fetch else "")
    t = Table(title=f"{g.count} GPUs ({mode}; host link{' shared' if g.shared_pcie else ' per GPU'})",
              box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0, 0, 1), pad_edge=False)
    t.add_column("policy", overflow="fold", min_width=12)
    for col in ("B", "PCIe GiB/st", "peer GiB/st", "peer fetch/st", "imbalance"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in result.summary:
        x, steps = r["gpus"], max(1, r["steps"])
        t.add_row(r["policy"], str(r["batch_size"]), f"{x['bytes_pcie'] / steps / 2**30:.2f}",
                  f"{x['bytes_peer'] / steps / 2**30:.2f}", f"{x['peer_fetches'] / steps:.1f}",
                  f"{x['load_imbalance']:.2f}")
    return t


def print_summary(result) -> None:
    """The results table, its legend, then the decision summary."""
    from simulator.decision import decision_lines

    c = _console()
    c.print(summary_table(result))
    c.print(LEGEND, style="dim", highlight=False)
    gt = gpus_table(result)
    if gt is not None:
        c.print(gt)
        c.print("PCIe GiB/st: copied over the host links per step; peer GiB/st: activations and peer "
                "fetches over the peer link per step; imbalance: most routed pairs on one GPU / the mean",
                style="dim", highlight=False)
    for line in decision_lines(result.decision):
        c.print(line, style="bold yellow" if line.startswith("warning") else None, highlight=False,
                soft_wrap=False)

