"""Probe: does a layer's GPU work run slower after the GPU idled behind a layer's copies?

In a copy-bound step (dedup at B=64) the compute stream has nothing to do for ~15 ms while a
layer's experts copy in, then runs the layer's grouped call and the next layer's non-expert
part. Live, the copy stream idles 1.43-1.55 ms at each layer boundary (OLMoE, the fourth
session's CUPTI timeline), where the projection has 0.75 ms (grouped call 0.35 + dense GPU
part 0.32 + router): the dedup and LRU rows' 3-6% offset. Calibration times that GPU work
back to back, or behind a sleep kernel, with the SMs busy all the while. If the clocks drop
while the SMs idle, the first work after the wait runs slower than calibration measured.

This probe times OLMoE's grouped call at B=64 (64 experts of 2048 x 1024, 8 tokens each,
transformers' grouped_mm over a slot pool) and a stand-in for the dense part (one 64 x 2048
by 2048 x 6144 GEMM, then 2048 x 2048) in four settings: back to back; after the host slept
``--idle-ms`` with the GPU idle; after a sleep kernel of as long (SMs busy); and after
``--idle-ms`` of expert copies on a copy stream, waited for by the compute stream (the
executor's pattern). CUDA events around the work itself, medians over ``--rounds``.

    python bench/probe_gpu_after_idle.py [--idle-ms 15] [--rounds 30] [-o probe-gpu-after-idle.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from calibrate.executors.model import grouped_mm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle-ms", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("-o", "--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    E, H, F, per = 64, 2048, 1024, 8
    bf = torch.bfloat16
    pool = torch.randn(E, 3 * F * H, device=dev, dtype=bf) * 0.02
    gate_up = pool[:, :2 * F * H].view(E, 2 * F, H).transpose(-2, -1)
    down = pool[:, 2 * F * H:].view(E, H, F).transpose(-2, -1)
    x = torch.randn(E * per, H, device=dev, dtype=bf)
    offs = torch.arange(per, E * per + 1, per, device=dev, dtype=torch.int32)
    h = torch.randn(64, H, device=dev, dtype=bf)
    w1 = torch.randn(H, 3 * H, device=dev, dtype=bf) * 0.02
    w2 = torch.randn(H, H, device=dev, dtype=bf) * 0.02
    nbytes = 3 * F * H * 2
    n_copies = max(1, int(a.idle_ms / (nbytes / 53e6)))        # ~53 GB/s a pinned copy
    host = [torch.empty(3 * F * H, dtype=bf, pin_memory=True) for _ in range(min(n_copies, 16))]
    slots = torch.empty(n_copies, 3 * F * H, device=dev, dtype=bf)
    copy_stream = torch.cuda.Stream(dev)
    compute = torch.cuda.current_stream(dev)
    cycles = int(a.idle_ms * 1e-3 * torch.cuda.get_device_properties(dev).clock_rate * 1e3) \
        if hasattr(torch.cuda.get_device_properties(dev), "clock_rate") else int(a.idle_ms * 1.7e6)

    def grouped():
        gate, up = grouped_mm(x, gate_up, offs).chunk(2, dim=-1)
        return grouped_mm((torch.nn.functional.silu(gate) * up).to(bf), down, offs)

    def dense():
        return (h @ w1)[:, :H] @ w2

    def timed(f):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(compute)
        f()
        e.record(compute)
        return s, e

    def before(setting: str):
        torch.cuda.synchronize()
        if setting == "idle":
            time.sleep(a.idle_ms / 1e3)
        elif setting == "sleep_kernel":
            torch.cuda._sleep(cycles)
        elif setting == "after_copies":
            with torch.cuda.stream(copy_stream):
                for i in range(n_copies):
                    slots[i].copy_(host[i % len(host)], non_blocking=True)
                done = torch.cuda.Event()
                done.record(copy_stream)
            compute.wait_event(done)

    rows = {}
    for name, f in (("grouped_b64", grouped), ("dense_stand_in", dense)):
        for _ in range(5):
            f()
        for setting in ("back_to_back", "idle", "sleep_kernel", "after_copies"):
            ms = []
            for _ in range(a.rounds):
                if setting == "back_to_back":
                    for _ in range(3):
                        f()
                else:
                    before(setting)
                s, e = timed(f)
                torch.cuda.synchronize()
                ms.append(s.elapsed_time(e))
            rows[f"{name}/{setting}"] = {"median_ms": statistics.median(ms),
                                         "p10_ms": sorted(ms)[len(ms) // 10], "p90_ms": sorted(ms)[(9 * len(ms)) // 10]}
    out = {"device": torch.cuda.get_device_name(dev), "idle_ms": a.idle_ms, "copies": n_copies, "rows": rows}
    print(f"{out['device']}: after {a.idle_ms} ms ({n_copies} copies of {nbytes / 1e6:.1f} MB)")
    print(f"{'work / before it':<34}{'median':>9}{'p10':>9}{'p90':>9}")
    for k, r in rows.items():
        print(f"{k:<34}{r['median_ms']:>9.3f}{r['p10_ms']:>9.3f}{r['p90_ms']:>9.3f}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
