"""Copy benchmarks: host <-> device time by size and memory kind, streams, coalescing.

Every copy is ``dst.copy_(src, non_blocking=True)`` issued on a dedicated copy stream and
timed with CUDA events on that stream; the host time of the call is kept too (a copy from
pageable memory blocks the host). Sources and destinations are slices of one pool per
memory kind (device, pinned host, pageable host), all pages written before timing; small
copies rotate through several slices (see :func:`calibrate.measurements.timing.rotation_count`).

On the CPU device there is no pinned memory and no copy direction: the copies are
host-to-host (pageable to a second host buffer), measured as ``h2d`` / ``pageable``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from simulator.models import PRESETS, ModelSpec
from simulator.units import fmt_bytes

from calibrate.measurements.stats import summary
from calibrate.measurements.timing import Timer, rotation_count

STREAM_COPIES = 8
COALESCE_MAX_EXPERTS = 8
COALESCE_MAX_BYTES = 256 << 20
STUDY_EXPERT_BYTES = PRESETS["published-study"].expert_bytes  # 27.0 MiB


@dataclass
class CopyPools:
    """One uint8 buffer on the device and one per host memory kind, ``nbytes`` each."""

    device: torch.Tensor
    host: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return self.device.numel()


def directions(timer: Timer) -> tuple[str, ...]:
    return ("h2d", "d2h") if timer.is_cuda else ("h2d",)


def memory_kinds(timer: Timer) -> tuple[str, ...]:
    return ("pinned", "pageable") if timer.is_cuda else ("pageable",)


def alloc_pools(timer: Timer, nbytes: int) -> CopyPools:
    """Pools of ``nbytes`` on the device and in each host memory kind, every page written."""
    host = {k: torch.empty(nbytes, dtype=torch.uint8, pin_memory=(k == "pinned")).fill_(1)
            for k in memory_kinds(timer)}
    return CopyPools(torch.empty(nbytes, dtype=torch.uint8, device=timer.device).fill_(1), host)


def _slices(buf: torch.Tensor, nbytes: int, n: int) -> list[torch.Tensor]:
    return [buf[k * nbytes:(k + 1) * nbytes] for k in range(n)]


def copy_issuer(pools: CopyPools, direction: str, kind: str, nbytes: int) -> tuple[Callable[[int], None], int]:
    """A function issuing copy ``i`` of ``nbytes`` (rotating over slices), and the slice count."""
    n = rotation_count(nbytes, pools.nbytes)
    dev, host = _slices(pools.device, nbytes, n), _slices(pools.host[kind], nbytes, n)
    src, dst = (host, dev) if direction == "h2d" else (dev, host)

    def issue(i: int) -> None:
        dst[i % n].copy_(src[i % n], non_blocking=True)
    return issue, n


def copy_sweep(timer: Timer, pools: CopyPools, sizes: list[int], trials: int, warmup: int,
               tick: Callable[[str], None]) -> dict:
    """``{direction: {kind: [point, ...]}}``: device and host time of one copy per size."""
    stream = timer.new_stream()
    out: dict = {d: {k: [] for k in memory_kinds(timer)} for d in directions(timer)}
    for size in sizes:
        tick(f"copy {fmt_bytes(size)}")
        for d in directions(timer):
            for k in memory_kinds(timer):
                issue, n = copy_issuer(pools, d, k, size)
                s = timer.time(issue, trials, warmup, stream)
                out[d][k].append({"bytes": size, "buffers": n, "ms": summary(s.ms), "host_ms": summary(s.host_ms)})
    return out


def stream_comparison(timer: Timer, pools: CopyPools, trials: int, warmup: int) -> dict:
    """``STREAM_COPIES`` pinned host-to-device copies on one copy stream vs alternating over two (CUDA)."""
    nbytes = min(STUDY_EXPERT_BYTES, pools.nbytes // STREAM_COPIES)
    src = _slices(pools.host["pinned"], nbytes, STREAM_COPIES)
    dst = _slices(pools.device, nbytes, STREAM_COPIES)
    first, second = timer.new_stream(), timer.new_stream()

    def issuer(streams: list) -> Callable[[int], None]:
        def issue(_: int) -> None:
            for s in streams[1:]:
                s.wait_stream(streams[0])
            for j in range(STREAM_COPIES):
                with torch.cuda.stream(streams[j % len(streams)]):
                    dst[j].copy_(src[j], non_blocking=True)
            for s in streams[1:]:
                streams[0].wait_stream(s)
        return issue

    one = timer.time(issuer([first]), trials, warmup, first)
    two = timer.time(issuer([first, second]), trials, warmup, first)
    return {"copies": STREAM_COPIES, "bytes_each": nbytes, "one_stream_ms": summary(one.ms),
            "two_streams_ms": summary(two.ms)}


def coalescing(timer: Timer, pools: CopyPools, spec: ModelSpec, trials: int, warmup: int) -> dict:
    """n experts host-to-device as n separate copies vs one coalesced copy, per host memory kind.

    n is up to 8 experts and 256 MiB in all (coalescing matters for small experts; large ones
    are bandwidth-bound either way).
    """
    eb = spec.expert_bytes
    limit = min(pools.nbytes, COALESCE_MAX_BYTES)
    n = min(COALESCE_MAX_EXPERTS, limit // eb)
    if n < 2:
        return {"expert_bytes": eb, "skipped": f"two {eb / 2**20:.1f} MiB experts exceed {limit >> 20} MiB"}
    out: dict = {"expert_bytes": eb, "experts": n}
    stream = timer.new_stream()
    dst = _slices(pools.device, eb, n)
    for kind in memory_kinds(timer):
        src = _slices(pools.host[kind], eb, n)
        whole_src, whole_dst = pools.host[kind][:n * eb], pools.device[:n * eb]

        def separate(_: int) -> None:
            for j in range(n):
                dst[j].copy_(src[j], non_blocking=True)

        def coalesced(_: int) -> None:
            whole_dst.copy_(whole_src, non_blocking=True)

        sep = timer.time(separate, trials, warmup, stream)
        coa = timer.time(coalesced, trials, warmup, stream)
        out[kind] = {"separate_ms": summary(sep.ms), "coalesced_ms": summary(coa.ms)}
    return out
