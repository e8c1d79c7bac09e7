"""The host's speed on a GPU machine: the kernel-dispatch probe per pinned core, as a time
series (all cores, one core, cores 2-9), and a pure-Python loop beside the probe on one core.

    python bench/host_noise.py OUT_DIR      (on the GPU host; ~40 s; writes OUT_DIR/noise.json)

docs/validation.md ("The host's two speeds") reads its output from the lent H200."""
import json, os, statistics, sys, time, subprocess
import torch
from calibrate.measurements.host_speed import host_probe
out = sys.argv[1]
dev = "cuda"
host_probe(dev)
res = {"cpus": sorted(os.sched_getaffinity(0))}
try:
    res["lscpu"] = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
except Exception as e:
    res["lscpu"] = str(e)
allc = sorted(os.sched_getaffinity(0))
per = {}
for c in allc:
    os.sched_setaffinity(0, {c})
    v = [host_probe(dev)["dispatch_us"] for _ in range(15)]
    per[c] = [statistics.median(v), min(v), max(v)]
res["per_core"] = per
def series(mask, n=150, gap=0.05):
    os.sched_setaffinity(0, mask)
    s = []
    t0 = time.perf_counter()
    for _ in range(n):
        s.append((time.perf_counter() - t0, host_probe(dev)["dispatch_us"]))
        time.sleep(gap)
    return s
res["series_all"] = series(set(allc))
res["series_core3"] = series({3})
res["series_2_9"] = series(set(range(2, 10)))
# python-only speed (no CUDA) beside the probe, pinned to core 3
os.sched_setaffinity(0, {3})
py = []
for _ in range(60):
    t0 = time.perf_counter(); x = 0
    for i in range(20000): x += i
    py.append((time.perf_counter() - t0) * 1e6 / 20000)
    pr = host_probe(dev)["dispatch_us"]
    py[-1] = (py[-1], pr)
    time.sleep(0.05)
res["python_vs_probe_core3"] = py
json.dump(res, open(os.path.join(out, "noise.json"), "w"), indent=1)
for k in ("series_all", "series_core3", "series_2_9"):
    v = [x for _, x in res[k]]
    q = statistics.quantiles(v, n=10)
    print(k, "median %.2f p10 %.2f p90 %.2f min %.2f max %.2f" % (statistics.median(v), q[0], q[-1], min(v), max(v)))
print("per core median:", {c: round(v[0], 2) for c, v in per.items()})
