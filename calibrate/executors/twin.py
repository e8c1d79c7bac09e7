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

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from simulator.models import ModelSpec
from simulator.planner import COMPUTE, DENSE, LOAD, Planner
from simulator.scenario import PolicySpec
from simulator.traces import Trace

from calibrate.executors.expert import expert_ffn, expert_views, torch_dtype

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


def host_experts(model: ModelSpec, pinned: bool, budget: int = DEFAULT_HOST_BUDGET, seed: int = 0) -> list[torch.Tensor]:
    """Expert weights in host memory (pinned or pageable): one flat tensor per expert, as many
    distinct experts as ``budget`` bytes hold (at most every expert of the model)."""
    n_keys = model.num_layers * model.num_experts
    n = max(1, min(n_keys, budget // model.expert_bytes))
    numel = model.matrices * model.hidden * model.ffn
    gen = torch.Generator().manual_seed(seed)
    bound = model.hidden ** -0.5
    # a few random experts, copied into every buffer (a parallel copy, not a serial RNG:
    # gigabytes fill in seconds); timing does not depend on which values repeat
    seeds = [torch.empty(numel, dtype=torch_dtype(model)).uniform_(-bound, bound, generator=gen)
             for _ in range(min(n, 4))]
    out = []
    for i in range(n):
        t = torch.empty(numel, dtype=torch_dtype(model), pin_memory=pinned)
        t.copy_(seeds[i % len(seeds)])
        out.append(t)
    return out


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


class LiveExecutor:
    """Runs one policy over one trace on ``device`` (``cuda[:N]`` or ``cpu``)."""

    def __init__(self, model: ModelSpec, policy: PolicySpec, trace: Trace, *, device: str = "cuda",
                 dense_ms: float = 0.0, seed: int = 0, host_budget: int = DEFAULT_HOST_BUDGET,
                 measure_copies: bool = True, host: list[torch.Tensor] | None = None):
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
        self.host = host if host is not None else host_experts(model, pinned, host_budget, seed)
        self.n_host = len(self.host)
        self.planner = Planner(model, policy, trace, seed=seed)
        n_slots = self.planner.total_slots
        self.pool = torch.empty((n_slots, numel), dtype=self.dtype, device=self.device)
        self.slot_views = [expert_views(self.pool[i], model) for i in range(n_slots)]
        for key, slot in self.planner.preloaded:                  # static-hot: resident from the start
            self.pool[slot].copy_(self.host[key % self.n_host])
        max_tokens = max(1, trace.max_step_tokens)
        self.route_ids = torch.zeros(max_tokens * model.top_k, dtype=torch.int32, device=self.device)
        self.x = (torch.randn(max_tokens, model.hidden, generator=gen) * 0.5).to(self.dtype).to(self.device)
        if self.cuda:
            self.compute = torch.cuda.Stream(self.device)
            self.copy = torch.cuda.Stream(self.device)
            self.sleep_cycles_per_ms = calibrate_sleep(self.device) if dense_ms > 0 else 0.0
        self.last_load: dict[int, object] = {}
        self.last_read: dict[int, object] = {}

    # --------------------------------------------------------------------- operations
    def _event(self):
        return torch.cuda.Event(enable_timing=False)

    def _load(self, slots, keys, nbytes, timings):
        if not self.cuda:
            for sl, k in zip(slots, keys):
                self.pool[sl].copy_(self.host[k % self.n_host])
            return
        with torch.cuda.stream(self.copy):
            for sl in slots:
                ev = self.last_read.get(sl)
                if ev is not None:
                    self.copy.wait_event(ev)
            if self.measure_copies:
                start = torch.cuda.Event(enable_timing=True)
                start.record(self.copy)
            for sl, k in zip(slots, keys):
                self.pool[sl].copy_(self.host[k % self.n_host], non_blocking=True)
            done = torch.cuda.Event(enable_timing=self.measure_copies)
            done.record(self.copy)
            if self.measure_copies:
                timings.append((start, done))
        for sl in slots:
            self.last_load[sl] = done

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
        w = expert_views(self.host[key % self.n_host], self.model)
        y = expert_ffn(x, w.gate, w.up, w.down)
        return y.to(self.device)

    # --------------------------------------------------------------------------- run
    def run_step(self, s: int) -> tuple[LiveStep, object]:
        layers, decisions = self.planner.plan_step(s)
        executed = {"transfers": 0, "copies": 0, "bytes_h2d": 0, "cpu_computes": 0, "computes": 0,
                    "computed_tokens": 0, "prefetch_copies": 0, "denses": 0}
        # host time spent inside each kind of call: issue costs (compute, dense, a pinned load),
        # a pageable load's blocking copy, the CPU path, and the wait for the router's choice
        host_ms = dict.fromkeys(("compute", "load", "dense", "route", "cpu"), 0.0)
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
                else:
                    self._cpu(op[1], op[2], dense_ev)
                    host_ms["cpu"] += clock() - a
                    executed["cpu_computes"] += 1
                    executed["computed_tokens"] += op[2]
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
            self._load((sl,), (sl,), self.model.expert_bytes, [])
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
