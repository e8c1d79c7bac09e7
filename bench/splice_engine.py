"""Splice two `simmoe calibrate engine` documents of one model into one, for `engine-merge`.

Until 2026-12-04 the decode grid put the cache back after each trial with a crop, which leaves
a strided view whose next append (``torch.cat``) takes the GPU's element-wise path: OLMoE's
decode layer at B=16 and 4,032 tokens timed 1.85 ms of GPU work, 0.53 ms over a contiguous
cache as a running model has it (bench/probe_decode_attention.py, docs/validation.md). The
fix (:func:`calibrate.measurements.engine.restore_kv`) changes the GPU-bound points only; a
host-bound point's wall is its kernels' issue, which a crop does not touch.

The H200's time of that session allowed the tables again but not the in situ steps (whose
factors are taken against the tables: `engine-merge` recomputes them from the steps' raw
times). So this writes one document: ``--old`` (a run with its in situ steps), each of its
decode grids (``decode``, ``dense_decode``) mended from ``--decode-from`` (the same grid
timed over a contiguous cache): every point's GPU time the new one, and its wall the old less
the GPU time the crop added, as far as it showed: beyond the host's issue of the layer and the
tail every call has after its last launch (``wall - host - tail``; the tail the median
``wall - host`` of the old points whose new GPU time is under half their host time: 0.05 ms
for OLMoE), the part of a wall the GPU's work makes. The host time stays the old, the
host's state that the old run's in situ steps met. Where both runs' points are GPU-bound the
mended walls are the new run's within 2.5% on OLMoE (B=64, 128, 256 at 4,032 tokens: 2.51,
3.87, 7.28 ms mended, 2.57, 3.79, 7.31 timed).

    python bench/splice_engine.py --old OLD.json --decode-from NEW.json -o OUT.json
    simmoe calibrate engine-merge OUT.json -p PROFILE.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path


def splice(old: dict, new: dict) -> tuple[dict, int, int]:
    """``old`` with its decode grids mended from ``new``; (document, points whose wall moved,
    points mended)."""
    if old["model"] != new["model"]:
        raise SystemExit(f"--old is {old['model']}, --decode-from {new['model']}")
    out = copy.deepcopy(old)
    moved = mended = 0
    for table in ("decode", "dense_decode"):
        if table not in out["tables"]:
            continue
        od, nd = out["tables"][table], new["tables"][table]
        if nd["batch"] != od["batch"] or nd["context"] != od["context"]:
            raise SystemExit(f"{table}: --decode-from has other batches or contexts")
        pairs = [(q, p) for orow, nrow in zip(od["points"], nd["points"]) for q, p in zip(orow, nrow)
                 if q is not None and p is not None and "gpu_ms" in p and "gpu_ms" in q]
        light = [q["ms"] - q["host_ms"] for q, p in pairs if p["gpu_ms"] < 0.5 * q["host_ms"]]
        tail = max(0.0, statistics.median(light)) if light else 0.0
        for orow, nrow in zip(od["points"], nd["points"]):
            for j, (q, p) in enumerate(zip(orow, nrow)):
                if q is None or p is None or "gpu_ms" not in p or "gpu_ms" not in q:
                    continue
                shown = min(max(0.0, q["gpu_ms"] - p["gpu_ms"]), max(0.0, q["ms"] - q["host_ms"] - tail))
                orow[j] = {**q, "ms": q["ms"] - shown, "gpu_ms": p["gpu_ms"], "crop_ms": shown}
                mended += 1
                moved += shown > 0.01 * q["ms"]
    return out, moved, mended


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="the run whose in situ steps are kept")
    ap.add_argument("--decode-from", type=Path, required=True, help="the decode grids over a contiguous cache")
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args()
    doc, moved, mended = splice(json.loads(a.old.read_text()), json.loads(a.decode_from.read_text()))
    doc["command"] = f"python bench/splice_engine.py --old {a.old.name} --decode-from {a.decode_from.name}"
    a.out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {a.out}: {a.old.name}, its decode grids mended from {a.decode_from.name} "
          f"({mended} point(s), {moved} of whose walls moved over 1%)")


if __name__ == "__main__":
    main()
