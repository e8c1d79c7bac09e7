"""Benchmark: importing recorded routing and computing its statistics.

    python bench/bench_trace_import.py [--trace ../shared/traces/deepseek-v2-lite-puffin]
                                       [--scale 10] [--work /tmp/simmoe-bench-traces]
                                       [--out bench/RESULTS-traces.md]

Measures, each in a fresh Python process:

1. ``trace import`` of the shared 300-prompt DeepSeek-V2-Lite trace: wall time, peak RSS of the
   process (and of the same process before importing anything heavy), and the peak of traced
   Python/numpy allocations (tracemalloc, a separate run since tracing slows Python down);
2. ``trace stats`` on the imported file: the same figures;
3. the import of a corpus ``--scale`` times larger, written in the same CSV layout into
   ``--work`` (every prompt repeated, expert ids relabelled per copy): import memory must not
   grow with the corpus.

Writes a Markdown table (and the command) to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, resource, sys, time, tracemalloc
what, src, out, traced = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
from simulator.atomic import write_text
from simulator.traces.real import import_sequences, load_sequences
from simulator.traces.stats import trace_stats
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if traced:
    tracemalloc.start()
t0 = time.perf_counter()
if what == "import":
    ss = import_sequences(src, out)
    info = {"sequences": ss.num_sequences, "tokens": ss.num_tokens}
else:
    st = trace_stats(load_sequences(src))
    info = {"reuse": st["temporal"]["mean"], "lru_requests": st["lru"]["requests"]}
wall = time.perf_counter() - t0
peak = tracemalloc.get_traced_memory()[1] if traced else None
print(json.dumps({"wall_s": wall, "rss_base_kb": base, "rss_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "traced_peak_b": peak, **info}))
"""


def measure(what: str, src: Path, out: Path) -> dict:
    """Run one job twice in fresh processes: untraced (time, RSS) and traced (allocation peak)."""
    runs = []
    for traced in ("0", "1"):
        p = subprocess.run([sys.executable, "-c", _CHILD, what, str(src), str(out), traced], cwd=REPO,
                           capture_output=True, text=True, check=True)
        runs.append(json.loads(p.stdout))
    plain, traced_run = runs
    return {**plain, "traced_peak_b": traced_run["traced_peak_b"], "traced_wall_s": traced_run["wall_s"]}


def write_scaled_corpus(src: Path, dest: Path, scale: int) -> int:
    """``scale`` copies of every prompt CSV (expert ids relabelled per copy); returns bytes written."""
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.csv"))
    total = 0
    for c in range(scale):
        for f in files:
            target = dest / f"{f.stem}_{c}.csv"
            with open(f, newline="", encoding="utf-8") as fin, open(target, "w", newline="", encoding="utf-8") as fout:
                rd, wr = csv.reader(fin), csv.writer(fout)
                wr.writerow(next(rd))
                for row in rd:
                    ids = [(int(x) + 7 * c) % 64 for x in row[3].strip("[]").split(",")]
                    row[3] = "[" + ", ".join(map(str, ids)) + "]"
                    wr.writerow(row)
            total += target.stat().st_size
    return total


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=REPO.parent / "shared" / "traces" / "deepseek-v2-lite-puffin")
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--work", type=Path, default=Path("/tmp/simmoe-bench-traces"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "RESULTS-traces.md")
    args = ap.parse_args()
    if not args.trace.exists():
        sys.exit(f"trace not found: {args.trace}")
    args.work.mkdir(parents=True, exist_ok=True)
    small = args.work / "deepseek.npz"
    big_src = args.work / f"corpus_x{args.scale}"
    rows = []
    print("import 1x ...", flush=True)
    rows.append(("import", f"300 prompts ({dir_bytes(args.trace) / 1e6:.1f} MB CSV)", measure("import", args.trace, small)))
    print("stats 1x ...", flush=True)
    rows.append(("trace stats", "the imported 300 prompts", measure("stats", small, small)))
    if not big_src.exists():
        print(f"writing the x{args.scale} corpus into {big_src} ...", flush=True)
        t = time.perf_counter()
        write_scaled_corpus(args.trace, big_src, args.scale)
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    print(f"import x{args.scale} ...", flush=True)
    rows.append(("import", f"{args.scale} x 300 prompts ({dir_bytes(big_src) / 1e6:.0f} MB CSV)",
                 measure("import", big_src, args.work / "big.npz")))

    cmd = "python bench/bench_trace_import.py" + ("" if args.scale == 10 else f" --scale {args.scale}")
    lines = [
        "## Real traces: import and statistics",
        "",
        f"`{cmd}` on {platform.node() or 'this machine'} ({platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}); each row a fresh process. RSS: peak resident set of the whole "
        "process (the interpreter with numpy/pandas loaded is the 'before' figure); traced: peak of Python and "
        "numpy allocations during the job (tracemalloc, separate run).",
        "",
        "| job | input | tokens | wall s | peak RSS MB (before) | traced peak MB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for job, what, r in rows:
        lines.append(f"| {job} | {what} | {r.get('tokens', '')} | {r['wall_s']:.2f} | "
                     f"{r['rss_peak_kb'] / 1024:.0f} ({r['rss_base_kb'] / 1024:.0f}) | {r['traced_peak_b'] / 1e6:.2f} |")
    small_imp, big_imp = rows[0][2], rows[2][2]
    lines += [
        "",
        f"{args.scale}x the corpus: import time x{big_imp['wall_s'] / small_imp['wall_s']:.1f}, traced peak "
        f"x{big_imp['traced_peak_b'] / small_imp['traced_peak_b']:.2f}, process RSS growth over its start "
        f"{(small_imp['rss_peak_kb'] - small_imp['rss_base_kb']) / 1024:.0f} MB -> "
        f"{(big_imp['rss_peak_kb'] - big_imp['rss_base_kb']) / 1024:.0f} MB.",
        "",
    ]
    write_text(args.out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
