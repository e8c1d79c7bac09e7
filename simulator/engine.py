"""The SimPy model of one GPU's streams replaying a planner's operations.

Resources, as a CUDA program has them:

- **host**: the Python thread that issues work; a SimPy process. Issuing costs host time
  (``host.launch_us`` in the profile). The host learns a layer's routing only when that layer's
  dense work (attention, router) has finished: it waits for it and copies the expert ids down,
  then issues the layer's expert work. A copy from pageable memory and a CPU expert block the
  host until done (after a pageable copy, the next call also waits ``host.pageable_tail_us``
  while the driver finishes the staged copy); each step ends with a synchronise.
- **compute stream**: dense work and expert FFNs, in issue order. An FFN waits for the last
  load into its slot. A layer's dense op priced from engine tables with a GPU-only grid
  (``engine.<model>.decode_gpu``) runs as its kernels are issued: it ends no sooner than the
  lone layer's measured time after its issue, nor than its GPU work alone after the stream
  is free (so a GPU waiting on copies meets only the GPU part). In a style priced from engine
  tables (the real model's executors), the router's choice reaches the host only after the
  host-to-device copies issued before it have finished as well: on the H200 the real model's
  router read (a small device-to-host copy) waits behind the copy engine's queue
  (``bench/probe_live_timeline.py``: a next-layer prefetch is issued only once the layer's
  prefetched copies are done, 3.2-3.7 ms late at two layers in five).
- **copy stream**: host-to-device copies (a copy engine), in issue order. A load waits for the
  last compute that read the slot it overwrites.
- **disk** (a disk tier, :mod:`simulator.tiers`): ``queue_depth`` lanes of reads into host
  slots; a read takes the lane free first and waits for the last copy or direct read from the
  host slot it overwrites. The host waits for a key's read before it issues a copy, a CPU
  expert or a direct read of that key (as the live executor waits on the read's future).
- Dequantise ops run on the compute stream after their slot's load. A direct read runs on the
  compute stream and holds the PCIe link as well: it starts when both the compute stream and
  the copy stream are free, and the next copy waits for it (the two share the link's
  bandwidth; the model lets neither overlap the other).

How operations are timed (docs/architecture.md, "How the engine times operations"): every
operation waits only on operations issued before it, and each stream runs its operations in
issue order. So when the host issues an operation, everything it can wait for is already
timed, and the stream computes its start and end on the spot::

    start = max(stream free, host clock at the last wait) -> then the issue time -> then deps
    end   = start + duration

with the very floating-point operations the all-events engine performs when its stream
processes wake, wait and time out (tests/reference_engine.py, the oracle this engine equals bit
for bit). Nothing per operation is an object or an event. The host yields to SimPy once per
step, at its synchronise. Its other waits (each layer's router output, a blocking pageable copy,
a CPU expert, a disk read it needs) advance the host's own clock, exactly as the all-events
engine's waits and timeouts do (nothing else runs on the host thread, and no other process
shares the environment).

Durations come from :class:`~simulator.profile.CostModel`, frozen into lists and dicts before the
loop; in a style priced from engine tables, a pageable copy and a CPU expert are priced as the
real-model executor meets them where its in situ calibration timed them
(:meth:`~simulator.engine_costs.StyleCost.copy_pricer`, ``cpu_pricer``). A step's latency is
from the host starting it to the synchronise returning. Same inputs,
same float operations in the same order: runs are bit-for-bit reproducible.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from functools import partial
from heapq import heappush

import simpy
from simpy.core import NORMAL

from .engine_styles import GROUP, group_layer
from .planner import COMPUTE, CPU, DENSE, DEQUANT, DIRECT, LOAD, READ, Decisions, Planner
from .profile import CostModel

ROUTE_ID_BYTES = 4   # one int32 expert id per (token, choice), copied to the host each layer


class Clock(simpy.Environment):
    """A SimPy environment that can wake a process at an exact time (not ``now + delay``,
    which may round differently from the time the streams computed)."""

    def at(self, when: float) -> simpy.Event:
        ev = simpy.Event(self)
        ev._ok, ev._value = True, None
        heappush(self._queue, (when, NORMAL, next(self._eid), ev))
        return ev


@dataclass
class StepRecord:
    step: int
    phase: int
    start_ms: float
    latency_ms: float
    compute_ms: float
    transfer_ms: float
    stall_ms: float
    cpu_ms: float
    host_ms: float
    decisions: Decisions


class Engine:
    """Times a planner's operations on one GPU (compute stream, copy stream, host).

    ``timeline``: a list that receives ``(stream, start, end, opcode, label, prefetch)`` for
    every operation (stream ``compute``, ``copy`` or ``cpu``), when a timeline is asked for.
    """

    def __init__(self, cost: CostModel, memory: str, dense_ms, timeline: list | None = None):
        """``dense_ms``: the dense op's duration, a constant (the twin, or an override), or a
        :class:`~simulator.engine_costs.DenseCost` that prices each step from the profile's
        engine tables (dense op by batch and context, a per-step extra for embedding, LM
        head and dense layers, the style's per-layer and per-expert host cost)."""
        self.cost, self.memory, self.dense_ms = cost, memory, dense_ms
        self.timeline = timeline
        self.env = Clock()
        self.blocking_copies = memory == "pageable" and cost.pageable_blocks_host
        self.compute_busy = 0.0     # total busy ms of each stream
        self.copy_busy = 0.0

    def run(self, planner: Planner, steps: range | None = None) -> list[StepRecord]:
        """Plan and time ``steps`` (default all). Python's cyclic garbage collector is paused
        meanwhile: the plans are millions of short-lived tuples without cycles, which it would
        otherwise scan again and again (a third of the time at batch 256, per-item loads)."""
        records: list[StepRecord] = []
        self.records = records          # read between steps by a driver that yields ``steps`` lazily
        steps = range(planner.trace.num_steps) if steps is None else steps
        self.env.process(self._host(planner, steps, records))
        collecting = gc.isenabled()
        gc.disable()
        try:
            self.env.run()
        finally:
            if collecting:
                gc.enable()
        return records

    def _host(self, planner: Planner, steps, records):
        env, cost, tl = self.env, self.cost, self.timeline
        memory, blocking, tail = self.memory, self.blocking_copies, cost.pageable_tail
        l_copy, l_expert, l_dense = cost.launch_copy, cost.launch_expert, cost.launch_dense
        sync_ms = cost.sync
        grouped = False
        if isinstance(self.dense_ms, (int, float)):
            dense_ms, dense_of, extra_of, expert_base = self.dense_ms, None, None, 0.0
            gpu_of, route_wait = None, 0.0
            copy_price = partial(cost.copy_ms, memory=memory)   # nbytes -> ms
            cpu_price = cost.cpu_path_ms
        else:                                       # priced per step from engine tables
            dc = self.dense_ms
            dense_of, extra_of = dc.per_step()     # lists (a serving run's grow as it runs)
            gpu_of = dc.gpu_per_step()             # the dense op's GPU work alone, or None
            route_wait = dc.route_wait              # the real model's router read (see above)
            expert_base, l_expert = dc.expert_host_ms(l_expert)
            l_copy = dc.load_host_ms(l_copy)
            copy_price = dc.copy_pricer(cost, memory, l_copy + (tail if blocking else 0.0))
            cpu_price = dc.cpu_pricer(cost)         # the executor's own CPU expert, where measured
            grouped = dc.grouped                    # a layer's ready experts in one call
            if grouped:
                expert_base, group_of = 0.0, {}     # active -> (host, GPU) ms of one call
        lanes = [0.0] * planner.disk.queue_depth
        disk_tier = planner.host_cache is not None
        read_ms = cost.read_ms(planner.stored_bytes, planner.disk.io, planner.disk.queue_depth) if disk_tier else 0.0
        disk_end: dict[int, float] = {}             # key -> end of its last disk read
        hslot_of = dict(planner.host_preloaded)     # key -> host slot it was read into (or preloaded)
        hread_end: dict[int, float] = {}            # host slot -> end of the last op that read it
        small_of: dict[tuple, float] = {}           # (kind, size) -> ms of dequantise / direct ops
        act_bytes = cost.activation_bytes_per_token
        dq_host = cost.dequant_host_ms(planner.quant) if planner.quant else None
        l_dequant = l_dense if dq_host is None else dq_host   # a dequantise's issue: its kernels' launches
        route_ms = cost.copy_ms(ROUTE_ID_BYTES * planner.trace.max_step_tokens * planner.k, "pageable", "d2h")
        gpu_ms = cost.gpu_expert.tolist()
        n_table = len(gpu_ms)
        copy_of: dict[int, float] = {}              # nbytes -> ms
        cpu_of: dict[int, float] = {}               # tokens -> ms of the whole CPU path
        # per slot: end of the last load into it, of the last compute that read it (0.0: none
        # yet, which no start precedes)
        load_end = [0.0] * planner.total_slots
        read_end = [0.0] * planner.total_slots
        COMPUTE_, LOAD_, DENSE_ = COMPUTE, LOAD, DENSE   # locals: the loop compares every op
        now = env.now                               # the host's time at its last wait
        comp_free = copy_free = 0.0                 # when each stream finishes what it holds
        busy_c = busy_x = 0.0
        for s in steps:
            layers, dec = planner.plan_step(s)
            if grouped:
                layers = [group_layer(ops) for ops in layers]
            t0 = now
            host = t0
            busy_c0, busy_x0 = busy_c, busy_x
            cpu_ms = 0.0
            if dense_of is not None:
                dense_ms, extra = dense_of[s], extra_of[s]
                dense_gpu = dense_ms if gpu_of is None else gpu_of[s]
                if extra > 0:                       # embedding, LM head, dense layers
                    host += l_dense
                    t = comp_free if comp_free > now else now
                    if host > t:
                        t = t + (host - t)
                    comp_free = end = t + extra
                    busy_c += extra
                    if tl is not None:
                        tl.append(("compute", t, end, DENSE, "step", False))
            for ops in layers:
                for op in ops:
                    kind = op[0]
                    if kind == COMPUTE_:
                        host += l_expert
                        tok = op[3]
                        dur = gpu_ms[tok] if tok < n_table else cost.expert_ms(tok)
                        t = comp_free if comp_free > now else now
                        if host > t:
                            t = t + (host - t)
                        sl = op[1]
                        dep = load_end[sl]
                        if dep > t:
                            t = dep
                        comp_free = end = t + dur
                        busy_c += dur
                        read_end[sl] = end
                        if tl is not None:
                            tl.append(("compute", t, end, COMPUTE, op[2], False))
                    elif kind == LOAD_:
                        if disk_tier:               # the host waits for the reads of what it copies
                            for k in op[2]:
                                e = disk_end.get(k)
                                if e is not None and e > host:
                                    if host > now:
                                        now = now + (host - now)
                                    if e > now:
                                        now = e
                                    host = now
                        host += l_copy
                        nbytes = op[3]
                        dur = copy_of.get(nbytes)
                        if dur is None:
                            dur = copy_of[nbytes] = copy_price(nbytes)
                        t = copy_free if copy_free > now else now
                        if host > t:
                            t = t + (host - t)
                        slots = op[1]
                        if len(slots) == 1:         # (most copies: one slot, no loop)
                            sl = slots[0]
                            dep = read_end[sl]
                            if dep > t:
                                t = dep
                            copy_free = end = t + dur
                            load_end[sl] = end
                        else:
                            for sl in slots:
                                dep = read_end[sl]
                                if dep > t:
                                    t = dep
                            copy_free = end = t + dur
                            for sl in slots:
                                load_end[sl] = end
                        busy_x += dur
                        if disk_tier:
                            for k in op[2]:
                                hread_end[hslot_of[k]] = end
                        if tl is not None:
                            tl.append(("copy", t, end, LOAD, op[2], op[4]))
                        if blocking:                # the host waits for the copy, then the driver
                            if host > now:
                                now = now + (host - now)
                            if end > now:
                                now = end
                            host = now + tail
                    elif kind == DENSE_:
                        host += l_dense
                        t = comp_free if comp_free > now else now
                        if host > t:
                            t = t + (host - t)
                        if gpu_of is None:
                            comp_free = end = t + dense_ms
                            busy_c += dense_ms
                        else:   # its kernels run as they are issued: a GPU behind meets their GPU
                            end = t + dense_gpu   # work alone, an idle one the lone layer's time
                            if dense_gpu < dense_ms:
                                e = host + dense_ms
                                if e > end:
                                    end = e
                            comp_free = end
                            busy_c += dense_gpu
                        if tl is not None:
                            tl.append(("compute", t, end, DENSE, None, False))
                        # the router's choice reaches the host only when the layer's dense work
                        # (attention, router) is done: the host syncs (its clock advances to
                        # then, as in a blocking copy) and copies the ids down
                        if host > now:
                            now = now + (host - now)
                        if end > now:
                            now = end
                        if route_wait and copy_free > now:   # behind the copies issued before it
                            now = copy_free if route_wait == 1.0 else now + route_wait * (copy_free - now)
                        host = now + route_ms + expert_base
                    elif kind == GROUP:             # one grouped call over a layer's ready experts
                        hg = group_of.get(op[4])
                        if hg is None:
                            hg = group_of[op[4]] = dc.group_ms(op[4])
                        issue = host
                        host += hg[0]
                        dur = hg[1]
                        t = comp_free if comp_free > now else now
                        ready = issue if hg[2] else host   # overlapped: from the first launch
                        if ready > t:
                            t = t + (ready - t)
                        for sl in op[1]:
                            dep = load_end[sl]
                            if dep > t:
                                t = dep
                        end = t + dur
                        if hg[2] and host > end:           # not before its last launch
                            end = host
                        comp_free = end
                        busy_c += dur
                        for sl in op[1]:
                            read_end[sl] = end
                        if tl is not None:
                            tl.append(("compute", t, end, COMPUTE, f"group of {op[4]}", False))
                    elif kind == CPU:  # activations down, FFN on the host, result up; host blocked
                        if host > now:
                            now = now + (host - now)
                        if disk_tier:
                            e = disk_end.get(op[1])
                            if e is not None and e > now:
                                now = e
                        tok = op[2]
                        dur = cpu_of.get(tok)
                        if dur is None:
                            dur = cpu_of[tok] = cpu_price(tok)
                        start = now
                        now = now + dur
                        cpu_ms += dur
                        host = now
                        if tl is not None:
                            tl.append(("cpu", start, host, CPU, op[1], False))
                    elif kind == READ:      # a disk read into a host slot, on the lane free first
                        host += l_copy
                        i = lanes.index(min(lanes))
                        t = lanes[i] if lanes[i] > now else now
                        if host > t:
                            t = t + (host - t)
                        dep = hread_end.get(op[1])
                        if dep is not None and dep > t:
                            t = dep
                        lanes[i] = end = t + read_ms
                        disk_end[op[2]] = end
                        hslot_of[op[2]] = op[1]
                        if tl is not None:
                            tl.append(("disk", t, end, READ, op[2], op[4]))
                    else:                   # DEQUANT (a slot) or DIRECT (from mapped host memory)
                        if kind == DIRECT:
                            e = disk_end.get(op[1]) if disk_tier else None
                            if e is not None and e > host:
                                if host > now:
                                    now = now + (host - now)
                                if e > now:
                                    now = e
                                host = now
                            host += l_expert
                            key = (DIRECT, op[2])
                            dur = small_of.get(key)
                            if dur is None:
                                dur = small_of[key] = cost.direct_ms(op[2], op[3])
                        else:
                            host += l_dequant
                            key = (DEQUANT, op[3])
                            dur = small_of.get(key)
                            if dur is None:
                                dur = small_of[key] = cost.dequant_ms(op[3], planner.quant)
                        t = comp_free if comp_free > now else now
                        if host > t:
                            t = t + (host - t)
                        if kind == DEQUANT:
                            dep = load_end[op[1]]
                            if dep > t:
                                t = dep
                        elif copy_free > t:         # a direct read shares PCIe with the copies
                            t = copy_free
                        comp_free = end = t + dur
                        busy_c += dur
                        if kind == DEQUANT:
                            read_end[op[1]] = end
                        else:
                            copy_free = end
                            if disk_tier:
                                hread_end[hslot_of[op[1]]] = end
                        if tl is not None:
                            tl.append(("compute", t, end, kind, op[2] if kind == DEQUANT else op[1], False))
            # end of step: synchronise with both streams
            if host > now:
                now = now + (host - now)
            if comp_free > now:
                now = comp_free
            if copy_free > now:
                now = copy_free
            now = now + sync_ms
            yield env.at(now)
            lat = now - t0
            c_ms, x_ms = busy_c - busy_c0, busy_x - busy_x0
            records.append(StepRecord(
                step=s, phase=int(planner.trace.phase[s]), start_ms=t0, latency_ms=lat,
                compute_ms=c_ms, transfer_ms=x_ms, stall_ms=max(0.0, lat - c_ms), cpu_ms=cpu_ms,
                host_ms=host - t0, decisions=dec,
            ))
        self.compute_busy, self.copy_busy = busy_c, busy_x
