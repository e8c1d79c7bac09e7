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
the compute stream is the control (it must not wait). Then the executor's own pattern: the
compute stream waits for a layer's copies A while the next layer's copies B are queued behind
them, and the index upload is issued after that wait (the executor's old order) or before it
(its order now); the probe reports when the upload ends, from A's end, against B's time.

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
    # the executor's pattern: the compute stream waits for copies A (a layer's experts), the
    # copy stream has the next layer's copies B queued behind them; the index upload goes
    # after the wait (the old order) or before it (the executor's order now)
    half = a.experts // 2
    for order in ("upload_after_wait", "upload_before_wait"):
        after_a, after_b = [], []
        for _ in range(a.rounds):
            torch.cuda.synchronize()
            t = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            with torch.cuda.stream(copy_stream):
                t[0].record(copy_stream)
                for i in range(half):
                    gpu[i].copy_(host[i], non_blocking=True)
                t[1].record(copy_stream)
                for i in range(half, a.experts):
                    gpu[i].copy_(host[i], non_blocking=True)
                t[2].record(copy_stream)
            if order == "upload_before_wait":
                idx.to(dev, non_blocking=True)
            compute.wait_event(t[1])
            if order == "upload_after_wait":
                idx.to(dev, non_blocking=True)
            t[3].record(compute)
            torch.cuda.synchronize()
            after_a.append(t[1].elapsed_time(t[3]))   # from the end of A to the upload's end
            after_b.append(t[1].elapsed_time(t[2]))   # from the end of A to the end of B
        med = statistics.median
        out["rows"][order] = {"after_A_ms": med(after_a), "B_ms": med(after_b),
                              "waited": med(after_a) > 0.5 * med(after_b)}
    print(f"{out['device']}: {a.experts} queued copies of {a.mb} MB on the copy stream")
    print(f"{'transfer':<20}{'alone':>9}{'behind':>9}{'host':>9}{'queued':>9}  waited")
    for name, r in out["rows"].items():
        if "after_A_ms" in r:
            print(f"{name:<20} ends {r['after_A_ms']:.3f} ms after A; B takes {r['B_ms']:.3f} ms  waited {r['waited']}")
            continue
        print(f"{name:<20}{r['alone_ms']:>9.3f}{r['behind_ms']:>9.3f}{r['host_behind_ms']:>9.3f}"
              f"{r['queued_copies_ms']:>9.3f}  {r['waited']}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
