"""Build the two reference profiles shipped in ``simulator/profiles`` from published figures.

    python -m calibrate.reference ../shared/reference

- ``rtx3090-published``: the published RTX 3090 study (pageable copies of a 27.0 MiB fp32
  expert, 100 trials per configuration). One copy size only, so the copy curve is one point:
  the median per-copy time over the six published rows. Pinned copies were not measured;
  the pinned curve is an assumption (PCIe Gen4 x16 at 24 GB/s) and says so.
- ``h100-probe``: the one-off H100 probe (CUDA-event medians); a sanity reference. The
  calibrated ``h100-pcie5`` profile (``simmoe calibrate``) supersedes it as the default.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from simulator.atomic import write_text
from simulator.profile import PROFILE_FORMAT, PROFILE_VERSION, parse_profile

STUDY_EXPERT_BYTES = 3 * 768 * 3072 * 4
# (batch, experts per item, computation ms, transfer ms) from reference/README.md
PUBLISHED_ROWS = [
    (1, 1, 4.72, 3.47), (1, 10, 4.35, 41.39),
    (2, 1, 7.26, 7.66), (2, 10, 7.19, 69.38),
    (4, 1, 12.48, 16.24), (4, 10, 12.41, 146.60),
]
PROBE_SHAPES = {
    "seed_768x3072_fp32": "768x3072-fp32-gated",
    "seed_768x3072_bf16": "768x3072-bf16-gated",
    "mixtral_4096x14336_bf16": "4096x14336-bf16-gated",
}


def rtx3090_published() -> dict:
    per_copy = [t / (b * n) for b, n, _, t in PUBLISHED_ROWS]
    copy_ms = statistics.median(per_copy)
    latency_us = 10.0  # assumed: not separable from one copy size
    bw = STUDY_EXPERT_BYTES / ((copy_ms - latency_us * 1e-3) * 1e-3) / 1e9
    comp: dict[int, list[float]] = {}
    for b, _, c, _ in PUBLISHED_ROWS:
        comp.setdefault(b, []).append(c)
    return {
        "format": PROFILE_FORMAT, "version": PROFILE_VERSION, "name": "rtx3090-published",
        "provenance": {
            "kind": "published measurements",
            "gpu": "NVIDIA GeForce RTX 3090 (24 GB)", "pcie": "Gen4 x16 (not stated)",
            "source": "shared/reference/README.md: published RTX 3090 study, 100 trials, mean +- std",
            "notes": (
                f"pageable copy of one 27.0 MiB expert = {copy_ms:.4f} ms, the median per-copy "
                f"time over the six published rows (per-copy times range "
                f"{min(per_copy):.3f}-{max(per_copy):.3f} ms). Pinned copies were not measured: "
                "the pinned curve (10 us + 24 GB/s) is assumed. Computation column: mean of "
                "the 1- and 10-expert rows per batch size, stored as the time for that many tokens."
            ),
        },
        "copy": {"h2d": {
            "pageable": {"latency_us": latency_us, "bandwidth_GBps": round(bw, 4),
                         "table": [[STUDY_EXPERT_BYTES, round(copy_ms, 6)]]},
            "pinned": {"latency_us": 10.0, "bandwidth_GBps": 24.0, "table": []},
        }},
        "compute": {"gpu": {"768x3072-fp32-gated": [[b, round(statistics.mean(v), 4)] for b, v in sorted(comp.items())]}},
        "host": {"launch_us": {"copy": 5.0, "expert": 20.0, "dense": 5.0}, "sync_us": 10.0,
                 "pageable_blocks_host": True},
        "measurements": {"published_rows": [
            {"batch": b, "experts": n, "computation_ms": c, "transfer_ms": t} for b, n, c, t in PUBLISHED_ROWS]},
    }


def h100_probe(probe: dict, name: str = "h100-probe") -> dict:
    h2d = probe["h2d"]
    def curve(key: str, big_from: int) -> dict:
        pts = [[r["bytes"], r[key]] for r in h2d]
        big = [(b, ms) for b, ms in pts if b >= big_from]
        (b0, m0), (b1, m1) = big[0], big[-1]
        bw = (b1 - b0) / ((m1 - m0) * 1e-3) / 1e9
        return {"latency_us": round(pts[0][1] * 1e3, 3), "bandwidth_GBps": round(bw, 3), "table": pts}
    gpu: dict[str, list] = {}
    for r in probe["compute"]:
        gpu.setdefault(PROBE_SHAPES[r["expert"]], []).append([r["tokens"], r["median_ms"]])
    return {
        "format": PROFILE_FORMAT, "version": PROFILE_VERSION, "name": name,
        "provenance": {
            "kind": "probe", "gpu": probe["gpu"], "pcie": "Gen5 x16", "torch": probe["torch"],
            "date": "2026-11-23", "source": "shared/reference/h100-probe-2026-11-23.json",
            "notes": "one un-replicated probe (CUDA-event medians); no CPU expert timings. "
                     "Use a calibrated profile for projections you report.",
        },
        "copy": {"h2d": {"pinned": curve("pinned_ms", 64 << 20), "pageable": curve("pageable_ms", 64 << 20)},
                 "d2h": {"pinned": {"latency_us": 10.6, "bandwidth_GBps": 55.0,
                                    "table": [[r["bytes"], r["d2h_pinned_ms"]] for r in h2d]}}},
        "compute": {"gpu": gpu},
        "host": {"launch_us": {"copy": 6.0, "expert": 25.0, "dense": 6.0}, "sync_us": 15.0,
                 "pageable_blocks_host": True},
        "measurements": {k: v for k, v in probe.items() if k not in ("h2d", "compute")},
    }


def main(ref_dir: str) -> None:
    out = Path(__file__).resolve().parent.parent / "simulator" / "profiles"
    probe = json.loads((Path(ref_dir) / "h100-probe-2026-11-23.json").read_text())
    docs = [rtx3090_published(), h100_probe(probe)]
    if not (out / "h100-pcie5.json").exists():  # placeholder until `simmoe calibrate` replaces it
        docs.append(h100_probe(probe, name="h100-pcie5"))
    for doc in docs:
        parse_profile(doc, doc["name"])  # validate before writing
        write_text(out / f"{doc['name']}.json", json.dumps(doc, indent=1) + "\n")
        print("wrote", out / f"{doc['name']}.json")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/reference")
