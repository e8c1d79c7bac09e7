"""Today's all-events engine (simmoe 0.1, before the engine-speed issue), kept as the test oracle.

The fast engine in :mod:`simulator.engine` must produce the same step records and the same
timeline bit for bit (tests/test_engine_equivalence.py). Every operation here is an object and
a SimPy event; the streams are SimPy processes. Do not optimise this file: its value is that it
is the obvious implementation.
"""
from __future__ import annotations

from collections import deque

import simpy

from simulator.planner import COMPUTE, CPU, DENSE, LOAD, Decisions, Planner
from simulator.engine import StepRecord  # noqa: F401  (records of both engines)
from simulator.profile import CostModel

ROUTE_ID_BYTES = 4   # one int32 expert id per (token, choice), copied to the host each layer


class Op:
    """One issued operation and its life on a stream."""

    __slots__ = ("kind", "dur", "issue", "deps", "end", "ev", "label", "start", "prefetch")

    def __init__(self, kind, dur, issue, deps, label=None, prefetch=False):
        self.kind, self.dur, self.issue, self.deps = kind, dur, issue, deps
        self.end = None     # set when finished
        self.ev = None      # created only if someone waits on it
        self.label = label
        self.start = None
        self.prefetch = prefetch


class Stream:
    """A FIFO of operations executed one at a time (a CUDA stream / copy engine)."""

    def __init__(self, env: simpy.Environment, name: str, timeline: list | None):
        self.env, self.name, self.timeline = env, name, timeline
        self.queue: deque[Op] = deque()
        self.wake: simpy.Event | None = None
        self.busy = 0.0       # total busy ms
        self.last: Op | None = None
        env.process(self._run())

    def submit(self, op: Op) -> None:
        self.queue.append(op)
        self.last = op
        if self.wake is not None and not self.wake.triggered:
            self.wake.succeed()

    def _run(self):
        env, q = self.env, self.queue
        while True:
            if not q:
                self.wake = env.event()
                yield self.wake
                self.wake = None
                continue
            op = q.popleft()
            if op.issue > env.now:
                yield env.timeout(op.issue - env.now)
            for dep in op.deps:
                if dep.end is None:
                    yield wait_for(env, dep)
            op.start = env.now
            yield env.timeout(op.dur)
            op.end = env.now
            self.busy += op.dur
            if op.ev is not None:
                op.ev.succeed()
            if self.timeline is not None:
                self.timeline.append((self.name, op.start, op.end, op.kind, op.label, op.prefetch))


def wait_for(env: simpy.Environment, op: Op) -> simpy.Event:
    if op.ev is None:
        op.ev = env.event()
    return op.ev


# the step records are the fast engine's own type, so the two compare field by field


class Engine:
    """Times a planner's operations on one GPU (compute stream, copy stream, host)."""

    def __init__(self, cost: CostModel, memory: str, dense_ms: float, timeline: list | None = None):
        self.cost, self.memory, self.dense_ms = cost, memory, dense_ms
        self.timeline = timeline
        self.env = simpy.Environment()
        self.compute = Stream(self.env, "compute", timeline)
        self.copy = Stream(self.env, "copy", timeline)
        self.blocking_copies = memory == "pageable" and cost.pageable_blocks_host

    def run(self, planner: Planner, steps: range | None = None) -> list[StepRecord]:
        records: list[StepRecord] = []
        steps = range(planner.trace.num_steps) if steps is None else steps
        self.env.process(self._host(planner, steps, records))
        self.env.run()
        return records

    def _host(self, planner: Planner, steps, records):
        env, cost, comp, copy = self.env, self.cost, self.compute, self.copy
        memory, blocking, tail = self.memory, self.blocking_copies, cost.pageable_tail
        l_copy, l_expert, l_dense = cost.launch_copy, cost.launch_expert, cost.launch_dense
        act_bytes = cost.activation_bytes_per_token
        route_ms = cost.copy_ms(ROUTE_ID_BYTES * planner.trace.max_step_tokens * planner.k, "pageable", "d2h")
        tl = self.timeline
        last_load: dict[int, Op] = {}
        last_read: dict[int, Op] = {}
        no_deps: tuple = ()
        for s in steps:
            layers, dec = planner.plan_step(s)
            t0 = env.now
            host = t0                     # host clock; the host process yields only to block
            busy_c0, busy_x0 = comp.busy, copy.busy
            cpu_ms = 0.0
            for ops in layers:
                dense_op = None
                for op in ops:
                    kind = op[0]
                    if kind == COMPUTE:
                        host += l_expert
                        dep = last_load.get(op[1])
                        o = Op(COMPUTE, cost.expert_ms(op[3]), host,
                               no_deps if dep is None or dep.end is not None else (dep,), op[2])
                        comp.submit(o)
                        last_read[op[1]] = o
                    elif kind == LOAD:
                        host += l_copy
                        deps = tuple(r for r in (last_read.get(sl) for sl in op[1]) if r is not None and r.end is None)
                        o = Op(LOAD, cost.copy_ms(op[3], memory), host, deps, op[2], op[4])
                        copy.submit(o)
                        for sl in op[1]:
                            last_load[sl] = o
                        if blocking:
                            if host > env.now:
                                yield env.timeout(host - env.now)
                            if o.end is None:
                                yield wait_for(env, o)
                            host = env.now + tail   # the driver finishes the staged copy first
                    elif kind == DENSE:
                        host += l_dense
                        dense_op = Op(DENSE, self.dense_ms, host, no_deps, None)
                        comp.submit(dense_op)
                        # the router's choice reaches the host only when the layer's dense work
                        # (attention, router) is done: the host syncs and copies the ids down
                        if host > env.now:
                            yield env.timeout(host - env.now)
                        if dense_op.end is None:
                            yield wait_for(env, dense_op)
                        host = env.now + route_ms
                    else:  # CPU: activations down, FFN on the host, result up; host blocked
                        if host > env.now:
                            yield env.timeout(host - env.now)
                        dur = cost.cpu_expert_ms(op[2])
                        if not cost.cpu_path_includes_transfers:
                            nb = act_bytes * op[2]
                            dur += cost.copy_ms(nb, "pinned", "d2h") + cost.copy_ms(nb, "pinned")
                        start = env.now
                        yield env.timeout(dur)
                        cpu_ms += dur
                        host = env.now
                        if tl is not None:
                            tl.append(("cpu", start, host, CPU, op[1], False))
            # end of step: synchronise with both streams
            if host > env.now:
                yield env.timeout(host - env.now)
            for last in (comp.last, copy.last):
                if last is not None and last.end is None:
                    yield wait_for(env, last)
            yield env.timeout(cost.sync)
            lat = env.now - t0
            c_ms, x_ms = comp.busy - busy_c0, copy.busy - busy_x0
            records.append(StepRecord(
                step=s, phase=int(planner.trace.phase[s]), start_ms=t0, latency_ms=lat,
                compute_ms=c_ms, transfer_ms=x_ms, stall_ms=max(0.0, lat - c_ms), cpu_ms=cpu_ms,
                host_ms=host - t0, decisions=dec,
            ))
