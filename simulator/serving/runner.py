"""A serving run: requests, the scheduler and the engine, step by step.

For each (policy, max batch, replication): the workload's requests are drawn; the scheduler
builds a step at the clock's time (admitting what has arrived), the planner plans it, the
engine times it, and the clock moves to the step's end (or, when nothing runs, to the next
arrival). The engine's own clock counts busy time only: a step ends with a synchronise, so
nothing it holds spans the idle gap, and its latency does not depend on where the gap put it.

GPU memory (``workload.scheduler.gpu_memory``): the expert slots (cache and staging) take
theirs first, the KV cache gets the rest (:func:`memory_split`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..engine import Engine
from ..engine_costs import MixedStepCost
from ..errors import InputError
from ..profile import Profile, load_profile
from ..runner import cost_model, derive_seed
from .planner import ServingPlanner, StepTrace
from .scheduler import DECODE, Scheduler
from .workload import make_requests, routing_source


def kv_bytes_per_token(sc) -> int:
    w, m = sc.workload.scheduler, sc.model
    if w.kv_bytes_per_token is not None:
        return w.kv_bytes_per_token
    if m.arch is None:
        raise InputError(f"scenario {sc.name}", "workload.scheduler.kv_bytes_per_token",
                         f"model {m.name} has no architecture to size its KV cache from: give it")
    return m.arch.kv_bytes_per_token(m.dtype_bytes) * m.arch.total_layers


def memory_split(sc, slots: int, where: str) -> dict:
    """GPU bytes of the expert slots and of the KV cache, and the KV cache's tokens."""
    m, g = sc.model, sc.workload.scheduler.gpu_memory
    expert = slots * m.expert_bytes
    out = {"gpu_memory_bytes": g, "expert_slots": slots, "expert_slot_bytes": expert,
           "kv_bytes_per_token": None, "kv_bytes": None, "kv_tokens": None}
    if g is None:
        return out
    per = kv_bytes_per_token(sc)
    kv = g - expert
    if kv < per:
        raise InputError(f"scenario {sc.name}", where,
                         f"{slots:,} expert slots take {expert:,} of workload.scheduler.gpu_memory's {g:,} "
                         "bytes: nothing is left for the KV cache (give fewer slots or more memory)")
    out.update(kv_bytes_per_token=per, kv_bytes=kv, kv_tokens=kv // per)
    return out


@dataclass
class ServeRun:
    requests: pd.DataFrame
    steps: pd.DataFrame
    info: dict = field(default_factory=dict)


@dataclass
class Setup:
    """What one serving run (simulated or live) starts from."""

    requests: list
    routing: object
    trace: StepTrace
    planner: ServingPlanner
    split: dict
    sched: Scheduler


def setup_run(sc, policy, max_batch: int, replication: int, *, index: int = 0, base_dir: Path | None = None,
              requests=None) -> Setup:
    """Requests, routing, the growing trace, the planner, the memory split and the scheduler of
    one policy at one max batch over one replication (the same seeds live and simulated)."""
    w, m = sc.workload, sc.model
    where = f"policies[{index}]"
    reqs = requests if requests is not None else make_requests(w, sc.seed, replication, base_dir)
    routing = routing_source(sc, derive_seed(sc.seed, replication, 11), replication, base_dir)
    trace = StepTrace(m.num_layers, m.num_experts, m.top_k, w.scheduler.token_budget)
    try:
        planner = ServingPlanner(m, policy, trace, seed=derive_seed(sc.seed, replication, max_batch, 7))
        split = memory_split(sc, planner.total_slots, f"{where}.cache.capacity")
        sched = Scheduler(reqs, max_batch, w.scheduler.token_budget, w.scheduler.chunk, split["kv_tokens"])
    except ValueError as e:
        raise InputError(f"scenario {sc.name}", where, str(e)) from None
    return Setup(reqs, routing, trace, planner, split, sched)


def serve_one(sc, policy, max_batch: int, replication: int, profile: Profile, *, index: int = 0,
              base_dir: Path | None = None, requests=None, tick: Callable[[int], None] | None = None,
              timeline: list | None = None) -> ServeRun:
    """One policy at one max batch over one replication's requests. ``timeline``: a list that
    receives the engine's operations (:class:`~simulator.engine.Engine`'s records) on the
    serving clock (idle gaps included)."""
    w = sc.workload
    run = setup_run(sc, policy, max_batch, replication, index=index, base_dir=base_dir, requests=requests)
    trace, planner, split, sched = run.trace, run.planner, run.split, run.sched
    engine, mixed = make_engine(sc, policy, profile, timeline=[] if timeline is not None else None)
    step_rows: list[dict] = []
    drive = make_driver(run, mixed)

    def steps():
        for plan, s in drive.steps():
            n_ops = len(engine.timeline) if timeline is not None else 0
            yield s
            rec = engine.records[-1]
            if timeline is not None:      # the step's operations, moved from busy time to the clock
                shift = plan.start_ms - rec.start_ms
                timeline.extend((st, a + shift, b + shift, *rest) for st, a, b, *rest in engine.timeline[n_ops:])
            n_done = len(sched.done)
            drive.finish(plan, rec.latency_ms)
            row = {"step": s, "start_ms": plan.start_ms, "latency_ms": rec.latency_ms, "phase": rec.phase,
                   "sequences": len(plan.items), "prefill_tokens": plan.prefill_tokens,
                   "decode_tokens": plan.decode_tokens, "running": len(sched.running), "waiting": drive.queued(),
                   "kv_tokens_used": sched.kv_used, "compute_ms": rec.compute_ms, "transfer_ms": rec.transfer_ms,
                   "stall_ms": rec.stall_ms, "cpu_ms": rec.cpu_ms, "host_ms": rec.host_ms}
            row.update(rec.decisions.as_dict())
            step_rows.append(row)
            if tick and len(sched.done) > n_done:
                tick(len(sched.done) - n_done)

    engine.run(planner, steps())
    info = {**split, "peak_batch": sched.peak_batch, "peak_kv_tokens": sched.peak_kv, "steps": sched.steps,
            "staged_loads": planner.staged_loads, "budget_cpu_misses": planner.budget.over if planner.budget and not planner.defers else 0,
            "budget_over_copies": planner.budget.over if planner.defers else 0,
            "deferred_prompt_tokens": planner.deferred, "notes": sorted(mixed.notes) if mixed is not None else []}
    return ServeRun(requests=request_table(sched, w.slo), steps=pd.DataFrame(step_rows), info=info)


def make_engine(sc, policy, profile: Profile, timeline: list | None = None) -> tuple[Engine, MixedStepCost | None]:
    """The engine of one serving run and its mixed-step prices (None for the twin style, whose
    dense op is the scenario's constant)."""
    cost = cost_model(sc, profile, sc.workload.scheduler.token_budget)
    if policy.miss.kind == "cpu" or (policy.serving.upload_budget is not None and policy.serving.budget_over == "cpu"):
        cost.require_cpu()
    mixed = None if sc.engine.style == "twin" else MixedStepCost.from_scenario(sc, profile, f"scenario {sc.name}")
    return Engine(cost, policy.memory, sc.dense_ms if mixed is None else mixed, timeline=timeline), mixed


class Driver:
    """Turns the scheduler's plans into the planner's steps (routing rows per token) on a clock:
    shared by the simulated run and the live one (``calibrate.executors.serving``), and by a
    replay of a recorded schedule (:meth:`append` alone). ``fit``: the planner's
    :meth:`~simulator.serving.planner.ServingPlanner.fit_prefill` when its upload budget defers
    prompt tokens (``serving.budget_over: defer``): a step keeps only the prompt tokens it fits."""

    def __init__(self, sched: Scheduler, trace: StepTrace, routing, cost: MixedStepCost | None = None,
                 fit: Callable | None = None):
        self.sched, self.trace, self.routing, self.cost, self.fit = sched, trace, routing, cost, fit
        self.requests = {r.rid: r for r in sched.requests}
        self.rows_of: dict[int, np.ndarray] = {}
        self.now = 0.0

    def queued(self) -> int:
        return len(self.sched.waiting)

    def _rows(self, items):
        for it in items:
            if it.rid not in self.rows_of:
                self.rows_of[it.rid] = self.routing.rows(self.requests[it.rid])
        rows = np.concatenate([self.rows_of[it.rid][it.row0:it.row0 + it.count] for it in items])
        kinds = np.repeat(np.array([it.kind for it in items], np.uint8), [it.count for it in items])
        return rows, kinds

    def append(self, items: list) -> int:
        """Append one step of ``items`` to the trace (and its price to the cost); with ``fit``
        the step's prompt tokens are first cut to what it fits (``items`` edited in place)."""
        rows, kinds = self._rows(items)
        if self.fit is not None and kinds.any():
            n = self.fit(rows, kinds)
            if n < int(kinds.sum()):
                items[:] = trim_prefill(items, n)
                rows, kinds = self._rows(items)
        seqs = np.repeat(np.array([it.rid for it in items], np.int64), [it.count for it in items])
        if self.cost is not None:
            dec = [it for it in items if it.kind == DECODE]
            ctx = sum(it.row0 + 1 for it in dec) / len(dec) if dec else 0.0
            pre = [it for it in items if it.kind != DECODE]
            self.cost.add(len(dec), ctx, sum(it.count for it in pre), len(items), sum(it.row0 for it in pre),
                          longest=max((it.count for it in items), default=1))
        return self.trace.append(rows, kinds, seqs)

    def steps(self):
        """Yields ``(plan, step index)`` with the step appended to the trace; the caller times
        it and calls :meth:`finish` before asking for the next."""
        sched = self.sched
        while not sched.finished:
            plan = sched.build(self.now)
            if plan is None:
                nxt = sched.next_arrival()
                if nxt <= self.now:          # pragma: no cover (the scheduler admits an arrived head)
                    raise RuntimeError("scheduler stalled with an arrived request and nothing running")
                self.now = nxt
                continue
            yield plan, self.append(plan.items)

    def finish(self, plan, latency_ms: float) -> None:
        end = self.now + latency_ms
        self.sched.finish(plan, end)
        live = {r.req.rid for r in self.sched.running}
        for rid in [k for k in self.rows_of if k not in live]:
            del self.rows_of[rid]
        self.now = end


def trim_prefill(items: list, n: int) -> list:
    """``items`` keeping their decode tokens and the first ``n`` prompt tokens (admission
    order): the prompt chunk that straddles ``n`` is cut, the ones after it wait."""
    out, left = [], n
    for it in items:
        if it.kind == DECODE:
            out.append(it)
        elif left > 0:
            out.append(it if it.count <= left else replace(it, count=left))
            left -= min(it.count, left)
    return out


def make_driver(run: "Setup", cost: MixedStepCost | None = None) -> Driver:
    """The driver of one run's scheduler and planner (simulated and live alike)."""
    return Driver(run.sched, run.trace, run.routing, cost, run.planner.fit_prefill if run.planner.defers else None)


def request_table(sched: Scheduler, slo) -> pd.DataFrame:
    return latency_table(sched.done, slo)


def latency_table(done: list, slo) -> pd.DataFrame:
    """One row per finished request (:class:`~simulator.serving.scheduler.Finished`), by id."""
    rows = []
    for f in sorted(done, key=lambda f: f.req.rid):
        r = f.req
        ttft = f.first_ms - r.arrival_ms
        e2e = f.finish_ms - r.arrival_ms
        tpot = (f.finish_ms - f.first_ms) / (r.output - 1) if r.output > 1 else 0.0
        rows.append({"request": r.rid, "arrival_ms": r.arrival_ms, "prompt_tokens": r.prompt,
                     "output_tokens": r.output, "admit_ms": f.admit_ms, "first_token_ms": f.first_ms,
                     "finish_ms": f.finish_ms, "queue_ms": f.admit_ms - r.arrival_ms, "ttft_ms": ttft,
                     "tpot_ms": tpot, "e2e_ms": e2e,
                     "meets_slo": bool(ttft <= slo.ttft_ms and tpot <= slo.tpot_ms)})
    return pd.DataFrame(rows)


def serve_scenario(sc, *, profile: Profile | str | None = None, base_dir: Path | None = None,
                   progress: Callable[[int, int, str], None] | None = None):
    """Every (max batch, replication, policy) of a serving scenario: the per-request table,
    the per-step table and the summary rows (:func:`simulator.serving.metrics.summarise_serving`)."""
    from .metrics import summarise_serving

    if not isinstance(profile, Profile):
        profile = load_profile(profile or sc.profile)
    req_frames, step_frames, infos = [], [], {}
    per_run = sc.workload.requests
    total = len(sc.batch_sizes) * sc.replications * len(sc.policies) * per_run
    done = [0]
    for b in sc.batch_sizes:
        for rep in range(sc.replications):
            reqs = make_requests(sc.workload, sc.seed, rep, base_dir)
            for i, pol in enumerate(sc.policies):
                what = f"{pol.name} B={b} rep {rep + 1}/{sc.replications}"
                if progress:
                    progress(done[0], total, what)

                def tick(n, what=what):
                    done[0] += n
                    if progress:
                        progress(done[0], total, what)
                run = serve_one(sc, pol, b, rep, profile, index=i, base_dir=base_dir, requests=reqs, tick=tick)
                done[0] += per_run - len(reqs)          # a file may hold fewer requests
                for df in (run.requests, run.steps):
                    df.insert(0, "replication", rep)
                    df.insert(0, "batch_size", b)
                    df.insert(0, "policy", pol.name)
                req_frames.append(run.requests)
                step_frames.append(run.steps)
                infos[(pol.name, b, rep)] = run.info
    if progress:
        progress(total, total, "done")
    requests = pd.concat(req_frames, ignore_index=True)
    steps = pd.concat(step_frames, ignore_index=True)
    summary = summarise_serving(requests, steps, sc, infos)
    return ServingResult(scenario=sc, profile=profile, requests=requests, steps=steps, summary=summary,
                         meta={"profile": profile.name, "profile_kind": profile.provenance.get("kind")})


@dataclass
class ServingResult:
    scenario: object
    profile: Profile
    requests: pd.DataFrame
    steps: pd.DataFrame
    summary: list[dict]
    meta: dict = field(default_factory=dict)
    decision: dict = field(default_factory=dict)
