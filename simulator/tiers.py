"""Tiers beyond host memory and plain copies: quantised host copies, direct host reads, a disk
tier below host memory, and the planner's own model of the streams that cost-aware misses
decide on (docs/tiers.md).

- **Quantised experts** (``expert_dtype``: int8, fp8, int4): the copies below the GPU (host
  memory and disk) are stored quantised, in groups of :data:`QUANT_GROUP` values with one fp16
  scale each; the GPU cache keeps the model's full precision. A copy moves the quantised bytes
  into the slot's staging area and a ``DEQUANT`` op on the compute stream writes the full
  expert into the slot before its first compute. A direct host read computes from the
  quantised bytes themselves (a kernel that dequantises as it reads).
- **Direct host reads** (``miss: direct``): a ``DIRECT`` op on the compute stream computes the
  expert from mapped pinned host memory: no slot, no copy. It shares the PCIe link with the
  copies: it waits for the copy stream too, and the next copy waits for it.
- **A disk tier** (``host: {kind, capacity}``): host memory holds at most ``capacity`` experts
  (its own eviction policy, the same classes as the GPU cache); the others are on disk and a
  ``READ`` op brings one into a host slot first.
- **Cost-aware misses** (``miss: cheapest``): the :class:`QueueModel` is the planner's own
  prediction of the host, the compute stream, the copy stream and the disk, in ms from the
  moment a layer's routing reaches the host. It is advanced by every operation the planner
  emits, from the same :class:`~simulator.profile.CostModel` the engine uses, and never by the
  engine: so the simulator and the live executor, which run the same planner, take the same
  decisions.
"""
from __future__ import annotations

import math

from .models import ModelSpec
from .profile import CostModel

QUANT_BITS = {"int8": 8, "fp8": 8, "int4": 4}
QUANT_GROUP = 128          # values per fp16 scale
SCALE_BYTES = 2
MISS_CHOICES = ("copy", "direct", "cpu")   # ties go to the first


def quant_groups(model: ModelSpec) -> int:
    return math.ceil(model.matrices * model.hidden * model.ffn / QUANT_GROUP)


def quant_data_bytes(model: ModelSpec, dtype: str) -> int:
    """Bytes of the quantised values (padded to whole groups)."""
    return quant_groups(model) * QUANT_GROUP * QUANT_BITS[dtype] // 8


def stored_bytes(model: ModelSpec, dtype: str | None) -> int:
    """Bytes of one expert below the GPU: the model's own bytes, or the quantised values plus
    one fp16 scale per group of :data:`QUANT_GROUP`."""
    if dtype is None:
        return model.expert_bytes
    return quant_data_bytes(model, dtype) + quant_groups(model) * SCALE_BYTES


class QueueModel:
    """The planner's prediction of the streams while it plans one layer (see the module doc).

    Times are ms from the moment the layer's routing reached the host. ``host``: the host's
    issue clock (launch costs, blocking copies, waits on disk reads); ``cpu``: host time in CPU
    experts, which the planner issues after the layer's GPU work; ``comp``, ``copy``: when each
    stream is free; ``disk``: when each disk lane is free. Between layers the copy stream and
    the disk carry their backlog over, less the layer's dense op (``dense_ms``: the scenario's
    constant, also for measured engine styles). ``cpu_ready``: when a CPU shared with other
    GPUs' planners is free of their experts, in the same time base (set per layer by the
    several-GPU engine, :mod:`simulator.multigpu`; 0 on one GPU); ``link_ready``: the same
    for a host link shared with them (``shared_pcie``), which this GPU's copies and direct
    reads wait for.
    """

    def __init__(self, cost: CostModel, *, memory: str, load_bytes: int, stored: int, dequant: str | None,
                 io: str, queue_depth: int, dense_ms: float):
        self.cost, self.load_bytes, self.stored = cost, load_bytes, stored
        self.copy_ms = cost.copy_ms(load_bytes, memory)
        self.blocking = memory == "pageable" and cost.pageable_blocks_host
        self.tail = cost.pageable_tail
        self.dequant_ms = cost.dequant_ms(stored, dequant) if dequant else 0.0
        self.dequant_launch = cost.launch_dense if dequant else 0.0
        self.read_ms = cost.read_ms(stored, io, queue_depth)
        self.has_cpu = cost.cpu_expert is not None
        self.dense = dense_ms + cost.launch_dense
        self.host = self.cpu = self.comp = self.copy = 0.0
        self.cpu_ready = self.link_ready = 0.0
        self.disk = [0.0] * queue_depth
        self.arrivals: dict[int, float] = {}   # key -> predicted end of the prefetch copy it arrives by

    # ------------------------------------------------------------------ between layers
    def start_layer(self) -> None:
        end = max(self.comp, self.host + self.cpu) + self.dense
        self.copy = max(0.0, self.copy - end)
        self.disk = [max(0.0, t - end) for t in self.disk]
        if self.arrivals:
            self.arrivals = {k: t - end for k, t in self.arrivals.items()}
        self.host = self.cpu = self.comp = 0.0

    # -------------------------------------------------------------- what was emitted
    def compute(self, tokens: int, dequant: bool = False, key: int | None = None) -> None:
        """A hit's compute (and its dequantise, for an expert prefetched quantised); a hit on an
        expert that arrives by a prefetch copy waits for that copy's predicted end."""
        c = self.cost
        ready = self.arrivals.pop(key, 0.0) if self.arrivals else 0.0
        if dequant:
            self.host += self.dequant_launch
            self.comp = max(self.comp, self.host, ready) + self.dequant_ms
        self.host += c.launch_expert
        self.comp = max(self.comp, self.host, ready) + c.expert_ms(tokens)

    def read(self) -> float:
        """A disk read issued now; returns when it ends."""
        self.host += self.cost.launch_copy
        i = min(range(len(self.disk)), key=self.disk.__getitem__)
        end = self.disk[i] = max(self.disk[i], self.host) + self.read_ms
        return end

    def load(self, key: int | None = None) -> float:
        """A copy issued now (a prefetch of ``key``, or a demand miss's); returns when it ends."""
        self.host += self.cost.launch_copy
        end = self.copy = max(self.copy, self.host, self.link_ready) + self.copy_ms
        if self.blocking:
            self.host = end + self.tail
        if key is not None:
            self.arrivals[key] = end
        return end

    # ------------------------------------------------------------------ one miss
    def options(self, tokens: int, read: bool, choices=MISS_CHOICES) -> dict[str, tuple]:
        """Per choice, the predicted state after serving the miss that way: ``(makespan, host,
        cpu, comp, copy, disk)``; the makespan is when both the host and the compute stream
        are done. ``read``: the expert must come from disk first."""
        c, out = self.cost, {}
        saved = (self.host, self.cpu, self.comp, self.copy, list(self.disk))
        for how in choices:
            if how == "cpu" and not self.has_cpu:
                continue
            self.host, self.cpu, self.comp, self.copy, self.disk = saved[0], saved[1], saved[2], saved[3], list(saved[4])
            ready = self.read() if read else 0.0
            if how == "copy":
                self.host = max(self.host, ready)           # the host waits for the read, then copies
                end = self.load()
                if self.dequant_ms:
                    self.host += self.dequant_launch
                    self.comp = max(self.comp, self.host, end) + self.dequant_ms
                self.host += c.launch_expert
                self.comp = max(self.comp, self.host, end) + c.expert_ms(tokens)
            elif how == "direct":
                self.host = max(self.host, ready) + c.launch_expert
                start = max(self.comp, self.host, self.copy, self.link_ready)
                self.comp = self.copy = start + c.direct_ms(tokens, self.stored)
            else:
                start = max(self.host + self.cpu, ready, self.cpu_ready)   # the CPU free of the others'
                self.cpu = start - self.host + c.cpu_path_ms(tokens)
            out[how] = (max(self.comp, self.host + self.cpu), self.host, self.cpu, self.comp, self.copy,
                        list(self.disk))
        self.host, self.cpu, self.comp, self.copy, self.disk = saved
        return out

    def commit(self, state: tuple) -> None:
        """Take the state of the chosen option (an item of :meth:`options`)."""
        _, self.host, self.cpu, self.comp, self.copy, disk = state
        self.disk = list(disk)
