"""Several GPUs, simulated (docs/multigpu.md; issue 16 item 5).

Each GPU has its own expert cache (the policy's cache, of the policy's capacity, on every GPU),
its own planner, copy stream and compute stream. The decisions come from one
:class:`~simulator.planner.Planner` per GPU, interleaved layer by layer (:func:`layer_plans`):

- ``expert-parallel``: every GPU plans the whole trace through a load mode that keeps only the
  experts the placement (:mod:`simulator.policies.placement`) puts on it, and a prefetch
  policy that prefetches only those. Tokens live on GPU ``i * N // T`` (contiguous shares of
  the step's ``T`` tokens: data-parallel attention); after a layer's dense work each token's
  activation goes to every other GPU holding one of its experts (dispatch), and back after the
  experts (combine): two all-to-alls over the peer link per layer.
- ``replicate``: GPU ``g`` plans its own share of the tokens (a sub-trace) and copies whatever
  expert they route to into its own cache: no all-to-all, one barrier at the step's end. With
  ``peer_fetch`` a copy comes from a peer's cache over the peer link when that ends sooner
  (:func:`peer_fetcher`).

Timing is the single-GPU engine's (:mod:`simulator.engine`), written out here for ``N`` GPUs in
lockstep, layer by layer, with the same floating-point operations (so one GPU reproduces the
engine bit for bit, in every engine style and with every tier): :class:`Gpu`. Expert-parallel
layers add a barrier: the dispatch starts when the last GPU has its routing, takes ``peer
latency + max over GPUs of max(bytes sent, bytes received) / peer bandwidth``, and the experts'
computes wait for it; the combine starts when the last GPU's compute stream is done and the
next layer's dense work waits for it. What the GPUs share (:class:`Shared`) is taken in issue
order (GPU 0's layer ops, then GPU 1's, ...): the host link (``shared_pcie``: copies and direct
reads), the host CPU and the staging of pageable copies (``shared_host``), the disk and one
host memory (a disk tier: :func:`share_host_memory`), each GPU's send side of the peer link.
"""
from __future__ import annotations

from dataclasses import fields
from functools import partial

import numpy as np
import pandas as pd

from .engine import ROUTE_ID_BYTES
from .engine_styles import GROUP, group_layer
from .planner import COMPUTE, CPU, DENSE, DEQUANT, DIRECT, LOAD, READ, Decisions, Planner, StepRouting
from .policies import LOAD_MODES
from .policies.placement import PLACEMENT_POLICIES
from .profile import CostModel, PeerLink
from .scenario import PolicySpec, Scenario
from .traces import Trace

#: Decisions fields that are counted once per step, not once per GPU (expert-parallel)
_STEP_FIELDS = ("tokens", "requests", "unique_requests")


class OwnedLoad:
    """A load mode that keeps only the keys ``mine[key]`` (one GPU's experts)."""

    def __init__(self, inner, mine: np.ndarray):
        self.inner, self.mine, self.coalesce = inner, mine, inner.coalesce

    def requests(self, step):
        mine, out = self.mine, []
        for keys, tokens in self.inner.requests(step):
            kept = [i for i, k in enumerate(keys) if mine[k]]
            out.append(([keys[i] for i in kept], [tokens[i] for i in kept]))
        return out

    def request_keys(self, step):
        k = np.asarray(self.inner.request_keys(step))
        return k[self.mine[k]]


class OwnedPrefetch:
    """A prefetch policy whose picks are cut to one GPU's experts (its budget is per GPU)."""

    def __init__(self, inner, mine: np.ndarray, num_experts: int):
        self.inner, self.mine, self.E = inner, mine, num_experts

    @property
    def budget(self):
        return self.inner.budget

    def predict(self, req):
        base, mine = req.target_layer * self.E, self.mine
        return [e for e in self.inner.predict(req) if mine[base + int(e)]]

    def observe(self, *args):
        self.inner.observe(*args)


def token_home(tokens: int, count: int) -> np.ndarray:
    """GPU of each of a step's tokens: contiguous, even shares."""
    return (np.arange(tokens, dtype=np.int64) * count) // max(tokens, 1)


def sub_trace(trace: Trace, g: int, count: int) -> Trace:
    """GPU ``g``'s share of every step's tokens (replicate mode)."""
    off = trace.step_offsets
    idx = [np.arange(off[s], off[s + 1])[token_home(int(off[s + 1] - off[s]), count) == g]
           for s in range(trace.num_steps)]
    offsets = np.concatenate([[0], np.cumsum([len(i) for i in idx])]).astype(off.dtype)
    idx = np.concatenate(idx).astype(np.int64)
    return Trace(experts=trace.experts[idx], step_offsets=offsets, seq=trace.seq[idx], phase=trace.phase,
                 num_experts=trace.num_experts, meta=dict(trace.meta))


def placement(sc: Scenario, trace: Trace) -> np.ndarray:
    """``(layers, experts)`` GPU of every expert (expert-parallel)."""
    g = sc.gpus
    return PLACEMENT_POLICIES[g.placement]().place(trace, g.count)


class HeldByAny(set):
    """One planner's host-memory holds (the keys its layer still reads) in a host cache that
    several planners share: it adds, clears and iterates its own keys, but a key any of the
    planners holds counts as held (``in``) and the room left counts every planner's holds
    (``len``), so no GPU evicts what another GPU's layer still reads."""

    def __init__(self, group: list):
        super().__init__()
        self.group = group
        group.append(self)

    def __contains__(self, key) -> bool:
        return any(set.__contains__(h, key) for h in self.group)

    def __len__(self) -> int:
        return len(set().union(*self.group)) if len(self.group) > 1 else set.__len__(self)


def share_host_memory(planners: list[Planner | None]) -> None:
    """One host memory for every GPU (a disk tier): the first planner's host cache becomes
    every planner's, with :class:`HeldByAny` holds. Only for the kinds that order residents by
    their own calls or keep nothing (:data:`simulator.scenario.SHARED_HOST_KINDS`)."""
    live = [p for p in planners if p is not None]
    if len(live) < 2 or live[0].host_cache is None:
        return
    first, group = live[0], []
    for p in live:
        p.host_cache, p.host_preloaded, p._host_hot = first.host_cache, first.host_preloaded, first._host_hot
        p._host_busy = HeldByAny(group)


def build_planners(sc: Scenario, policy: PolicySpec, trace: Trace, cost: CostModel, seed: int,
                   owner: np.ndarray | None) -> list[Planner | None]:
    """One planner per GPU (``None`` for a GPU that serves nothing in the whole run)."""
    m, n = sc.model, sc.gpus.count
    planners: list[Planner | None] = []
    for g in range(n):
        if owner is None:                       # replicate: the GPU's share of the tokens
            tr = sub_trace(trace, g, n) if n > 1 else trace
            planners.append(Planner(m, policy, tr, seed=seed, cost=cost, dense_ms=sc.dense_ms)
                            if tr.max_step_tokens else None)
            continue
        mine = (owner == g).ravel()
        if n == 1:
            planners.append(Planner(m, policy, trace, seed=seed, cost=cost, dense_ms=sc.dense_ms))
            continue
        p = Planner(m, policy, trace, seed=seed, cost=cost, dense_ms=sc.dense_ms,
                    load=OwnedLoad(LOAD_MODES[policy.load](), mine))
        p.prefetch = OwnedPrefetch(p.prefetch, mine, m.num_experts)
        planners.append(p)
    share_host_memory(planners)
    return planners


def peer_terms(sc: Scenario, cost: CostModel) -> tuple[float, float]:
    """(bytes per ms, latency ms) of the peer link."""
    gpus = cost.profile.gpus
    peer = gpus.peer if gpus is not None else PeerLink()
    bw = sc.gpus.peer_GBps if sc.gpus.peer_GBps is not None else peer.bandwidth_GBps
    lat = sc.gpus.peer_latency_us if sc.gpus.peer_latency_us is not None else peer.latency_us
    return bw * 1e6, lat * 1e-3


def all_to_all(routing: np.ndarray, owner: np.ndarray, count: int, act_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per layer of one step: the bytes of the busiest GPU's side (max of sent and received) and
    the total bytes of one all-to-all (dispatch; the combine moves the same bytes back). Layer
    by layer, so that a large prefill needs ``tokens x GPUs`` booleans at a time."""
    T, L, _ = routing.shape
    busiest, moved = np.zeros(L), np.zeros(L, dtype=np.int64)
    if T == 0:
        return busiest, moved
    home = token_home(T, count)
    rows = np.arange(T)
    for l in range(L):
        goes = np.zeros((T, count), dtype=bool)
        goes[rows[:, None], owner[l][routing[:, l, :]]] = True       # GPUs holding a token's experts
        goes[rows, home] = False                                     # its own GPU: no copy
        recv = goes.sum(axis=0)
        send = np.bincount(home, weights=goes.sum(axis=1), minlength=count)
        busiest[l] = max(recv.max(), send.max()) * act_bytes
        moved[l] = int(recv.sum()) * act_bytes
    return busiest, moved


A2A, STAGE = -1, -2   # timeline opcodes of this module: an all-to-all or a peer copy, host staging


def layer_plans(p: Planner, s: int, out: list[Decisions]):
    """:meth:`Planner.plan_step` one layer at a time (the same calls in the same order; a
    test checks the two agree): the GPUs' planners are interleaved layer by layer, so that a
    GPU reads a peer's cache (peer fetch) as it stands at that layer. ``out`` receives the
    step's :class:`Decisions`, complete once the last layer is planned."""
    routing = p.trace.step(s)
    step = StepRouting(routing, p.E)
    d = Decisions(tokens=len(routing), requests=routing.size, unique_requests=step.unique_requests)
    out.append(d)
    plan_layer = p._plan_staged if p.staged else p._plan_layer
    for l, (keys, tokens) in enumerate(p.load.requests(step)):
        ops = plan_layer(s, l, keys, tokens, step, d)
        if p.observes:
            p.prefetch.observe(s, l, routing[:, l, :])
        yield ops


class Shared:
    """What the GPUs share: the host link (``shared_pcie``), the host's CPU and its staging of
    pageable copies (``shared_host``), the disk and host memory (a disk tier), and each
    GPU's send side of the peer link (peer fetch). A shared resource is taken in issue order
    (GPU 0's operations of a layer, then GPU 1's, ...)."""

    def __init__(self, n: int, pcie: bool, host: bool, queue_depth: int):
        self.pcie, self.host = pcie and n > 1, host and n > 1
        self.link_free = self.cpu_free = self.stage_free = 0.0
        self.peer_out = [0.0] * n           # when each GPU's NVLink send side is free
        self.lanes = [0.0] * queue_depth    # the one disk's lanes
        self.disk_end: dict[int, float] = {}    # key -> end of its last disk read
        self.hslot_of: dict[int, int] = {}      # key -> host slot it was read into (or preloaded)
        self.hread_end: dict[int, float] = {}   # host slot -> end of the last op that read it


class Gpu:
    """One GPU's streams and host thread, timed as :class:`simulator.engine.Engine` times them
    (the same floating-point operations in the same order), with the waits on what the GPUs
    share (:class:`Shared`)."""

    def __init__(self, g: int, planner: Planner, cost: CostModel, memory: str, dense, tl: list | None):
        """``dense``: the dense op's constant ms (twin) or a
        :class:`~simulator.engine_costs.DenseCost` priced on the tokens this GPU holds
        (``None`` lists: it holds none, so no dense work beyond the style's terms)."""
        self.g, self.p, self.cost, self.memory, self.tl = g, planner, cost, memory, tl
        self.host = self.now = self.comp_free = self.copy_free = 0.0
        self.act_ready = None               # expert-parallel: when the dispatch has delivered
        self.load_end: dict[int, float] = {}    # slot -> end of the last load into it
        self.read_end: dict[int, float] = {}    # slot -> end of the last compute that read it
        self.busy_c = self.busy_x = 0.0     # total busy ms of each stream (as the engine's)
        self.busy_c0 = self.busy_x0 = 0.0   # ... when the step started
        self.cpu_ms = 0.0                   # this step's: host CPU ms in experts, routed pairs
        self.pairs = self.pcie_bytes = self.fetch_bytes = self.fetches = 0   # served, bytes, peer fetches
        self.l_copy, self.l_expert, self.l_dense = cost.launch_copy, cost.launch_expert, cost.launch_dense
        self.blocking = memory == "pageable" and cost.pageable_blocks_host
        self.dense_ms, self.dense_of, self.extra_of, self.expert_base = 0.0, None, None, 0.0
        self.dense_gpu, self.gpu_of = 0.0, None   # the dense op's GPU work alone (Engine's)
        self.route_wait = 0.0                     # how far the real model's router read waits on copies
        self.copy_price = partial(cost.copy_ms, memory=memory)   # nbytes -> ms (a real model's: its pool's)
        self.cpu_price = cost.cpu_path_ms         # a CPU expert (the executor's own, where measured)
        self.grouped, self.group_of, self.dc = False, {}, None
        if isinstance(dense, (int, float)):
            self.dense_ms = dense
        else:
            dc, holds = dense
            self.dc = dc
            n = planner.trace.num_steps
            self.dense_of, self.extra_of = dc.per_step() if holds else ([0.0] * n, [0.0] * n)
            self.gpu_of = dc.gpu_per_step() if holds else None
            self.route_wait = dc.route_wait
            self.expert_base, self.l_expert = dc.expert_host_ms(self.l_expert)
            self.l_copy = dc.load_host_ms(self.l_copy)
            tail = cost.pageable_tail if self.blocking else 0.0
            self.copy_price = dc.copy_pricer(cost, memory, self.l_copy + tail)
            self.cpu_price = dc.cpu_pricer(cost)
            self.grouped = dc.grouped
            if self.grouped:
                self.expert_base = 0.0
        self.gpu_ms = cost.gpu_expert.tolist()
        self.copy_of: dict[int, float] = {}
        self.cpu_of: dict[int, float] = {}
        self.small_of: dict[tuple, float] = {}
        p = planner
        self.disk_tier = p.host_cache is not None
        self.read_ms = cost.read_ms(p.stored_bytes, p.disk.io, p.disk.queue_depth) if self.disk_tier else 0.0

    def start_step(self, s: int, t0: float) -> None:
        """The step starts on this GPU at ``t0``: the per-step extra (measured styles)."""
        self.host = self.now = t0
        self.act_ready = None
        self.busy_c0, self.busy_x0 = self.busy_c, self.busy_x
        self.cpu_ms = 0.0
        self.pairs = self.pcie_bytes = self.fetch_bytes = self.fetches = 0
        if self.dense_of is None:
            return
        self.dense_ms, extra = self.dense_of[s], self.extra_of[s]
        self.dense_gpu = self.dense_ms if self.gpu_of is None else self.gpu_of[s]
        if extra > 0:                       # embedding, LM head, dense layers
            host = self.host + self.l_dense
            now = self.now
            t = self.comp_free if self.comp_free > now else now
            if host > t:
                t = t + (host - t)
            self.comp_free = end = t + extra
            self.busy_c += extra
            self.host = host
            if self.tl is not None:
                self.tl.append(("compute", t, end, DENSE, "step", False, self.g))

    def dense(self, route_ms: float) -> None:
        """The layer's dense work; then the host waits for it and reads the routing."""
        host = self.host + self.l_dense
        now = self.now
        t = self.comp_free if self.comp_free > now else now
        if host > t:
            t = t + (host - t)
        g = self.dense_gpu if self.dense_of is not None else self.dense_ms
        end = t + g
        if g < self.dense_ms:           # its issue ends no sooner than a lone layer's would
            e = host + self.dense_ms
            if e > end:
                end = e
        self.comp_free = end
        self.busy_c += g
        if self.tl is not None:
            self.tl.append(("compute", t, end, DENSE, None, False, self.g))
        if host > now:
            now = now + (host - now)
        if end > now:
            now = end
        w = self.route_wait
        if w and self.copy_free > now:                           # the real model's router read
            now = self.copy_free if w == 1.0 else now + w * (self.copy_free - now)   # waits (Engine)
        self.now = now
        self.host = now + route_ms + self.expert_base

    def _wait_host(self, e: float | None) -> None:
        """The host waits until ``e`` (a disk read it needs)."""
        if e is not None and e > self.host:
            now = self.now
            if self.host > now:
                now = now + (self.host - now)
            if e > now:
                now = e
            self.now = self.host = now

    def expert_ops(self, ops: list[tuple], sh: Shared, fetch) -> None:
        """The layer's operations after its dense work. ``fetch(gpu, op, t, dur)``: ``None``,
        or where a peer can deliver the load sooner than the host link (peer fetch)."""
        cost, tl, g = self.cost, self.tl, self.g
        gpu_ms = self.gpu_ms
        n_table = len(gpu_ms)
        load_end, read_end = self.load_end, self.read_end
        for op in ops:
            kind = op[0]
            if kind == COMPUTE:
                self.host += self.l_expert
                tok = op[3]
                dur = gpu_ms[tok] if tok < n_table else cost.expert_ms(tok)
                t = self.comp_free if self.comp_free > self.now else self.now
                if self.host > t:
                    t = t + (self.host - t)
                dep = load_end.get(op[1])
                if dep is not None and dep > t:
                    t = dep
                self.comp_free = end = t + dur
                self.busy_c += dur
                self.pairs += tok
                read_end[op[1]] = end
                if tl is not None:
                    tl.append(("compute", t, end, COMPUTE, op[2], False, g))
            elif kind == LOAD:
                self._load(op, sh, fetch)
            elif kind == GROUP:
                hg = self.group_of.get(op[4])
                if hg is None:
                    hg = self.group_of[op[4]] = self.dc.group_ms(op[4])
                issue = self.host
                self.host += hg[0]
                dur = hg[1]
                t = self.comp_free if self.comp_free > self.now else self.now
                ready = issue if hg[2] else self.host   # overlapped: from the first launch (engine.py)
                if ready > t:
                    t = t + (ready - t)
                for sl in op[1]:
                    dep = load_end.get(sl)
                    if dep is not None and dep > t:
                        t = dep
                end = t + dur
                if hg[2] and self.host > end:
                    end = self.host
                self.comp_free = end
                self.busy_c += dur
                self.pairs += op[3]
                for sl in op[1]:
                    read_end[sl] = end
                if tl is not None:
                    tl.append(("compute", t, end, COMPUTE, f"group of {op[4]}", False, g))
            elif kind == CPU:           # activations down, FFN on the host CPU, result up
                now = self.now
                if self.host > now:
                    now = now + (self.host - now)
                if self.disk_tier:
                    e = sh.disk_end.get(op[1])
                    if e is not None and e > now:
                        now = e
                if self.act_ready is not None and self.act_ready > now:
                    now = self.act_ready        # expert-parallel: the token's activation is here
                if sh.host and sh.cpu_free > now:
                    now = sh.cpu_free           # one host CPU for every GPU
                tok = op[2]
                dur = self.cpu_of.get(tok)
                if dur is None:
                    dur = self.cpu_of[tok] = self.cpu_price(tok)
                start = now
                now = now + dur
                self.cpu_ms += dur
                self.pairs += tok
                self.now = self.host = now
                if sh.host:
                    sh.cpu_free = now
                if tl is not None:
                    tl.append(("cpu", start, now, CPU, op[1], False, g))
            elif kind == READ:          # a disk read into a host slot, on the lane free first
                self.host += self.l_copy
                lanes = sh.lanes
                i = lanes.index(min(lanes))
                t = lanes[i] if lanes[i] > self.now else self.now
                if self.host > t:
                    t = t + (self.host - t)
                dep = sh.hread_end.get(op[1])
                if dep is not None and dep > t:
                    t = dep
                lanes[i] = end = t + self.read_ms
                sh.disk_end[op[2]] = end
                sh.hslot_of[op[2]] = op[1]
                if tl is not None:
                    tl.append(("disk", t, end, READ, op[2], op[4], g))
            else:                       # DEQUANT (a slot) or DIRECT (from mapped host memory)
                self._small(op, sh)

    def _load(self, op: tuple, sh: Shared, fetch) -> None:
        if self.disk_tier:              # the host waits for the reads of what it copies
            for k in op[2]:
                self._wait_host(sh.disk_end.get(k))
        self.host += self.l_copy
        nbytes = op[3]
        dur = self.copy_of.get(nbytes)
        if dur is None:
            dur = self.copy_of[nbytes] = self.copy_price(nbytes)
        t = self.copy_free if self.copy_free > self.now else self.now
        if self.host > t:
            t = t + (self.host - t)
        for sl in op[1]:
            dep = self.read_end.get(sl)
            if dep is not None and dep > t:
                t = dep
        peer = fetch(self, op, t, dur) if fetch is not None else None
        if peer is not None:            # over NVLink from a peer's cache
            src, t, end = peer
            dur = end - t
            self.fetches += len(op[2])
            self.fetch_bytes += nbytes
        else:
            t = self.host_link_start(t, sh)
            end = t + dur
            if sh.pcie:
                sh.link_free = end
            if sh.host and self.memory == "pageable":   # the host stages it, then the driver's tail
                sh.stage_free = end + self.cost.pageable_tail if self.blocking else end
            self.pcie_bytes += nbytes
        self.copy_free = end
        self.busy_x += dur
        for sl in op[1]:
            self.load_end[sl] = end
        if self.disk_tier:
            for k in op[2]:
                sh.hread_end[sh.hslot_of[k]] = end
        if self.tl is not None:
            self.tl.append(("copy", t, end, LOAD, op[2], op[4], self.g))
            if peer is not None:
                self.tl.append(("peer", t, end, A2A, f"GPU {peer[0]} -> {self.g}: {len(op[2])} expert(s)", op[4], None))
            elif self.memory == "pageable":
                self.tl.append(("host", t, end, STAGE, f"staging for GPU {self.g}", op[4], None))
        if self.blocking and peer is None:  # the host waits for the copy, then the driver
            now = self.now
            if self.host > now:
                now = now + (self.host - now)
            if end > now:
                now = end
            self.now = now
            self.host = now + self.cost.pageable_tail

    def host_link_start(self, t: float, sh: Shared) -> float:
        """When a copy from host memory ready at ``t`` starts: after the shared host link
        (``shared_pcie``) and, from pageable memory, the host's staging of the copy before it
        (``shared_host``: the host stages one pageable copy at a time)."""
        if sh.pcie and sh.link_free > t:
            t = sh.link_free
        if sh.host and self.memory == "pageable" and sh.stage_free > t:
            t = sh.stage_free
        return t

    def _small(self, op: tuple, sh: Shared) -> None:
        """A dequantise of a slot, or an expert computed straight from mapped host memory."""
        kind, cost = op[0], self.cost
        if kind == DIRECT:
            if self.disk_tier:
                self._wait_host(sh.disk_end.get(op[1]))
            self.host += self.l_expert
            key = (DIRECT, op[2])
            dur = self.small_of.get(key)
            if dur is None:
                dur = self.small_of[key] = cost.direct_ms(op[2], op[3])
        else:
            self.host += self.l_dense
            key = (DEQUANT, op[3])
            dur = self.small_of.get(key)
            if dur is None:
                dur = self.small_of[key] = cost.dequant_ms(op[3], self.p.quant)
        t = self.comp_free if self.comp_free > self.now else self.now
        if self.host > t:
            t = t + (self.host - t)
        if kind == DEQUANT:
            dep = self.load_end.get(op[1])
            if dep is not None and dep > t:
                t = dep
        else:
            if self.copy_free > t:      # a direct read shares PCIe with the copies
                t = self.copy_free
            if sh.pcie and sh.link_free > t:
                t = sh.link_free
        self.comp_free = end = t + dur
        self.busy_c += dur
        if kind == DEQUANT:
            self.read_end[op[1]] = end
        else:
            self.copy_free = end
            self.pairs += op[2]
            self.pcie_bytes += op[3]
            if sh.pcie:
                sh.link_free = end
            if self.disk_tier:
                sh.hread_end[sh.hslot_of[op[1]]] = end
        if self.tl is not None:
            self.tl.append(("compute", t, end, kind, op[2] if kind == DEQUANT else op[1], False, self.g))

    def step_counts(self) -> dict:
        """This step's busy ms (as the engine's differences), routed pairs served, host CPU ms,
        bytes over the host link and from peers, peer fetches."""
        return {"compute_ms": self.busy_c - self.busy_c0, "copy_ms": self.busy_x - self.busy_x0,
                "pairs": self.pairs, "cpu_ms": self.cpu_ms, "pcie_bytes": self.pcie_bytes,
                "peer_fetch_bytes": self.fetch_bytes, "peer_fetches": self.fetches}

    def end_step(self, sync_ms: float) -> float:
        """When this GPU's synchronise returns."""
        t = self.now
        if self.host > t:
            t = t + (self.host - t)
        if self.comp_free > t:
            t = self.comp_free
        if self.copy_free > t:
            t = self.copy_free
        return t + sync_ms


def peer_fetcher(gpus: dict[int, Gpu], sh: Shared, bw: float, lat: float):
    """Replicate mode's peer fetch: a load whose experts all sit in one peer's cache (as the
    peer's planner has it now, its copy timed) comes over NVLink from the peer that delivers it
    first, if that ends before the copy from host memory would (ties: from the host). The
    source's slots then wait for the fetch before they are overwritten."""
    def fetch(x: Gpu, op: tuple, t: float, dur: float):
        host_end = x.host_link_start(t, sh) + dur
        keys, E = op[2], x.p.E
        best = None
        pdur = lat + op[3] / bw
        for h, y in gpus.items():
            if h == x.g:
                continue
            caches = y.p.cache_of_layer
            slots = [caches[k // E].slot_of.get(k) for k in keys]
            if None in slots:
                continue
            start = t if t > sh.peer_out[h] else sh.peer_out[h]
            for sl in slots:
                dep = y.load_end.get(sl)
                if dep is not None and dep > start:
                    start = dep
            end = start + pdur
            if end < host_end and (best is None or end < best[2]):
                best = (h, start, end, slots)
        if best is None:
            return None
        h, start, end, slots = best
        sh.peer_out[h] = end
        y = gpus[h]
        for sl in slots:
            if y.read_end.get(sl, -1.0) < end:
                y.read_end[sl] = end
        return h, start, end
    return fetch


def dense_costs(sc: Scenario, cost: CostModel, trace: Trace, shares: list[Trace]) -> list:
    """Per GPU: the twin's constant, or ``(DenseCost, holds tokens)`` priced on the tokens
    the GPU holds (a GPU that holds none keeps the style's host terms and no dense work)."""
    if sc.engine.style == "twin":
        return [sc.dense_ms] * len(shares)
    from .engine_costs import DenseCost

    whole = None
    out = []
    for tr in shares:
        if tr.max_step_tokens:
            out.append((DenseCost.for_trace(sc, cost.profile, tr, source=f"scenario {sc.name}"), True))
        else:
            whole = whole or DenseCost.for_trace(sc, cost.profile, trace, source=f"scenario {sc.name}")
            out.append((whole, False))
    return out


def simulate_gpus(sc: Scenario, policy: PolicySpec, trace: Trace, cost: CostModel, seed: int,
                  timeline: list | None = None) -> pd.DataFrame:
    """One policy over one trace on ``sc.gpus.count`` GPUs: per-step records, as
    :func:`simulator.runner.simulate`, with per-GPU and peer-link columns. ``timeline``
    receives ``(stream, start, end, opcode, label, prefetch, gpu)`` records (``gpu`` None on
    the shared tracks: ``peer``, ``host``, ``disk``; docs/multigpu.md)."""
    g_spec = sc.gpus
    n, ep = g_spec.count, g_spec.mode == "expert-parallel"
    owner = placement(sc, trace) if ep else None
    planners = build_planners(sc, policy, trace, cost, seed, owner)
    live = [g for g in range(n) if planners[g] is not None]
    shares = [trace] * n if n == 1 else [sub_trace(trace, g, n) for g in range(n)]
    dense = dense_costs(sc, cost, trace, shares)
    disk = planners[live[0]].disk
    sh = Shared(n, g_spec.shared_pcie, g_spec.shared_host, disk.queue_depth)
    sh.hslot_of.update(planners[live[0]].host_preloaded)
    gpus = {g: Gpu(g, planners[g], cost, policy.memory, dense[g], timeline) for g in live}
    bw, peer_lat = peer_terms(sc, cost)
    fetch = peer_fetcher(gpus, sh, bw, peer_lat) if g_spec.peer_fetch and n > 1 else None
    act_bytes = cost.activation_bytes_per_token
    route_ms = cost.copy_ms(ROUTE_ID_BYTES * trace.max_step_tokens * sc.model.top_k, "pageable", "d2h")
    sync_ms = cost.sync
    # with one host CPU (one host link) for every GPU, each planner's queue model (miss:
    # cheapest) is told per layer when the CPU (the link) is free of the other GPUs' work, timed
    # or planned (its times run from the moment the layer's routing reached its host: the
    # GPU's clock then)
    cheap_shared = n > 1 and (sh.host or sh.pcie) and any(planners[g].queue is not None for g in live)
    now = 0.0
    rows = []
    for s in range(trace.num_steps):
        routing = trace.step(s)
        decs: dict[int, list[Decisions]] = {g: [] for g in live}
        plans = {g: layer_plans(planners[g], s, decs[g]) for g in live}
        t0 = now
        for g in live:
            gpus[g].start_step(s, t0)
        a2a_bytes, peer_ms = 0, 0.0
        if ep and n > 1:
            busiest, moved = all_to_all(routing, owner, n, act_bytes)
        for l in range(trace.num_layers):
            layer = {}
            if ep:
                for g in live:              # the layer's dense work, then the host reads the routing
                    gpus[g].dense(route_ms)
            cpu_busy, link_busy = sh.cpu_free, sh.link_free   # the shared CPU and link, as timed so far
            for g in live:
                if not ep:                  # replicate: each GPU's layer is timed as it is planned
                    gpus[g].dense(route_ms)
                q = planners[g].queue if cheap_shared else None
                if q is not None:           # a cost-aware miss sees the others' use of what they share
                    now_g = gpus[g].now
                    if sh.host:
                        q.cpu_ready = max(0.0, max(cpu_busy, sh.cpu_free) - now_g)
                    if sh.pcie:
                        q.link_ready = max(0.0, max(link_busy, sh.link_free) - now_g)
                ops = next(plans[g])
                if q is not None and ep:    # planned, not yet timed: the next planner waits for them
                    if sh.host and q.cpu > 0:
                        cpu_busy = max(cpu_busy, now_g + q.host + q.cpu)
                    if sh.pcie and q.copy > 0:
                        link_busy = max(link_busy, now_g + q.copy)
                layer[g] = group_layer(ops) if gpus[g].grouped else ops
                assert layer[g][0][0] == DENSE
                if not ep:
                    gpus[g].expert_ops(layer[g][1:], sh, fetch)
            if not ep:
                continue
            if n > 1:                       # dispatch: when every GPU has its routing
                a2a = peer_lat + float(busiest[l]) / bw
                start = max(gpus[g].host for g in live)
                for g in live:
                    gpus[g].comp_free = gpus[g].act_ready = start + a2a
                a2a_bytes += 2 * int(moved[l])
                peer_ms += 2 * a2a
                if timeline is not None:
                    timeline.append(("peer", start, start + a2a, A2A, f"dispatch L{l}", False, None))
            for g in live:
                gpus[g].expert_ops(layer[g][1:], sh, None)
            if n > 1:                       # combine: when every GPU's experts are done
                a2a = peer_lat + float(busiest[l]) / bw
                start = max(max(gpus[g].comp_free, gpus[g].host) for g in live)
                for g in live:
                    gpus[g].comp_free = start + a2a
                if timeline is not None:
                    timeline.append(("peer", start, start + a2a, A2A, f"combine L{l}", False, None))
        for g in live:                      # the last layer's prefetch observation
            for _ in plans[g]:
                raise AssertionError("a planner planned more layers than the trace has")
        now = max(gpus[g].end_step(sync_ms) for g in live)   # the step ends with the slowest GPU
        lat = now - t0
        per = {g: x.step_counts() for g, x in gpus.items()}
        total = {k: sum(c[k] for c in per.values()) for k in next(iter(per.values()))}
        step_dec = {g: decs[g][0] for g in live}
        dec = _merge(list(step_dec.values()), routing, ep and n > 1)
        row = {"step": s, "phase": int(trace.phase[s]), "start_ms": t0, "latency_ms": lat,
               "compute_ms": total["compute_ms"], "transfer_ms": total["copy_ms"],
               "stall_ms": max(0.0, lat - max(c["compute_ms"] for c in per.values())),
               "cpu_ms": total["cpu_ms"], "host_ms": max(gpus[g].host for g in live) - t0}
        row.update(dec.as_dict())
        row["peer_bytes"], row["peer_ms"] = a2a_bytes + total["peer_fetch_bytes"], peer_ms
        for k in ("pcie_bytes", "peer_fetches", "peer_fetch_bytes"):
            row[k] = total[k]
        idle = {k: 0.0 if k.endswith("_ms") else 0 for k in total}     # a GPU without tokens
        for g in range(n):
            c, d = per.get(g, idle), step_dec.get(g, Decisions())
            row[f"gpu{g}_compute_ms"], row[f"gpu{g}_copy_ms"], row[f"gpu{g}_pairs"] = c["compute_ms"], c["copy_ms"], c["pairs"]
            row[f"gpu{g}_hits"], row[f"gpu{g}_misses"], row[f"gpu{g}_bytes_h2d"] = d.hits, d.misses, d.bytes_h2d
            row[f"gpu{g}_pcie_bytes"], row[f"gpu{g}_peer_fetch_bytes"] = c["pcie_bytes"], c["peer_fetch_bytes"]
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["preloaded_experts"] = sum(len(planners[g].preloaded) for g in live)
    df.attrs["slots"] = sum(planners[g].total_slots for g in live)
    df.attrs["host_slots"] = planners[live[0]].host_slots     # one host memory
    return df


def _merge(decs: list[Decisions], routing: np.ndarray, per_step: bool) -> Decisions:
    """The step's decisions over all GPUs: counts added; in expert-parallel mode tokens,
    requests and distinct experts once (every GPU's planner saw the whole step)."""
    out = Decisions()
    for f in fields(Decisions):
        setattr(out, f.name, sum(getattr(d, f.name) for d in decs))
    if per_step and decs:
        for name in _STEP_FIELDS:
            setattr(out, name, getattr(decs[0], name))
    return out


def gpu_summary(g: pd.DataFrame, sc: Scenario) -> dict:
    """The several-GPU fields of one (policy, batch size) summary row, over its measured steps."""
    n = sc.gpus.count
    pairs = np.array([int(g[f"gpu{i}_pairs"].sum()) for i in range(n)])
    per = []
    for i in range(n):
        h, m = int(g[f"gpu{i}_hits"].sum()), int(g[f"gpu{i}_misses"].sum())
        per.append({"gpu": i, "compute_busy_ms": float(g[f"gpu{i}_compute_ms"].mean()),
                    "copy_busy_ms": float(g[f"gpu{i}_copy_ms"].mean()), "pairs": int(pairs[i]),
                    "hit_rate": h / (h + m) if h + m else 0.0, "bytes_h2d": int(g[f"gpu{i}_bytes_h2d"].sum()),
                    "bytes_pcie": int(g[f"gpu{i}_pcie_bytes"].sum()),
                    "bytes_peer_fetch": int(g[f"gpu{i}_peer_fetch_bytes"].sum())})
    return {"count": n, "mode": sc.gpus.mode, "placement": sc.gpus.placement if sc.gpus.mode == "expert-parallel" else None,
            "shared_pcie": sc.gpus.shared_pcie, "shared_host": sc.gpus.shared_host, "peer_fetch": sc.gpus.peer_fetch,
            "bytes_h2d": int(g["bytes_h2d"].sum()), "bytes_pcie": int(g["pcie_bytes"].sum()),
            "bytes_peer": int(g["peer_bytes"].sum()), "bytes_peer_fetch": int(g["peer_fetch_bytes"].sum()),
            "peer_fetches": int(g["peer_fetches"].sum()), "peer_ms": float(g["peer_ms"].mean()),
            "load_imbalance": float(pairs.max() / pairs.mean()) if pairs.sum() else 1.0, "per_gpu": per}
