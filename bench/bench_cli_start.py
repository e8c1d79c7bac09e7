"""How long the command line takes to start: ``simmoe --help`` (issue 14: under 0.3 s).

Side by side in one run, medians of ``--repeats`` runs each: a bare ``python -c pass`` (the
interpreter's own start), ``python -m simmoe.cli --help`` (what the ``simmoe`` script runs), and the import of ``simmoe.cli`` with
the modules it loads (no pandas, scipy or numpy may be among them).

    python bench/bench_cli_start.py --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def wall(cmd: list[str], repeats: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=REPO)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    py = sys.executable
    bare = wall([py, "-c", "pass"], a.repeats)
    help_ = wall([py, "-m", "simmoe.cli", "--help"], a.repeats)   # what the `simmoe` script runs
    code = ("import sys, simmoe.cli; print(' '.join(m for m in ('pandas', 'scipy', 'numpy', 'simpy', 'matplotlib') "
            "if m in sys.modules) or 'none')")
    heavy = subprocess.run([py, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    print(f"python -c pass          {bare:.3f} s (median of {a.repeats})")
    print(f"simmoe --help           {help_:.3f} s (median of {a.repeats}); simmoe's part {help_ - bare:.3f} s")
    print(f"heavy modules loaded by simmoe.cli: {heavy.stdout.strip()}")


if __name__ == "__main__":
    main()
