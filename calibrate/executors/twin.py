"""The live executor: the planner's operations run for real, on a GPU (or on the CPU in tests).

It is the simulator's twin. The same :class:`~simulator.planner.Planner`, built from the same
scenario, policy objects and trace, emits the same operations; here they run as:

- ``LOAD``: ``slot.copy_(host_expert, non_blocking=True)`` on a dedicated copy stream, after
  ``wait_event`` on the last compute that read the slot (coalesced: the group's copies back to
  back, one completion event). Host expert weights are real tensors in pinned or pageable
  memory, per the policy.
- ``COMPUTE``: the gated expert FFN (:func:`calibrate.executors.expert.expert_ffn`, the very code
  calibration timed) on ``tokens`` rows of real activations, on the compute stream, after
  ``wait_event`` on the slot's last load.
- ``DENSE``: ``torch.cuda._sleep`` for the scenario's dense time per layer (cycles calibrated
  at start-up), on the compute stream; then the router's choice comes to the host (a
  synchronous copy of the layer's expert ids), as a real runtime must before it can issue the
  layer's loads. The ids themselves come from the trace.
- ``CPU``: wait for the layer's activations, copy them to the host, run the FFN on the host
  weights with torch on the CPU, copy the result back.
- ``DEQUANT`` (``expert_dtype``): the quantised bytes a ``LOAD`` put in the slot's staging
  area are dequantised into the slot (:func:`calibrate.executors.quant.dequantise`, the code
  calibration times), on the compute stream after the slot's load.
- ``DIRECT``: the expert FFN on the GPU over weights in mapped pinned host memory
  (:func:`calibrate.executors.quant.mapped_view`: zero-copy reads over PCIe; quantised
  experts are dequantised from host memory as they are read); on the CPU, from host memory.
- ``READ`` (a disk tier): ``os.preadv`` of the expert's bytes from a real file (``O_DIRECT``
  for ``disk.io: direct``) into a page-aligned host slot (pinned with ``cudaHostRegister``),
  on a pool of ``disk.queue_depth`` threads; it first waits for the last copy or direct read
  from that host slot. A copy, CPU expert or direct read of the key waits for the read.
- end of step: ``torch.cuda.synchronize()``.

GPU expert slots are one preallocated pool (``slots x expert_bytes``). Host memory holds at most
``host_budget`` bytes of distinct experts: when a model has more experts than that, keys share
host buffers round-robin (every copy still moves the expert's full size from the policy's
memory kind; only the weight values repeat). Step latency is the host's wall time from the
step's start to the synchronise returning (what the simulator projects); CUDA events give the
per-layer GPU times and the copy stream's achieved bandwidth.

Decisions cannot differ from the simulator's: both run the same planner. The executor also
counts what it actually executed (copies, bytes, CPU experts, computes) so that equality is
checked, not assumed.
"""
from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from simulator.models import ModelSpec
from simulator.planner import COMPUTE, CPU, DENSE, DEQUANT, DIRECT, LOAD, Planner
from simulator.scenario import PolicySpec
from simulator.traces import Trace

from calibrate.executors.expert import expert_ffn, expert_views, torch_dtype
from calibrate.executors.quant import aligned_host, dequantise, mapped_view, quantise, unregister

PAGE = 4096

DEFAULT_HOST_BUDGET = 8 << 30


@dataclass
class LiveStep:
    step: int
    latency_ms: float                  # host wall time, start to synchronise
    gpu_ms: float | None               # CUDA events, first layer start to step end
    layer_ms: list[float]
    copy_ms: float | None              # sum of copy durations (CUDA events)
    copied_bytes: int
    executed: dict = field(default_factory=dict)
    host_ms: dict = field(default_factory=dict)   # host time inside each kind of call, summed


def host_experts(model: ModelSpec, pinned: bool, budget: int = DEFAULT_HOST_BUDGET, seed: int = 0,
                 expert_dtype: str | None = None) -> list[torch.Tensor]:
    """Expert weights in host memory (pinned or pageable): one flat tensor per expert, as many
    distinct experts as ``budget`` bytes hold (at most every expert of the model); with
    ``expert_dtype``, each one's quantised bytes (uint8)."""
    n_keys = model.num_layers * model.num_experts
    n = max(1, min(n_keys, budget // model.expert_bytes))
    numel = model.matrices * model.hidden * model.ffn
    gen = torch.Generator().manual_seed(seed)
    bound = model.hidden ** -0.5
    # a few random experts, copied into every buffer (a parallel copy, not a serial RNG:
    # gigabytes fill in seconds); timing does not depend on which values repeat
    seeds = [torch.empty(numel, dtype=torch_dtype(model)).uniform_(-bound, bound, generator=gen)
             for _ in range(min(n, 4))]
    if expert_dtype is not None:
        seeds = [quantise(x, expert_dtype) for x in seeds]
    out = []
    for i in range(n):
        t = torch.empty(seeds[0].numel(), dtype=seeds[0].dtype, pin_memory=pinned)
        t.copy_(seeds[i % len(seeds)])
        out.append(t)
    return out


class DiskTier:
    """Experts on disk read into page-aligned host slots (the live side of a disk tier).

    The file holds ``n_file`` distinct experts' stored bytes, each padded to a page
    (``stride``), in ``tier_dir`` (default: the system's temporary folder); key ``k`` reads
    expert ``k % n_file``. ``io``: ``buffered`` (through the page cache) or ``direct``
    (``O_DIRECT``). Reads run on ``queue_depth`` threads."""

    def __init__(self, sources: list[torch.Tensor], slots: int, *, io: str, queue_depth: int, pinned: bool,
                 tier_dir: str | None = None):
        self.nbytes = sources[0].numel() * sources[0].element_size()
        self.stride = -(-self.nbytes // PAGE) * PAGE
        self.n_file = len(sources)
        self.pinned = pinned
        fd, self.path = tempfile.mkstemp(prefix="simmoe-experts-", suffix=".bin", dir=tier_dir)
        with os.fdopen(fd, "wb") as f:
            pad = bytes(self.stride - self.nbytes)
            for t in sources:
                f.write(t.view(torch.uint8).numpy().tobytes())
                f.write(pad)
        flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if io == "direct" else 0)
        try:
            self.fd = os.open(self.path, flags)
        except OSError as e:
            os.unlink(self.path)
            raise RuntimeError(f"{self.path}: cannot open for {io} reads ({e.strerror}); "
                               "O_DIRECT needs a file system that supports it (not tmpfs): give another tier_dir") from None
        self.slots, self._maps = [], []
        for _ in range(slots):
            t, mm = aligned_host(self.stride, pinned)
            self.slots.append(t)
            self._maps.append(mm)
        self.pool = ThreadPoolExecutor(max_workers=queue_depth, thread_name_prefix="simmoe-read")

    def read(self, hslot: int, key: int, after=None):
        """Start reading ``key`` into host slot ``hslot`` (after the CUDA event ``after``: the
        last op that read the slot); returns the future."""
        buf, off = memoryview(self.slots[hslot].numpy()), (key % self.n_file) * self.stride

        def job():
            if after is not None:
                after.synchronize()
            n = os.preadv(self.fd, [buf], off)
            if n != self.stride:
                raise RuntimeError(f"{self.path}: short read ({n} of {self.stride} bytes)")
        return self.pool.submit(job)

    def expert(self, hslot: int) -> torch.Tensor:
        return self.slots[hslot][:self.nbytes]

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        os.close(self.fd)
        if self.pinned:
            for t in self.slots:
                unregister(t)
        self.slots.clear()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def calibrate_sleep(device: torch.device, trials: int = 5) -> float:
    """``torch.cuda._sleep`` cycles per millisecond on this GPU."""
    cycles = 2_000_000
    torch.cuda._sleep(cycles)
    torch.cuda.synchronize(device)
    out = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.cuda._sleep(cycles)
        b.record()
        b.synchronize()
        out.append(cycles / a.elapsed_time(b))
    return float(np.median(out))


def run_weights(x: torch.Tensor, w) -> torch.Tensor:
    return expert_ffn(x, w.gate, w.up, w.down)


class LiveExecutor:
    """Runs one policy over one trace on ``device`` (``cuda[:N]`` or ``cpu``)."""

    def __init__(self, model: ModelSpec, policy: PolicySpec, trace: Trace, *, device: str = "cuda",
                 dense_ms: float = 0.0, seed: int = 0, host_budget: int = DEFAULT_HOST_BUDGET,
                 measure_copies: bool = True, host: list[torch.Tensor] | None = None, cost=None,
                 tier_dir: str | None = None):
        """``cost``: the :class:`~simulator.profile.CostModel` the planner of a ``cheapest``
        miss policy decides with (the simulator's own); ``tier_dir``: where a disk tier's file
        is written."""
        self.model, self.policy, self.trace, self.seed = model, policy, trace, seed
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.dense_ms = dense_ms
        self.measure_copies = measure_copies and self.cuda
        self.dtype = torch_dtype(model)
        numel = model.matrices * model.hidden * model.ffn
        self.numel = numel
        gen = torch.Generator().manual_seed(seed)
        pinned = policy.memory == "pinned" and self.cuda
        self.quant = policy.expert_dtype
        self.host = host if host is not None else host_experts(model, pinned, host_budget, seed, self.quant)
        self.n_host = len(self.host)
        self.planner = Planner(model, policy, trace, seed=seed, cost=cost, dense_ms=dense_ms)
        n_slots = self.planner.total_slots
        self.pool = torch.empty((n_slots, numel), dtype=self.dtype, device=self.device)
        self.slot_views = [expert_views(self.pool[i], model) for i in range(n_slots)]
        # quantised copies land in a staging area per slot, then DEQUANT fills the slot
        self.stage = (torch.empty((n_slots, self.planner.stored_bytes), dtype=torch.uint8, device=self.device)
                      if self.quant else None)
        self.disk = None
        if self.planner.host_cache is not None:
            d = self.planner.disk
            self.disk = DiskTier(self.host, self.planner.host_slots, io=d.io, queue_depth=d.queue_depth,
                                 pinned=pinned, tier_dir=tier_dir)
        self.host_of: dict[int, int] = {}           # key -> host slot it was read into (disk tier)
        self.reading: dict[int, object] = {}        # key -> future of its disk read
        self.last_host_read: dict[int, object] = {}   # host slot -> event of the last op that read it
        self._mapped: dict[int, torch.Tensor] = {}
        for key, hslot in self.planner.host_preloaded:            # static-hot host tier
            self.disk.read(hslot, key).result()
            self.host_of[key] = hslot
        for key, slot in self.planner.preloaded:                  # static-hot: resident from the start
            self._fill(slot, self.host_src(key))
        max_tokens = max(1, trace.max_step_tokens)
        self.route_ids = torch.zeros(max_tokens * model.top_k, dtype=torch.int32, device=self.device)
        self.x = (torch.randn(max_tokens, model.hidden, generator=gen) * 0.5).to(self.dtype).to(self.device)
        if self.cuda:
            self.compute = torch.cuda.Stream(self.device)
            self.copy = torch.cuda.Stream(self.device)
            self.sleep_cycles_per_ms = calibrate_sleep(self.device) if dense_ms > 0 else 0.0
        self.last_load: dict[int, object] = {}
        self.last_read: dict[int, object] = {}

    def close(self) -> None:
        """Release the disk tier (its file, threads and pinned host slots)."""
        if self.disk is not None:
            self.disk.close()
            self.disk = None

    # --------------------------------------------------------------------- operations
    def _event(self):
        return torch.cuda.Event(enable_timing=False)

    def host_src(self, key: int) -> torch.Tensor:
        """Where ``key``'s stored bytes (or weights) are in host memory: its host slot (a disk
        tier, once its read is done) or its host buffer."""
        if self.disk is None:
            return self.host[key % self.n_host]
        fut = self.reading.pop(key, None)
        if fut is not None:
            fut.result()                         # the host waits for the read
        return self.disk.expert(self.host_of[key]).view(self.host[0].dtype)

    def _fill(self, slot: int, src: torch.Tensor) -> None:
        """A slot filled synchronously (preloaded experts)."""
        if self.quant:
            dequantise(src.to(self.device), self.quant, self.pool[slot])
        else:
            self.pool[slot].copy_(src)

    def _weights(self, src: torch.Tensor, device):
        """Expert weights from stored bytes (dequantised when quantised) on ``device``."""
        if self.quant:
            flat = dequantise(src, self.quant, torch.empty(self.numel, dtype=self.dtype, device=device))
            return expert_views(flat, self.model)
        return expert_views(src, self.model)

    def _read(self, hslot: int, key: int) -> None:
        self.host_of[key] = hslot
        self.reading[key] = self.disk.read(hslot, key, self.last_host_read.get(hslot))

    def _host_used(self, key: int, ev) -> None:
        if self.disk is not None and ev is not None:
            self.last_host_read[self.host_of[key]] = ev

    def _dequant(self, slot: int) -> None:
        if not self.cuda:
            dequantise(self.stage[slot], self.quant, self.pool[slot])
            return
        with torch.cuda.stream(self.compute):
            ev = self.last_load.get(slot)
            if ev is not None:
                self.compute.wait_event(ev)
            dequantise(self.stage[slot], self.quant, self.pool[slot])
            done = self._event()
            done.record(self.compute)
        self.last_read[slot] = done

    def _direct(self, key: int, tokens: int):
        src = self.host_src(key)
        if not self.cuda:
            return run_weights(self.x[:tokens], self._weights(src, "cpu"))
        ptr = src.data_ptr()
        view = self._mapped.get(ptr)
        if view is None:
            view = self._mapped[ptr] = mapped_view(src, self.device)
        with torch.cuda.stream(self.compute):
            out = run_weights(self.x[:tokens], self._weights(view, self.device))
            done = self._event()
            done.record(self.compute)
        self._host_used(key, done)
        return out

    def _load(self, slots, keys, nbytes, timings):
        dst = self.stage if self.quant else self.pool
        srcs = [self.host_src(k) for k in keys]
        if not self.cuda:
            for sl, src in zip(slots, srcs):
                dst[sl].copy_(src)
            return
        with torch.cuda.stream(self.copy):
            for sl in slots:
                ev = self.last_read.get(sl)
                if ev is not None:
                    self.copy.wait_event(ev)
            if self.measure_copies:
                start = torch.cuda.Event(enable_timing=True)
                start.record(self.copy)
            for sl, src in zip(slots, srcs):
                dst[sl].copy_(src, non_blocking=True)
            done = torch.cuda.Event(enable_timing=self.measure_copies)
            done.record(self.copy)
            if self.measure_copies:
                timings.append((start, done))
        for sl in slots:
            self.last_load[sl] = done
        for k in keys:
            self._host_used(k, done)

    def _compute(self, slot, tokens):
        w = self.slot_views[slot]
        if not self.cuda:
            return expert_ffn(self.x[:tokens], w.gate, w.up, w.down)
        with torch.cuda.stream(self.compute):
            ev = self.last_load.get(slot)
            if ev is not None:
                self.compute.wait_event(ev)
            out = expert_ffn(self.x[:tokens], w.gate, w.up, w.down)
            done = self._event()
            done.record(self.compute)
        self.last_read[slot] = done
        return out

    def _dense(self):
        if not self.cuda:
            return None
        with torch.cuda.stream(self.compute):
            if self.dense_ms > 0:
                torch.cuda._sleep(int(self.dense_ms * self.sleep_cycles_per_ms))
            ev = self._event()
            ev.record(self.compute)
        return ev

    def _route(self):
        """The router's choice to the host: a synchronous copy of the layer's expert ids,
        ordered after the layer's dense work on the compute stream."""
        if not self.cuda:
            return
        with torch.cuda.stream(self.compute):
            self.route_ids.to("cpu")

    def _cpu(self, key, tokens, dense_ev):
        if dense_ev is not None:
            dense_ev.synchronize()               # the layer's activations exist
        x = self.x[:tokens].to("cpu")
        y = run_weights(x, self._weights(self.host_src(key), "cpu"))
        return y.to(self.device)

    # --------------------------------------------------------------------------- run
    def run_step(self, s: int) -> tuple[LiveStep, object]:
        layers, decisions = self.planner.plan_step(s)
        executed = {"transfers": 0, "copies": 0, "bytes_h2d": 0, "cpu_computes": 0, "computes": 0,
                    "computed_tokens": 0, "prefetch_copies": 0, "denses": 0, "dequants": 0,
                    "direct_computes": 0, "bytes_direct": 0, "disk_reads": 0, "bytes_disk": 0}
        # host time spent inside each kind of call: issue costs (compute, dense, a pinned load),
        # a pageable load's blocking copy, the CPU path, and the wait for the router's choice
        host_ms = dict.fromkeys(("compute", "load", "dense", "route", "cpu", "dequant", "direct", "read"), 0.0)
        clock = time.perf_counter
        copy_timings: list = []
        layer_events = []
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t0 = clock()
        for ops in layers:
            dense_ev = None
            if self.cuda:
                le = torch.cuda.Event(enable_timing=True)
                le.record(self.compute)
                layer_events.append(le)
            for op in ops:
                kind = op[0]
                a = clock()
                if kind == COMPUTE:
                    self._compute(op[1], op[3])
                    host_ms["compute"] += clock() - a
                    executed["computes"] += 1
                    executed["computed_tokens"] += op[3]
                elif kind == LOAD:
                    self._load(op[1], op[2], op[3], copy_timings)
                    host_ms["load"] += clock() - a
                    executed["transfers"] += len(op[2])
                    executed["copies"] += 1
                    executed["bytes_h2d"] += op[3]
                    executed["prefetch_copies"] += int(op[4])
                elif kind == DENSE:
                    dense_ev = self._dense()
                    b = clock()
                    self._route()
                    host_ms["dense"] += b - a
                    host_ms["route"] += clock() - b
                    executed["denses"] += 1
                elif kind == CPU:
                    self._cpu(op[1], op[2], dense_ev)
                    host_ms["cpu"] += clock() - a
                    executed["cpu_computes"] += 1
                    executed["computed_tokens"] += op[2]
                elif kind == DEQUANT:
                    self._dequant(op[1])
                    host_ms["dequant"] += clock() - a
                    executed["dequants"] += 1
                elif kind == DIRECT:
                    self._direct(op[1], op[2])
                    host_ms["direct"] += clock() - a
                    executed["direct_computes"] += 1
                    executed["bytes_direct"] += op[3]
                    executed["computed_tokens"] += op[2]
                else:                                   # READ
                    self._read(op[1], op[2])
                    host_ms["read"] += clock() - a
                    executed["disk_reads"] += 1
                    executed["bytes_disk"] += op[3]
        for fut in list(self.reading.values()):     # reads still in flight end with the step
            fut.result()
        gpu_ms = copy_ms = None
        layer_ms: list[float] = []
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            self.compute.wait_stream(self.copy)
            end.record(self.compute)
            torch.cuda.synchronize(self.device)
            latency = (clock() - t0) * 1e3
            marks = layer_events + [end]
            layer_ms = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
            gpu_ms = layer_events[0].elapsed_time(end)
            copy_ms = sum(a.elapsed_time(b) for a, b in copy_timings) if self.measure_copies else None
        else:
            latency = (clock() - t0) * 1e3
        return LiveStep(step=s, latency_ms=latency, gpu_ms=gpu_ms, layer_ms=layer_ms, copy_ms=copy_ms,
                        copied_bytes=executed["bytes_h2d"], executed=executed,
                        host_ms={k: v * 1e3 for k, v in host_ms.items()}), decisions

    def warm_up(self) -> None:
        """Run every token count the trace needs once per kernel, and a few copies, untimed."""
        tokens = sorted({int(n) for n in np.diff(self.trace.step_offsets)} | {1})
        for sl in range(min(2, len(self.slot_views))):
            if self.disk is None:
                self._load((sl,), (sl,), self.model.expert_bytes, [])
                if self.quant:
                    self._dequant(sl)
            for t in range(1, max(tokens) + 1) if max(tokens) <= 64 else tokens:
                self._compute(sl, min(t, self.x.shape[0]))
        self._dense()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.last_load.clear()
        self.last_read.clear()

    def run(self, steps: range | None = None) -> list[tuple[LiveStep, object]]:
        steps = range(self.trace.num_steps) if steps is None else steps
        return [self.run_step(s) for s in steps]
