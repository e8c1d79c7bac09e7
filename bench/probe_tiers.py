"""Live check of the tier paths on a GPU (issue 16): calibrates the tier terms on this machine
(dequantise kernels, direct reads from mapped pinned memory, this machine's disk) into a
profile, then runs scenarios/validate_tiers.yaml live against the simulator with it.

    python bench/probe_tiers.py --out DIR [--disk-dir /tmp] [--base h200]

Writes DIR/tiers-profile.json (the base profile with its measured ``tiers`` section) and
DIR/validate-tiers.json (rows: decisions identical, live vs projected latency)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--disk-dir", default="/tmp")
    ap.add_argument("--base", default="h200")
    ap.add_argument("--scenario", default="scenarios/validate_tiers.yaml")
    ap.add_argument("--skip-calibrate", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    prof = a.out / "tiers-profile.json"
    if not a.skip_calibrate:          # stage by stage: one that fails leaves the others measured
        base = a.base
        for stage, extra in (("dequant", []), ("direct", []),
                             ("disk", ["--disk-dir", a.disk_dir, "--disk-file-mib", "2048"])):
            t0 = time.time()
            cmd = [sys.executable, "-m", "simmoe", "calibrate", "tiers", "-d", "cuda", "--stage", stage,
                   "--base", base, "-o", str(prof), *extra]
            print(" ".join(cmd), flush=True)
            if subprocess.run(cmd).returncode == 0:
                base = str(prof)
            print(f"calibrate tiers {stage}: {time.time() - t0:.0f} s", flush=True)
    from calibrate.validation.validate import validate
    from simulator.scenario import load_scenario

    sc, base_dir = load_scenario(a.scenario)
    rows, errors = [], {}
    for pol in sc.policies:            # policy by policy: a path that fails leaves the others run
        t0 = time.time()
        try:
            rep = validate(sc.model_copy(update={"policies": [pol], "baseline": None}), profile=str(prof),
                           device="cuda", base_dir=base_dir, repeats=2, row_budget_s=6.0, host_now=False,
                           tier_dir=a.disk_dir)
            rows += rep["rows"]
        except Exception as e:          # noqa: BLE001  (reported, not hidden)
            errors[pol.name] = f"{type(e).__name__}: {e}"
        print(f"{pol.name}: {time.time() - t0:.0f} s {errors.get(pol.name, '')}", flush=True)
        # after each policy: a run cut short keeps the rows it made
        (a.out / "validate-tiers.json").write_text(json.dumps({"rows": rows, "errors": errors}, indent=1, default=str))
    for r in rows:
        print(f"{r['policy']:>14} B={r['batch_size']:<3} live {r['live_median_ms']:8.3f} sim {r['sim_median_ms']:8.3f} "
              f"err {r['error_pct']:+6.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
