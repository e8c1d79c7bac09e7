"""Sweep throughput: a 1,000-point sweep on 1 and 2 local workers and on Ray with 2 CPUs.

Each point is a small scenario (2 MoE layers of 16 experts, 2 policies, 1 replication of 8
decode steps); the grid is 250 seeds x 4 batch sizes. Every run starts from an empty results
folder and includes expanding and validating the 1,000 points, starting the workers, writing
the Parquet parts and the consolidated results. The backends run in turn, once per round
(``--repeats`` rounds), so that a slow spell of the machine hits all of them. Reported per
backend (medians over rounds):

- wall time, and speed-up: the median over rounds of (1-worker wall / wall) in that round;
- compute: the sum over points of the time spent inside the point (its simulation); above the
  1-worker figure when the workers slow each other down;
- overhead per point = (workers x wall - compute) / points: worker time not spent inside
  points (validation, scheduling, pickling, Parquet writes, idle workers at the end);
- overhead per point vs serial = (workers x wall - 1-worker compute) / points: also counts the
  slow-down of the simulation itself (contention, Ray's own processes on the same CPUs).

Each Ray run starts a local Ray instance with ``num_cpus=2``, warms it up with an 8-point sweep
(its workers import simmoe), times the sweep, and stops Ray; start-up is reported apart.
Every run's ``results.parquet`` is checked to be byte-identical to the first one.

The machine may be shared. From ``/proc`` (Linux), the benchmark measures *foreign* CPU: the
CPU time of all processes minus that of this process and its descendants (workers, Ray's
processes). Before each run it waits (``--quiet-wait``) until foreign CPU stays below 0.1 CPU
for 2 s; a run during which foreign CPU averaged more than ``--max-foreign`` CPUs is rejected
and done again (3 tries).

    python bench/bench_sweep.py [--points 1000] [--repeats 3] [--out bench/RESULTS-sweep.md]
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from simulator.atomic import write_text
from simulator.sweep import sweep

BASE = {
    "name": "bench",
    "model": {"preset": "published-study", "num_layers": 2, "num_experts": 16},
    "replications": 1,
    "batch_sizes": [1],
    "trace": {"generator": "mixed", "steps": 8, "zipf": 0.5, "batch_locality": 0.5, "batch_pool": 4},
    "policies": [{"name": "dedup", "load": "dedup"}, {"name": "lru", "cache": {"kind": "lru", "capacity": 8}}],
}
CLK = os.sysconf("SC_CLK_TCK")


def spec(points: int) -> dict:
    return {"name": "bench", "base": BASE, "grid": {"seed": list(range(points // 4)), "batch_sizes": [1, 2, 4, 8]}}


# ------------------------------------------------------------------ CPU accounting (Linux)
def system_busy_s() -> float:
    """CPU seconds all processes have used since boot (all CPUs, /proc/stat)."""
    vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(vals) - vals[3] - vals[4]) / CLK          # minus idle and iowait


def own_cpu_s() -> float:
    """CPU seconds of this process and its live descendants, reaped children included."""
    procs: dict[int, tuple[int, float]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                text = (d / "stat").read_text()
            except OSError:
                continue
            f = text[text.rindex(")") + 2:].split()
            procs[int(d.name)] = (int(f[1]), sum(int(x) for x in f[11:15]) / CLK)
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += procs.get(pid, (0, 0.0))[1]
        todo += kids.get(pid, [])
    return total


class Foreign:
    """Average CPUs used by other processes between start() and stop()."""

    def start(self) -> None:
        self.t, self.sys, self.own = time.monotonic(), system_busy_s(), own_cpu_s()

    def stop(self) -> float:
        dt = time.monotonic() - self.t
        return max(0.0, (system_busy_s() - self.sys) - (own_cpu_s() - self.own)) / dt


def wait_for_quiet(limit_s: float, threshold: float = 0.1) -> None:
    """Wait (at most ``limit_s``) until other processes use less than ``threshold`` CPUs for 2 s."""
    t0, f = time.monotonic(), Foreign()
    while time.monotonic() - t0 < limit_s:
        f.start()
        time.sleep(2)
        if f.stop() < threshold:
            return


# ------------------------------------------------------------------------- measuring
def timed(sw: dict, tmp: Path, quiet_s: float, **kw) -> tuple[dict, bytes]:
    out = tmp / "out"
    shutil.rmtree(out, ignore_errors=True)
    wait_for_quiet(quiet_s)
    f = Foreign()
    f.start()
    df = sweep(sw, out=out, **kw)
    st = dict(df.attrs["sweep"], foreign=f.stop())
    assert st["ran"] == st["points"] and st["failed"] == 0
    return st, (out / "results.parquet").read_bytes()


def accepted_run(label: str, sw: dict, tmp: Path, args, reference: list, **kw) -> dict:
    """One run during which other processes used at most ``args.max_foreign`` CPUs (3 tries)."""
    for _ in range(3):
        st, data = timed(sw, tmp, args.quiet_wait, **kw)
        if not reference:
            reference.append(data)
        assert data == reference[0], f"{label}: results differ from the first run"
        ok = st["foreign"] <= args.max_foreign
        print(f"  {label}: wall {st['wall_s']:.2f} s, compute {st['compute_s']:.2f} s, "
              f"foreign CPU {st['foreign']:.2f}{'' if ok else ' (rejected)'}", flush=True)
        if ok:
            return st
    raise SystemExit(f"{label}: other jobs used the CPUs during every try; run again on a quiet machine")


def ray_run(sw: dict, tmp: Path, args, reference: list, startup: list) -> dict:
    """A Ray instance (num_cpus=2) started, warmed up by 8 points, timed on the sweep, stopped."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    try:
        sweep(spec(8), backend="ray", out=tmp / "warm-up")
        startup.append(time.perf_counter() - t0)
        return accepted_run("ray, 2 CPUs", sw, tmp, args, reference, backend="ray", workers=2)
    finally:
        ray.shutdown()


def table(runs: dict[str, list[dict]]) -> list[str]:
    """Medians per backend; speed-up = median over rounds of (1-worker wall / wall) in that round."""
    first = runs["local, 1 worker"]
    serial = statistics.median(r["compute_s"] for r in first)
    lines = [
        "| backend | wall (s, median) | speed-up vs 1 worker (median of rounds) | compute in points (s, median) "
        "| overhead per point (ms) | overhead per point vs serial (ms) | walls by round (s) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for label, rs in runs.items():
        n, w = rs[0]["points"], rs[0]["workers"]
        wall = statistics.median(r["wall_s"] for r in rs)
        comp = statistics.median(r["compute_s"] for r in rs)
        speedup = statistics.median(a["wall_s"] / r["wall_s"] for a, r in zip(first, rs))
        walls = ", ".join(f"{r['wall_s']:.2f}" for r in rs)
        lines.append(f"| {label} | {wall:.2f} | {speedup:.2f}x | {comp:.2f} | {(w * wall - comp) / n * 1e3:.2f} | "
                     f"{(w * wall - serial) / n * 1e3:.2f} | {walls} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=1000, help="points in the sweep (a multiple of 4)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (each runs every backend once)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray backend")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="before each run, wait up to this many seconds for other jobs to leave the CPUs")
    ap.add_argument("--max-foreign", type=float, default=0.1,
                    help="reject (and redo, 3 tries) a run during which other processes used more CPUs than this")
    ap.add_argument("--out", type=Path, help="also write the results as Markdown here")
    args = ap.parse_args()
    sw = spec(args.points)
    ref: list[bytes] = []
    runs: dict[str, list[dict]] = {"local, 1 worker": [], "local, 2 workers": []}
    startup: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for _ in range(args.repeats):
            runs["local, 1 worker"].append(accepted_run("local, 1 worker", sw, tmp, args, ref, workers=1))
            runs["local, 2 workers"].append(accepted_run("local, 2 workers", sw, tmp, args, ref, workers=2))
            if not args.no_ray:
                runs.setdefault("ray, 2 CPUs", []).append(ray_run(sw, tmp, args, ref, startup))
    cmd = "python bench/bench_sweep.py " + " ".join(sys.argv[1:])
    env = f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"
    ray_line = (f"Ray start-up (ray.init(num_cpus=2) + an 8-point warm-up sweep, not in the walls): median "
                f"{statistics.median(startup):.1f} s.  " if startup else "")
    text = "\n".join([
        f"# Sweep benchmark: {args.points} points", "",
        f"Command: `{cmd.strip()}`  ", f"Machine: {env}  ", ray_line,
        f"{args.repeats} rounds, each running every backend once, in turn. Every run's results.parquet was "
        "byte-identical to the first one's.", "",
        *table(runs), "",
        "Overhead per point = (workers x wall - compute in points) / points; vs serial: with the "
        "1-worker runs' compute instead.", "",
    ])
    print(text)
    if args.out:
        write_text(args.out, text)


if __name__ == "__main__":
    main()
