"""What users run today, timed live, against simmoe's projection of it.

transformers with each MoE layer's experts offloaded by accelerate (weights in host memory,
every one copied to the GPU at each forward: calibrate/executors/accelerate.py) against
simmoe's ``layer`` load mode in the same engine style (calibrate/validation/accelerate.py).

    python bench/accelerate_baseline.py --out DIR [--model olmoe-1b-7b] [--style grouped]
        [--batches 1,4,16] [--prompt 256] [--steps 6] [-p h200] [--cpus 2-9]
    python bench/accelerate_baseline.py --out DIR --tiny --device cpu --no-project   (a smoke test)

Needs accelerate (`pip install accelerate`; on the lent H200 carry its wheel and psutil's).
Writes DIR/accelerate-baseline.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from calibrate.validation.accelerate import STYLES, accelerate_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", default="olmoe-1b-7b")
    ap.add_argument("--style", default="grouped", choices=STYLES)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("-p", "--profile", default="h200")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--no-project", action="store_true")
    ap.add_argument("--cpus", help="pin to these CPUs with as many torch threads, e.g. 2-9")
    a = ap.parse_args()
    from calibrate.measurements.host_speed import apply_cpus
    apply_cpus(a.cpus)
    from simulator.errors import InputError
    try:
        rep = accelerate_rows(a.model, style=a.style, batches=[int(x) for x in a.batches.split(",")],
                              prompt=a.prompt, steps=a.steps, warmup=a.warmup, profile=a.profile, device=a.device, layers=a.layers,
                              tiny=a.tiny, project=not a.no_project, say=print)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    errs = [abs(r["error_pct"]) for r in rep["rows"] if "error_pct" in r]
    if errs:
        print(f"median |error| {statistics.median(errs):.1f}%, worst {max(errs):.1f}% over {len(errs)} row(s)")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "accelerate-baseline.json").write_text(json.dumps(rep, indent=1))
    print(f"wrote {a.out / 'accelerate-baseline.json'}")


if __name__ == "__main__":
    main()
