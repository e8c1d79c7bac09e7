"""Probe: does a small copy on the compute stream wait behind the copy stream's queued copies?

The real-model executor queues an expert's copies on its copy stream and the layer's own small
transfers on the compute stream: the grouped call's index buffer (pinned, host to device), the
router's choice (device to host, the layer's sync), a CPU expert's result (pinned, host to
device). If the GPU runs same-direction copies of two streams on one copy engine in the order
they were queued, a compute-stream copy issued after the next layer's prefetch waits for the
whole prefetch, and prefetching saves nothing; the engine has no such wait.

For each small transfer this probe queues ``--experts`` copies of ``--mb`` MB (pinned, the copy
stream), then at once the small transfer on the compute stream, and reports the time from its
issue to its end (CUDA events on the compute stream; the device-to-host one also on the host
clock), against the same transfer alone, and the time the big copies took. A kernel alone on
the compute stream is the control (it must not wait).

    python bench/probe_copy_fifo.py [--experts 16] [--mb 12.6] [--rounds 7] [-o probe-copy-fifo.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--mb", type=float, default=12.6)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("-o", "--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    n = int(a.mb * 1e6) // 2
    host = [torch.empty(n, dtype=torch.bfloat16, pin_memory=True) for _ in range(a.experts)]
    gpu = torch.empty((a.experts, n), dtype=torch.bfloat16, device=dev)
    copy_stream = torch.cuda.Stream(dev)
    compute = torch.cuda.current_stream(dev)
    idx = torch.arange(4096, dtype=torch.int32).pin_memory()
    small_gpu = torch.zeros(64, 8, dtype=torch.int64, device=dev)
    x = torch.randn(2048, 2048, device=dev, dtype=torch.bfloat16)

    def big():
        with torch.cuda.stream(copy_stream):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(copy_stream)
            for i in range(a.experts):
                gpu[i].copy_(host[i], non_blocking=True)
            e.record(copy_stream)
        return s, e

    transfers = {
        "h2d_pinned_4KB": lambda: idx.to(dev, non_blocking=True),
        "h2d_pageable_4KB": lambda: torch.arange(4096, dtype=torch.int32).to(dev),
        "d2h_router_read": lambda: small_gpu.to("cpu"),
        "kernel_control": lambda: x @ x,
    }
    out = {"device": torch.cuda.get_device_name(dev), "experts": a.experts, "mb": a.mb, "rows": {}}
    for _ in range(2):   # warm-up
        for f in transfers.values():
            f()
        big()
    torch.cuda.synchronize()
    for name, f in transfers.items():
        alone, behind, host_alone, host_behind, bigs = [], [], [], [], []
        for _ in range(a.rounds):
            for queued in (False, True):
                torch.cuda.synchronize()
                if queued:
                    bs, be = big()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                s.record(compute)
                f()
                e.record(compute)
                e.synchronize()
                th = (time.perf_counter() - t0) * 1e3
                torch.cuda.synchronize()
                (behind if queued else alone).append(s.elapsed_time(e))
                (host_behind if queued else host_alone).append(th)
                if queued:
                    bigs.append(bs.elapsed_time(be))
        med = statistics.median
        out["rows"][name] = {"alone_ms": med(alone), "behind_ms": med(behind), "host_alone_ms": med(host_alone),
                             "host_behind_ms": med(host_behind), "queued_copies_ms": med(bigs),
                             "waited": med(behind) > 0.5 * med(bigs)}
    print(f"{out['device']}: {a.experts} queued copies of {a.mb} MB on the copy stream")
    print(f"{'transfer':<20}{'alone':>9}{'behind':>9}{'host':>9}{'queued':>9}  waited")
    for name, r in out["rows"].items():
        print(f"{name:<20}{r['alone_ms']:>9.3f}{r['behind_ms']:>9.3f}{r['host_behind_ms']:>9.3f}"
              f"{r['queued_copies_ms']:>9.3f}  {r['waited']}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
