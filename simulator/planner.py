"""The decision layer: what each layer-step loads, hits, evicts, prefetches and runs where.

The planner applies the scenario's policy objects to the trace and emits, per layer-step, the
list of operations the host issues, in issue order. It never looks at time. The SimPy engine
times these operations; the live GPU executor (``calibrate.live``) runs them on CUDA streams.
Both consume the same plans, so their decisions are identical by construction, and any
difference between projection and measurement is timing alone.

Operations (tuples, first item the opcode):

- ``(DENSE,)``: the layer's non-expert GPU work (attention, router) on the compute stream.
- ``(LOAD, slots, keys, nbytes, prefetch)``: one host-to-device copy filling ``slots`` with
  experts ``keys`` (several only for coalesced loads). It must wait until the last compute
  that read any of those slots has finished.
- ``(COMPUTE, slot, key, tokens)``: an expert FFN over ``tokens`` tokens, reading ``slot``;
  waits for the last load into ``slot``.
- ``(CPU, key, tokens)``: an expert FFN on the host CPU (needs the layer's activations).

Issue order within a layer: dense; computes of experts resident before the layer (hits),
then of prefetched experts (in the order their copies were issued); then each miss's load
and compute (coalesced: one load per group, then the group's
computes); CPU misses; last, the prefetch loads for the next layer (layers 1..L-1; nothing
is prefetched across a step boundary). Every operation waits
only on operations issued before it, and each stream runs in issue order, so no plan can
deadlock, whatever the cache size.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np

from .expert_cache import ExpertCache
from .models import ModelSpec
from .policies import (
    EVICTION_POLICIES, LOAD_MODES, MISS_POLICIES, PREFETCH_POLICIES, PrefetchRequest,
)
from .scenario import PolicySpec
from .traces import Trace

DENSE, LOAD, COMPUTE, CPU = 0, 1, 2, 3


@dataclass(slots=True)
class Decisions:
    """Decision counts of one step (time-independent)."""

    tokens: int = 0
    requests: int = 0          # routed (token, expert) pairs
    unique_requests: int = 0   # distinct experts per layer-step, summed over layers
    served: int = 0            # requests the load mode issued (per-item: = requests)
    hits: int = 0
    misses: int = 0
    transfers: int = 0         # experts copied host -> device (demand + prefetch)
    copies: int = 0            # copy operations (coalesced: fewer than transfers)
    bytes_h2d: int = 0
    prefetches_issued: int = 0
    prefetches_used: int = 0
    prefetches_wasted: int = 0
    cpu_computes: int = 0

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class RequestStream:
    """The run's request stream, known ahead only for policies that ask (Belady, static-hot)."""

    def __init__(self, trace: Trace, model: ModelSpec, load_mode):
        self.trace, self.model, self.load_mode = trace, model, load_mode

    @cached_property
    def keys(self) -> np.ndarray:
        E, k = self.model.num_experts, self.trace.top_k
        out = []
        for s in range(self.trace.num_steps):
            st = self.trace.step(s)
            for l in range(self.trace.num_layers):
                out.extend(l * E + e for e, _ in self.load_mode.requests(st[:, l, :].ravel().tolist(), k))
        return np.asarray(out, dtype=np.int64)


class LazyPlanContext:
    """PlanContext whose request stream is computed only if a policy reads it."""

    def __init__(self, trace, model, batch_size, seed, stream: RequestStream):
        self.trace, self.model, self.batch_size, self.seed = trace, model, batch_size, seed
        self._stream = stream

    @property
    def request_keys(self) -> np.ndarray:
        return self._stream.keys


class Planner:
    """Applies one policy configuration to one trace, step by step."""

    def __init__(self, model: ModelSpec, policy: PolicySpec, trace: Trace, seed: int = 0):
        if trace.num_layers != model.num_layers or trace.num_experts != model.num_experts or trace.top_k != model.top_k:
            raise ValueError(
                f"trace shape (layers {trace.num_layers}, experts {trace.num_experts}, top_k {trace.top_k}) "
                f"does not match model {model.name} ({model.num_layers}, {model.num_experts}, {model.top_k})")
        self.model, self.spec, self.trace = model, policy, trace
        self.E, self.L, self.k = model.num_experts, model.num_layers, model.top_k
        self.expert_bytes = model.expert_bytes
        self.load = LOAD_MODES[policy.load]()
        self.miss = MISS_POLICIES[policy.miss.kind](max_tokens=policy.miss.max_tokens)
        stream = RequestStream(trace, model, self.load)
        ctx = LazyPlanContext(trace, model, int(trace.max_step_tokens), seed, stream)
        self.caches = self._build_caches(ctx)
        self.cache_of_layer = [self.caches[0]] * self.L if len(self.caches) == 1 else self.caches
        pf = policy.prefetch
        self.prefetch = PREFETCH_POLICIES[pf.kind](budget=pf.budget, accuracy=pf.accuracy, **pf.options)
        self.prefetch.prepare(ctx)
        self.prefetch_on = pf.kind != "none"
        # experts held for a coming layer-step -> (step, layer, seq): prefetched ones (seq =
        # the copy's issue number) and predicted ones already resident (seq = -1). Neither is
        # evicted before that layer-step has been served.
        self.pending: dict[int, tuple[int, int, int]] = {}
        self._prefetch_seq = 0
        self.t = -1                                     # index of the last request served
        self.preloaded = [kv for c in self.caches for kv in c.preload(c.policy.preload())]

    def _build_caches(self, ctx) -> list[ExpertCache]:
        spec = self.spec.cache
        cls = EVICTION_POLICIES[spec.kind]
        slots = spec.slots(self.expert_bytes)
        if slots is None:  # 'none' without capacity: enough staging slots for any layer-step
            per = self.trace.max_step_tokens * self.k
            slots = per if self.spec.load == "per-item" else min(per, self.E)
        if slots < 1:
            raise ValueError(f"cache capacity {spec.capacity} holds no {self.expert_bytes}-byte expert")
        if spec.scope == "per-layer" and spec.kind != "none":
            caches = []
            for l in range(self.L):
                pol = cls(slots, staging=spec.staging)
                pol.prepare(ctx, [l])
                caches.append(ExpertCache(pol, slots, first_slot=l * slots))
            return caches
        pol = cls(slots, staging=spec.staging)
        pol.prepare(ctx, list(range(self.L)))
        return [ExpertCache(pol, slots)]

    @property
    def total_slots(self) -> int:
        return sum(c.slots for c in self.caches)

    # ------------------------------------------------------------------------------------
    def plan_step(self, s: int) -> tuple[list[list[tuple]], Decisions]:
        """Operations of every layer of step ``s`` (a list per layer) and its decision counts."""
        routing = self.trace.step(s)
        d = Decisions(tokens=len(routing))
        layers = []
        for l in range(self.L):
            cur = routing[:, l, :]
            layers.append(self._plan_layer(s, l, cur, d))
            self.prefetch.observe(s, l, cur)
        return layers, d

    def _plan_layer(self, s: int, l: int, cur: np.ndarray, d: Decisions) -> list[tuple]:
        E, eb = self.E, self.expert_bytes
        cache = self.cache_of_layer[l]
        routed = cur.ravel().tolist()
        reqs = self.load.requests(routed, self.k)
        d.requests += len(routed)
        d.unique_requests += len(set(routed))
        d.served += len(reqs)
        pending = self.pending
        hit_ops: list[tuple] = []
        prefetched_hits: list[tuple[int, tuple]] = []
        miss_ops: list[tuple] = []
        cpu_ops: list[tuple] = []
        group_slots: list[int] = []
        group_keys: list[int] = []
        group_computes: list[tuple] = []
        loaded_here: set[int] = set()
        coalesce = self.load.coalesce

        def flush():
            if group_slots:
                miss_ops.append((LOAD, tuple(group_slots), tuple(group_keys), eb * len(group_slots), False))
                d.copies += 1
                miss_ops.extend(group_computes)
                group_slots.clear(); group_keys.clear(); group_computes.clear()

        for e, tok in reqs:
            key = l * E + e
            self.t += 1
            t = self.t
            slot = cache.lookup(key, t)
            if slot is not None:
                d.hits += 1
                op = (COMPUTE, slot, key, tok)
                held = pending.pop(key, None)
                if held is not None and held[2] >= 0:   # arrives by a prefetch copy
                    d.prefetches_used += 1
                    prefetched_hits.append((held[2], op))
                elif key in loaded_here:          # loaded earlier in this layer: compute after that load
                    (group_computes if coalesce and slot in group_slots else miss_ops).append(op)
                else:
                    hit_ops.append(op)
                continue
            d.misses += 1
            if self.miss.on_cpu(e, tok):
                d.cpu_computes += 1
                cpu_ops.append((CPU, key, tok))
                continue
            # a missed key is not resident, so the held experts are all there is to protect
            slot, victim = cache.insert(key, t, pending)
            loaded_here.add(key)
            d.transfers += 1
            d.bytes_h2d += eb
            if coalesce:
                if slot in group_slots:
                    flush()
                group_slots.append(slot); group_keys.append(key)
                group_computes.append((COMPUTE, slot, key, tok))
            else:
                miss_ops.append((LOAD, (slot,), (key,), eb, False))
                d.copies += 1
                miss_ops.append((COMPUTE, slot, key, tok))
        flush()

        # prefetches meant for this layer-step that it did not use are wasted
        if pending:
            for key in [kk for kk, tgt in pending.items() if tgt[:2] == (s, l)]:
                if pending.pop(key)[2] >= 0:
                    d.prefetches_wasted += 1

        # experts already there first, then prefetched ones in the order their copies went
        prefetched_hits.sort(key=lambda x: x[0])
        ops = [(DENSE,)] + hit_ops + [op for _, op in prefetched_hits] + miss_ops + cpu_ops
        if self.prefetch_on:
            ops.extend(self._plan_prefetch(s, l, cur, d))
        return ops

    def _plan_prefetch(self, s: int, l: int, cur: np.ndarray, d: Decisions) -> list[tuple]:
        # next layer of the same forward pass: the next step's routing depends on the token
        # sampled at this step's synchronise, so no prefetch crosses a step boundary
        if l + 1 >= self.L:
            return []
        ts, tl = s, l + 1
        E, eb = self.E, self.expert_bytes
        counts: dict[int, int] = {}
        for e in self.trace.step(ts)[:, tl, :].ravel().tolist():
            counts[e] = counts.get(e, 0) + 1
        future = sorted(counts, key=lambda e: (-counts[e], e))      # most routed first
        req = PrefetchRequest(step=s, layer=l, target_step=ts, target_layer=tl, current=cur, future=future)
        cache = self.cache_of_layer[tl]
        budget = self.prefetch.budget
        in_cache = sum(1 for kk in self.pending if kk in cache)
        room = cache.evictable - 1 - in_cache
        ops: list[tuple] = []
        slots: list[int] = []
        keys: list[int] = []
        seen = set()
        issued = 0
        for e in self.prefetch.predict(req):
            if (budget is not None and issued >= budget) or room <= 0:
                break
            key = tl * E + int(e)
            if key in seen:
                continue
            seen.add(key)
            if key in cache:                      # already there: hold it for its layer
                if key not in self.pending:
                    self.pending[key] = (ts, tl, -1)
                    room -= 1
                continue
            slot, victim = cache.insert(key, self.t, self.pending)
            self.pending[key] = (ts, tl, self._prefetch_seq)
            self._prefetch_seq += 1
            issued += 1
            room -= 1
            if self.load.coalesce:
                if slot in slots:
                    ops.append((LOAD, tuple(slots), tuple(keys), eb * len(slots), True)); slots, keys = [], []
                slots.append(slot); keys.append(key)
            else:
                ops.append((LOAD, (slot,), (key,), eb, True))
        if slots:
            ops.append((LOAD, tuple(slots), tuple(keys), eb * len(slots), True))
        d.prefetches_issued += issued
        d.transfers += issued
        d.bytes_h2d += issued * eb
        d.copies += len(ops)
        return ops
