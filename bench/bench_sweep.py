"""Sweep throughput: a 1,000-point sweep on 1 and 2 local workers and on Ray with 2 CPUs.

Each point is a small scenario (2 MoE layers of 16 experts, 2 policies, 1 replication of 8
decode steps); the grid is 250 seeds x 4 batch sizes. Every run starts from an empty results
folder and includes expanding and validating the 1,000 points, starting the workers, writing
the Parquet parts and the consolidated results. For each backend the median of ``--repeats``
runs is reported with:

- wall time and speed-up over 1 local worker;
- compute: the sum over points of the time spent inside the point (its simulation);
- overhead per point = (workers x wall - compute) / points: worker time not spent simulating
  (validation, scheduling, pickling, Parquet writes, idle workers at the end).

Ray runs on a local Ray instance started with ``num_cpus=2`` before the timed runs (its
start-up time is reported separately). Every run's ``results.parquet`` is checked to be
byte-identical to the first one.

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

from simulator.sweep import sweep

BASE = {
    "name": "bench",
    "model": {"preset": "published-study", "num_layers": 2, "num_experts": 16},
    "replications": 1,
    "batch_sizes": [1],
    "trace": {"generator": "mixed", "steps": 8, "zipf": 0.5, "batch_locality": 0.5, "batch_pool": 4},
    "policies": [{"name": "dedup", "load": "dedup"}, {"name": "lru", "cache": {"kind": "lru", "capacity": 8}}],
}


def spec(points: int) -> dict:
    return {"name": "bench", "base": BASE, "grid": {"seed": list(range(points // 4)), "batch_sizes": [1, 2, 4, 8]}}


def cpu_pressure() -> float | None:
    """Linux PSI: % of the last 10 s in which some runnable task waited for a CPU."""
    try:
        return float(Path("/proc/pressure/cpu").read_text().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def wait_for_quiet(limit_s: float, threshold: float = 15.0) -> None:
    """On a shared machine, wait (at most ``limit_s``) until other processes leave the CPUs."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        p = cpu_pressure()
        if p is None or p < threshold:
            return
        time.sleep(2)


def timed(sw: dict, tmp: Path, quiet_s: float, **kw) -> tuple[dict, bytes]:
    out = tmp / "out"
    shutil.rmtree(out, ignore_errors=True)
    wait_for_quiet(quiet_s)
    df = sweep(sw, out=out, **kw)
    st = dict(df.attrs["sweep"], pressure=cpu_pressure())
    assert st["ran"] == st["points"] and st["failed"] == 0
    return st, (out / "results.parquet").read_bytes()


def measure(label: str, sw: dict, tmp: Path, repeats: int, quiet_s: float, reference: list, **kw) -> dict:
    runs = []
    for _ in range(repeats):
        st, data = timed(sw, tmp, quiet_s, **kw)
        if not reference:
            reference.append(data)
        assert data == reference[0], f"{label}: results differ from the first run"
        runs.append(st)
        print(f"  {label}: wall {st['wall_s']:.2f} s, compute {st['compute_s']:.2f} s, "
              f"CPU pressure after {st['pressure']}", flush=True)
    med = sorted(runs, key=lambda s: s["wall_s"])[len(runs) // 2]
    n, w = med["points"], med["workers"]
    return {"label": label, "points": n, "workers": w, "wall_s": med["wall_s"], "compute_s": med["compute_s"],
            "walls": [r["wall_s"] for r in runs],
            "overhead_ms": (w * med["wall_s"] - med["compute_s"]) / n * 1e3}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=1000, help="points in the sweep (a multiple of 4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray backend")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="before each run, wait up to this many seconds for CPU pressure (Linux PSI) < 15%%")
    ap.add_argument("--out", type=Path, help="also write the results as Markdown here")
    args = ap.parse_args()
    sw = spec(args.points)
    ref: list[bytes] = []
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows.append(measure("local, 1 worker", sw, tmp, args.repeats, args.quiet_wait, ref, workers=1))
        rows.append(measure("local, 2 workers", sw, tmp, args.repeats, args.quiet_wait, ref, workers=2))
        ray_start = None
        if not args.no_ray:
            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
            ray_start = time.perf_counter() - t0
            try:
                rows.append(measure("ray, 2 CPUs", sw, tmp, args.repeats, args.quiet_wait, ref, backend="ray", workers=2))
            finally:
                ray.shutdown()
    base = rows[0]["wall_s"]
    lines = [
        f"| backend | wall (s, median of {args.repeats}) | speed-up vs 1 worker | compute in points (s) | "
        "overhead per point (ms) | all walls (s) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['wall_s']:.2f} | {base / r['wall_s']:.2f}x | {r['compute_s']:.2f} | "
                     f"{r['overhead_ms']:.2f} | {', '.join(f'{w:.2f}' for w in r['walls'])} |")
    cmd = "python bench/bench_sweep.py " + " ".join(sys.argv[1:])
    env = (f"{platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs "
           f"({platform.processor() or platform.platform()})")
    text = "\n".join([
        f"# Sweep benchmark: {args.points} points", "",
        f"Command: `{cmd.strip()}`  ", f"Machine: {env}  ",
        f"Ray start-up (ray.init, num_cpus=2, not in the walls): {ray_start:.1f} s  " if ray_start else "",
        "Every run's results.parquet was byte-identical to the first one's.", "",
        *lines, "",
        "Overhead per point = (workers x wall - compute in points) / points.", "",
    ])
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
