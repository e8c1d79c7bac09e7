"""Several GPUs, simulated (docs/multigpu.md; issue 16 item 5).

Each GPU has its own expert cache (the policy's cache, of the policy's capacity, on every GPU),
its own planner, copy stream and compute stream. The decisions come from one
:class:`~simulator.planner.Planner` per GPU:

- ``expert-parallel``: every GPU plans the whole trace through a load mode that keeps only the
  experts the placement (:mod:`simulator.policies.placement`) puts on it, and a prefetch
  policy that prefetches only those. Tokens live on GPU ``i * N // T`` (contiguous shares of
  the step's ``T`` tokens: data-parallel attention); after a layer's dense work each token's
  activation goes to every other GPU holding one of its experts (dispatch), and back after the
  experts (combine): two all-to-alls over the peer link per layer.
- ``replicate``: GPU ``g`` plans its own share of the tokens (a sub-trace) and copies whatever
  expert they route to into its own cache: no peer traffic, one barrier at the step's end.

Timing is the single-GPU engine's (:mod:`simulator.engine`), written out here for ``N`` GPUs in
lockstep, layer by layer, with the same floating-point operations (so one GPU reproduces the
engine bit for bit). Expert-parallel layers add a barrier: the dispatch starts when the last
GPU has its routing, takes ``peer latency + max over GPUs of max(bytes sent, bytes received) /
peer bandwidth``, and the experts' computes wait for it; the combine starts when the last GPU's
compute stream is done and the next layer's dense work waits for it. With ``shared_pcie`` every
host copy also waits for the one host link (copies of all GPUs in issue order: GPU 0's layer
ops, then GPU 1's, ...); without it each GPU's copy stream has a link of its own.
"""
from __future__ import annotations

from dataclasses import fields

import numpy as np
import pandas as pd

from .engine import ROUTE_ID_BYTES
from .errors import InputError
from .planner import COMPUTE, DENSE, LOAD, Decisions, Planner
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


class GpuState:
    """One GPU's streams and host thread, as the engine keeps them."""

    __slots__ = ("host", "now", "comp_free", "copy_free", "load_end", "read_end", "busy_c", "busy_x", "pairs")

    def __init__(self):
        self.host = self.now = self.comp_free = self.copy_free = 0.0
        self.load_end: dict[int, float] = {}
        self.read_end: dict[int, float] = {}
        self.busy_c = self.busy_x = 0.0
        self.pairs = 0                      # routed (token, expert) pairs computed


def simulate_gpus(sc: Scenario, policy: PolicySpec, trace: Trace, cost: CostModel, seed: int,
                  timeline: list | None = None) -> pd.DataFrame:
    """One policy over one trace on ``sc.gpus.count`` GPUs: per-step records, as
    :func:`simulator.runner.simulate`, with per-GPU and peer-link columns."""
    if timeline is not None:
        raise InputError(f"scenario {sc.name}", "gpus", "a timeline of several GPUs is not built yet")
    g_spec = sc.gpus
    n, ep = g_spec.count, g_spec.mode == "expert-parallel"
    owner = placement(sc, trace) if ep else None
    planners = build_planners(sc, policy, trace, cost, seed, owner)
    live = [g for g in range(n) if planners[g] is not None]
    bw, peer_lat = peer_terms(sc, cost)
    act_bytes = cost.activation_bytes_per_token
    l_copy, l_expert, l_dense, sync_ms = cost.launch_copy, cost.launch_expert, cost.launch_dense, cost.sync
    dense_ms = sc.dense_ms
    route_ms = cost.copy_ms(ROUTE_ID_BYTES * trace.max_step_tokens * sc.model.top_k, "pageable", "d2h")
    gpu_ms = cost.gpu_expert.tolist()
    n_table = len(gpu_ms)
    copy_of: dict[int, float] = {}
    shared = g_spec.shared_pcie and n > 1
    link_free = 0.0
    st = [GpuState() for _ in range(n)]
    now = 0.0
    rows = []
    for s in range(trace.num_steps):
        routing = trace.step(s)
        plans = {g: planners[g].plan_step(s) for g in live}
        t0 = now
        for g in live:
            x = st[g]
            x.host = x.now = t0
        before = [(x.busy_c, x.busy_x, x.pairs) for x in st]
        peer_bytes, peer_ms = 0, 0.0
        if ep and n > 1:
            busiest, moved = all_to_all(routing, owner, n, act_bytes)
        for l in range(trace.num_layers):
            for g in live:                      # the layer's dense work, then the host reads the routing
                x = st[g]
                assert plans[g][0][l][0][0] == DENSE
                x.host += l_dense
                t = x.comp_free if x.comp_free > x.now else x.now
                if x.host > t:
                    t = t + (x.host - t)
                x.comp_free = end = t + dense_ms
                x.busy_c += dense_ms
                if x.host > x.now:
                    x.now = x.now + (x.host - x.now)
                if end > x.now:
                    x.now = end
                x.host = x.now + route_ms
            if ep and n > 1:                    # dispatch: when every GPU has its routing
                a2a = peer_lat + float(busiest[l]) / bw
                start = max(st[g].host for g in live)
                for g in live:
                    st[g].comp_free = start + a2a
                peer_bytes += 2 * int(moved[l])
                peer_ms += 2 * a2a
            for g in live:
                x = st[g]
                load_end, read_end = x.load_end, x.read_end
                for op in plans[g][0][l][1:]:
                    if op[0] == COMPUTE:
                        x.host += l_expert
                        tok = op[3]
                        dur = gpu_ms[tok] if tok < n_table else cost.expert_ms(tok)
                        t = x.comp_free if x.comp_free > x.now else x.now
                        if x.host > t:
                            t = t + (x.host - t)
                        dep = load_end.get(op[1])
                        if dep is not None and dep > t:
                            t = dep
                        x.comp_free = end = t + dur
                        x.busy_c += dur
                        x.pairs += tok
                        read_end[op[1]] = end
                    elif op[0] == LOAD:
                        x.host += l_copy
                        nbytes = op[3]
                        dur = copy_of.get(nbytes)
                        if dur is None:
                            dur = copy_of[nbytes] = cost.copy_ms(nbytes, "pinned")
                        t = x.copy_free if x.copy_free > x.now else x.now
                        if x.host > t:
                            t = t + (x.host - t)
                        for sl in op[1]:
                            dep = read_end.get(sl)
                            if dep is not None and dep > t:
                                t = dep
                        if shared and link_free > t:
                            t = link_free
                        x.copy_free = end = t + dur
                        if shared:
                            link_free = end
                        x.busy_x += dur
                        for sl in op[1]:
                            load_end[sl] = end
                    else:
                        raise InputError(f"scenario {sc.name}", "gpus", f"operation {op[0]} is not simulated on several GPUs")
            if ep and n > 1:                    # combine: when every GPU's experts are done
                a2a = peer_lat + float(busiest[l]) / bw
                done = max(max(st[g].comp_free, st[g].host) for g in live) + a2a
                for g in live:
                    st[g].comp_free = done
        ends = []
        for g in live:                          # synchronise; the step ends with the slowest GPU
            x = st[g]
            t = x.now
            if x.host > t:
                t = t + (x.host - t)
            if x.comp_free > t:
                t = x.comp_free
            if x.copy_free > t:
                t = x.copy_free
            ends.append(t + sync_ms)
        now = max(ends)
        lat = now - t0
        busy = [(x.busy_c - b[0], x.busy_x - b[1], x.pairs - b[2]) for x, b in zip(st, before)]
        dec = _merge([plans[g][1] for g in live], routing, ep and n > 1)
        row = {"step": s, "phase": int(trace.phase[s]), "start_ms": t0, "latency_ms": lat,
               "compute_ms": sum(b[0] for b in busy), "transfer_ms": sum(b[1] for b in busy),
               "stall_ms": max(0.0, lat - max(b[0] for b in busy)), "cpu_ms": 0.0,
               "host_ms": max(st[g].host for g in live) - t0}
        row.update(dec.as_dict())
        row["peer_bytes"], row["peer_ms"] = peer_bytes, peer_ms
        for g in range(n):
            c, x_ms, pairs = busy[g]
            row[f"gpu{g}_compute_ms"], row[f"gpu{g}_copy_ms"], row[f"gpu{g}_pairs"] = c, x_ms, pairs
            d = plans[g][1] if g in plans else Decisions()
            row[f"gpu{g}_hits"], row[f"gpu{g}_misses"], row[f"gpu{g}_bytes_h2d"] = d.hits, d.misses, d.bytes_h2d
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["preloaded_experts"] = sum(len(planners[g].preloaded) for g in live)
    df.attrs["slots"] = sum(planners[g].total_slots for g in live)
    df.attrs["host_slots"] = 0
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
                    "hit_rate": h / (h + m) if h + m else 0.0, "bytes_h2d": int(g[f"gpu{i}_bytes_h2d"].sum())})
    return {"count": n, "mode": sc.gpus.mode, "placement": sc.gpus.placement if sc.gpus.mode == "expert-parallel" else None,
            "shared_pcie": sc.gpus.shared_pcie, "bytes_pcie": int(g["bytes_h2d"].sum()),
            "bytes_peer": int(g["peer_bytes"].sum()), "peer_ms": float(g["peer_ms"].mean()),
            "load_imbalance": float(pairs.max() / pairs.mean()) if pairs.sum() else 1.0, "per_gpu": per}
