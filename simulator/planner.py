"""The decision layer: what each layer-step loads, hits, evicts, prefetches and runs where.

The planner applies the scenario's policy objects to the trace and emits, per layer-step, the
list of operations the host issues, in issue order. It never looks at time. The SimPy engine
times these operations; the live GPU executor (``calibrate.executors.twin``) runs them on CUDA streams.
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
- ``(DEQUANT, slot, key, nbytes)``: a quantised expert (``nbytes`` stored bytes) copied into
  ``slot`` is dequantised there, on the compute stream, before its first compute.
- ``(DIRECT, key, tokens, nbytes)``: an expert computed on the GPU straight from mapped host
  memory (``nbytes`` read over PCIe); no slot, no copy.
- ``(READ, host_slot, key, nbytes, prefetch)``: a disk read of ``key`` into host slot
  ``host_slot`` (a disk tier, :mod:`simulator.tiers`); it waits for the last copy or direct
  read from that host slot, and a copy, CPU expert or direct read of ``key`` waits for it.

Issue order within a layer: dense; disk reads (a disk tier); computes of experts resident before the layer (hits),
then of prefetched experts (in the order their copies were issued; every token's compute of a
prefetched expert, not only the first's); then each miss's load and compute (coalesced: one
load per group, then the group's computes); CPU misses; last, the prefetch loads for the next
layer (layers 1..L-1; nothing is prefetched across a step boundary). Every operation waits
only on operations issued before it, and each stream runs in issue order, so no plan can
deadlock, whatever the cache size.

Holds: an expert prefetched (or predicted and already resident) for a coming layer-step is
held until that layer-step is served, so nothing evicts it first. A prefetch may hold every
evictable slot. If a demand miss of the target layer then finds every resident held, the
planner releases the held expert the layer needs last (one it does not request at all first)
and counts its prefetch as wasted.

The routing of many steps is looked at together (:meth:`StepRouting.steps`): one ``np.unique``
over all their layers gives each step's deduplicated requests, distinct-expert counts and
prefetch ordering. LRU and FIFO caches take their common steps in place in the two hot loops
(:meth:`Planner._serve_plain`, :meth:`Planner._plan_prefetch`), with the very decisions of the
general path (:meth:`Planner._serve_each`; tests/test_planner_paths.py).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property, lru_cache
from itertools import repeat
from operator import itemgetter

import numpy as np

from .expert_cache import ExpertCache
from .models import ModelSpec
from .policies import (
    EVICTION_POLICIES, LOAD_MODES, MISS_POLICIES, PREFETCH_POLICIES, NoVictim, PrefetchPolicy,
    PrefetchRequest,
)
from .scenario import DiskSpec, PolicySpec
from .tiers import QueueModel, stored_bytes
from .traces import Trace

DENSE, LOAD, COMPUTE, CPU = 0, 1, 2, 3
#: routed requests whose routing the planner looks at together (:meth:`StepRouting.steps`)
CHUNK_REQUESTS = 1 << 16
#: most keys and slots whose one-item tuples the planner keeps (:attr:`Planner.singles`)
SINGLES = 1 << 16
DEQUANT, DIRECT, READ = 4, 5, 6


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
    direct_computes: int = 0   # misses computed from mapped host memory
    bytes_direct: int = 0      # stored bytes those read over PCIe (once each)
    dequants: int = 0          # quantised experts dequantised on the GPU
    disk_reads: int = 0        # experts read from disk into host memory (demand + lookahead)
    disk_prefetches: int = 0   # of them, lookahead reads
    bytes_disk: int = 0

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class StepRouting:
    """One step's routing, with what the policies ask of it computed once for all layers.

    ``keys``: int64 ``(tokens, layers, top_k)`` of cache keys ``layer * E + expert``;
    ``uniq``/``counts``: the step's distinct keys (ascending: layer, then expert) and how many
    tokens chose each; ``bounds[l]:bounds[l + 1]`` is layer ``l``'s slice of them.
    :meth:`steps` makes those of many steps with one ``np.unique`` (and one ``np.lexsort``
    for the prefetch order) over all of them.
    """

    __slots__ = ("routing", "uniq", "counts", "bounds", "E", "_keys", "_lists", "_future")

    def __init__(self, routing: np.ndarray, num_experts: int, parts: tuple | None = None):
        """``parts``: ``(uniq, counts, bounds, lists, future)`` made by :meth:`steps` (lists
        None: made when asked for; future None or an array: likewise)."""
        self.routing, self.E, self._keys = routing, num_experts, None
        if parts is None:
            L = routing.shape[1]
            self.uniq, self.counts = np.unique(self.keys, return_counts=True)
            self.bounds = np.searchsorted(self.uniq, np.arange(L + 1, dtype=np.int64) * num_experts).tolist()
            self._lists = self._future = None
        else:
            self.uniq, self.counts, self.bounds, self._lists, self._future = parts

    @classmethod
    def steps(cls, trace: Trace, start: int, stop: int, num_experts: int, future: bool) -> list[StepRouting]:
        """Steps ``start..stop-1`` of ``trace``, each as its own :class:`StepRouting` would
        be (``future``: their prefetch orders too)."""
        off = trace.step_offsets
        rows = trace.experts[off[start]:off[stop]]
        n, L = stop - start, rows.shape[1]
        E, LE = num_experts, rows.shape[1] * num_experts
        tokens = np.diff(off[start:stop + 1])
        first = np.repeat(np.arange(n, dtype=np.int64) * LE, tokens)       # each row's step, as a key offset
        keys = rows.astype(np.int64) + (np.arange(L, dtype=np.int64) * E)[None, :, None]
        uniq, counts = np.unique(keys + first[:, None, None], return_counts=True)
        bounds = np.searchsorted(uniq, np.arange(n * L + 1, dtype=np.int64) * E).tolist()
        fut = uniq[np.lexsort((uniq, -counts, uniq // E))] % E if future else None
        uniq %= LE                          # each step's own keys again
        row = (off[start:stop + 1] - off[start]).tolist()
        out = []
        for i in range(n):                  # (lists are made per step, when asked for)
            b = bounds[i * L:(i + 1) * L + 1]
            lo, hi = b[0], b[-1]
            step = cls(rows[row[i]:row[i + 1]], E, (
                uniq[lo:hi], counts[lo:hi], [x - lo for x in b], None, fut[lo:hi] if fut is not None else None))
            step._keys = keys[row[i]:row[i + 1]]
            out.append(step)
        return out

    @property
    def keys(self) -> np.ndarray:
        if self._keys is None:
            L = self.routing.shape[1]
            self._keys = self.routing.astype(np.int64) + (np.arange(L, dtype=np.int64) * self.E)[None, :, None]
        return self._keys

    @property
    def unique_requests(self) -> int:
        return len(self.uniq)

    def lists(self) -> tuple[list[int], list[int]]:
        """``uniq`` and ``counts`` as lists."""
        if self._lists is None:
            self._lists = (self.uniq.tolist(), self.counts.tolist())
        return self._lists

    def layer_keys(self) -> list[list[int]]:
        """Per layer, the routed keys token-major (token 0's k keys, token 1's, ...)."""
        return self.keys.transpose(1, 0, 2).reshape(self.keys.shape[1], -1).tolist()

    def future(self, layer: int) -> list[int]:
        """Layer ``layer``'s experts (ids, not keys), most routed first, ties by id."""
        f = self._future
        if type(f) is not list:
            if f is None:
                u, c, E = self.uniq, self.counts, self.E
                f = u[np.lexsort((u, -c, u // E))] % E
            f = self._future = f.tolist()
        return f[self.bounds[layer]:self.bounds[layer + 1]]


class RequestStream:
    """The run's request stream, known ahead only for policies that ask (Belady, static-hot)."""

    def __init__(self, trace: Trace, model: ModelSpec, load_mode):
        self.trace, self.model, self.load_mode = trace, model, load_mode

    @cached_property
    def keys(self) -> np.ndarray:
        E, tr, parts, s = self.model.num_experts, self.trace, [], 0
        while s < tr.num_steps:
            if isinstance(tr, Trace):
                stop = chunk_stop(tr, s)
                steps = StepRouting.steps(tr, s, stop, E, False)
            else:                           # a trace that grows as it is planned (serving)
                stop, steps = s + 1, [StepRouting(tr.step(s), E)]
            parts += [self.load_mode.request_keys(step) for step in steps]
            s = stop
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def chunk_stop(trace: Trace, s: int) -> int:
    """The step after the last one looked at together with step ``s``: up to
    ``CHUNK_REQUESTS`` routed requests, at least step ``s``."""
    off = trace.step_offsets
    per = trace.num_layers * trace.top_k
    stop = int(np.searchsorted(off, off[s] + max(1, CHUNK_REQUESTS // per), side="right")) - 1
    return min(trace.num_steps, max(stop, s + 1))


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

    def __init__(self, model: ModelSpec, policy: PolicySpec, trace: Trace, seed: int = 0, *,
                 cost=None, dense_ms: float = 0.0, load=None):
        """``cost`` (a :class:`~simulator.profile.CostModel`) and ``dense_ms``: what the
        planner's own :class:`~simulator.tiers.QueueModel` is priced with, for a miss policy
        that decides on predicted stream times (``cheapest``); the live executor passes the
        same ones as the simulator, so both take the same decisions. ``load``: a load mode
        object in place of the policy's (several GPUs: one that keeps a GPU's own experts)."""
        if trace.num_layers != model.num_layers or trace.num_experts != model.num_experts or trace.top_k != model.top_k:
            raise ValueError(
                f"trace shape (layers {trace.num_layers}, experts {trace.num_experts}, top_k {trace.top_k}) "
                f"does not match model {model.name} ({model.num_layers}, {model.num_experts}, {model.top_k})")
        self.model, self.spec, self.trace = model, policy, trace
        self.E, self.L, self.k = model.num_experts, model.num_layers, model.top_k
        self.expert_bytes = model.expert_bytes
        self.quant = policy.expert_dtype
        self.stored_bytes = stored_bytes(model, self.quant)   # bytes of one expert below the GPU
        self.raw: set[int] | None = set() if self.quant else None   # resident, not yet dequantised
        self.load = LOAD_MODES[policy.load]() if load is None else load
        self.miss = MISS_POLICIES[policy.miss.kind](max_tokens=policy.miss.max_tokens, choices=policy.miss.choices)
        self.miss_copies = policy.miss.kind == "copy"
        self.disk = policy.disk or DiskSpec()
        self.queue: QueueModel | None = None
        if self.miss.needs_queue:
            if cost is None:
                raise ValueError(f"miss {policy.miss.kind!r} decides on predicted stream times: the planner needs the cost model")
            self.queue = QueueModel(cost, memory=policy.memory, load_bytes=self.stored_bytes, stored=self.stored_bytes,
                                    dequant=self.quant, io=self.disk.io, queue_depth=self.disk.queue_depth,
                                    dense_ms=dense_ms)
        stream = RequestStream(trace, model, self.load)
        ctx = LazyPlanContext(trace, model, int(trace.max_step_tokens), seed, stream)
        self.caches = self._build_caches(ctx)
        self.cache_of_layer = [self.caches[0]] * self.L if len(self.caches) == 1 else self.caches
        pf = policy.prefetch
        self.prefetch = PREFETCH_POLICIES[pf.kind](budget=pf.budget, accuracy=pf.accuracy, **pf.options)
        self.prefetch.prepare(ctx)
        self.prefetch_on = pf.kind != "none"
        self.observes = type(self.prefetch).observe is not PrefetchPolicy.observe
        # experts held for the next layer-step (the only one a hold is ever for: prefetches go
        # to the next layer, and its planning ends every hold) -> seq: prefetched ones (seq =
        # the copy's issue number) and predicted ones already resident (seq = -1). Neither is
        # evicted before that layer-step has been served.
        self.pending: dict[int, int] = {}
        self._prefetch_seq = 0
        self._last_prefetch = (0, 0)        # (first seq, copies) of the last prefetch call
        self.t = -1                                     # index of the last request served
        self._chunk: dict[int, StepRouting] = {}        # the routing of the steps planned next
        # every request of a cache that keeps nothing is a miss copied into the next staging
        # slot: such layers are planned in one go (no policy calls per request)
        self.preloaded = [kv for c in self.caches for kv in c.preload(c.policy.preload())]
        self.host_cache: ExpertCache | None = None
        self._host_busy: set[int] = set()     # host-resident keys the layer being planned still reads
        self.host_preloaded: list[tuple[int, int]] = []
        if policy.host is not None:
            h = policy.host
            slots = h.slots(self.stored_bytes)
            pol = EVICTION_POLICIES[h.kind](slots)
            pol.prepare(ctx, list(range(self.L)))
            self.host_cache = ExpertCache(pol, slots)
            self.host_preloaded = self.host_cache.preload(pol.preload())
        self._host_hot = frozenset(k for k, _ in self.host_preloaded)
        # every request of a cache that keeps nothing is a miss copied into the next staging
        # slot: such layers are planned in one go (no policy calls per request), unless a
        # tier is in play (quantised copies, a disk tier, a miss policy that is not a copy)
        self.staged = (self.miss_copies and not self.prefetch_on and not any(c.retains for c in self.caches)
                       and self.raw is None and self.host_cache is None and self.queue is None)
        # a layer of distinct experts, misses copied, no tier, LRU/FIFO caches: the planner
        # serves its requests with the caches' common steps done in place (_serve_plain)
        self.plain_layers = (all(c.plain for c in self.caches) and self.raw is None and self.host_cache is None
                            and self.queue is None and self.miss_copies and getattr(self.load, "distinct", False)
                            and type(self)._insert_demand is Planner._insert_demand)

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
    def host_slots(self) -> int:
        """Host expert slots of a disk tier (0: every expert in host memory)."""
        return self.host_cache.slots if self.host_cache is not None else 0

    def host_room(self) -> bool:
        """A disk tier's host memory can take one more expert without evicting one the layer
        being planned still reads."""
        return len(self._host_busy) < self.host_cache.evictable

    def _host_read(self, key: int, ops: list, d: Decisions, prefetch: bool = False) -> bool:
        """Make ``key`` resident in host memory (a disk tier): a hit, or a ``READ`` appended to
        ``ops``. True if it reads."""
        hc, busy = self.host_cache, self._host_busy
        if key in hc.slot_of:
            hc.policy.on_hit(key, self.t)
            if not prefetch and key not in self._host_hot:   # hot (static-hot) ones never leave
                busy.add(key)
            return False
        if not self.host_room():
            raise ValueError(f"host.capacity: {hc.evictable:,} evictable host expert slots cannot hold the experts "
                             f"one layer reads from disk before it uses them (more than {len(busy):,}); "
                             "give a larger capacity")
        slot = hc.insert(key, self.t, busy)[0]
        if not prefetch:                    # a lookahead read has no consumer in this layer
            busy.add(key)
        ops.append((READ, slot, key, self.stored_bytes, prefetch))
        d.disk_reads += 1
        d.bytes_disk += self.stored_bytes
        if prefetch:
            d.disk_prefetches += 1
        return True

    @property
    def total_slots(self) -> int:
        return sum(c.slots for c in self.caches)

    @cached_property
    def singles(self) -> tuple[tuple[int], ...] | None:
        """``(i,)`` for every slot and key ``i``, made once (a copy's slots and keys are such
        tuples), or None for a model with more than ``SINGLES`` keys and slots."""
        n = max(self.L * self.E, sum(c.slots for c in self.caches))
        return _singles(n) if n <= SINGLES else None

    # ------------------------------------------------------------------------------------
    def routing_of(self, s: int) -> StepRouting:
        """Step ``s``'s :class:`StepRouting`; from a :class:`~simulator.traces.Trace`, made with
        the next steps' (up to ``CHUNK_REQUESTS`` routed requests together)."""
        got = self._chunk.get(s)
        if got is None:
            tr = self.trace
            if not isinstance(tr, Trace):         # a trace that grows as it is planned (serving)
                return StepRouting(tr.step(s), self.E)
            stop = chunk_stop(tr, s)
            self._chunk = dict(zip(range(s, stop), StepRouting.steps(tr, s, stop, self.E, self.prefetch_on)))
            got = self._chunk[s]
        return got

    def plan_step(self, s: int) -> tuple[list[list[tuple]], Decisions]:
        """Operations of every layer of step ``s`` (a list per layer) and its decision counts."""
        step = self.routing_of(s)
        routing = step.routing
        d = Decisions(tokens=len(routing), requests=routing.size, unique_requests=step.unique_requests)
        layers = []
        plan_layer = self._plan_staged if self.staged else self._plan_layer
        for l, (keys, tokens) in enumerate(self.load.requests(step)):
            layers.append(plan_layer(s, l, keys, tokens, step, d))
            if self.observes:
                self.prefetch.observe(s, l, routing[:, l, :])
        return layers, d

    def _release(self, key: int) -> int:
        """End the hold on ``key``; returns its prefetch copy's number (-1: none)."""
        held = self.pending.pop(key)
        self.cache_of_layer[key // self.E].release(key)
        return held

    def _plan_layer(self, s: int, l: int, keys: list[int], tokens: list[int], step: StepRouting,
                    d: Decisions) -> list[tuple]:
        cache = self.cache_of_layer[l]
        hc = self.host_cache
        if self.queue is not None:
            self.queue.start_layer()
        if hc is not None:                  # the last layer's host holds end (parked residents return)
            for k in self._host_busy:
                hc.release(k)
            self._host_busy.clear()
        d.served += len(keys)
        serve = self._serve_plain if self.plain_layers else self._serve_each
        served = serve(cache, s, l, keys, tokens, d)
        read_ops, hit_ops, prefetched_hits, miss_ops, cpu_ops, misses, transfers, copies, used, dequants = served

        # prefetches meant for this layer-step that it did not use are wasted
        pending = self.pending
        wasted = 0
        if pending:
            for key in list(pending):            # (every hold is for this layer-step)
                if self._release(key) >= 0:
                    wasted += 1
        eb = self.stored_bytes
        d.hits += len(keys) - misses
        d.misses += misses
        d.transfers += transfers
        d.bytes_h2d += transfers * eb
        d.copies += copies
        d.prefetches_used += used
        d.prefetches_wasted += wasted
        d.dequants += dequants

        # experts already there first, then prefetched ones in the order their copies went
        ops = [(DENSE,)]
        ops += read_ops
        ops += hit_ops
        ops += prefetched_hits
        ops += miss_ops
        ops += cpu_ops
        if self.prefetch_on and l + 1 < self.L:
            ops += self._plan_prefetch(s, l, step, d)
            if hc is not None and self.spec.host.lookahead and l + self.spec.host.lookahead < self.L:
                ops += self._plan_lookahead(s, l, l + self.spec.host.lookahead, step, d)
        return ops

    def _serve_plain(self, cache: ExpertCache, s: int, l: int, keys: list[int], tokens: list[int],
                     d: Decisions) -> tuple:
        """:meth:`_serve_each` for distinct experts, copied misses, no tier and an LRU or FIFO
        cache (``self.plain_layers``): the same operations and the same calls on the cache,
        with its common steps (a hit's move to newest, a free slot, the oldest resident
        evicted when it is not held) done here rather than through the policy's methods."""
        pol = cache.policy
        parked, order, front = pol.parked, pol._order, pol._front
        popitem, move = order.popitem, order.move_to_end
        lru = pol.restamp_on_hit            # a hit moves to newest (in place)
        slot_of, free, pending = cache.slot_of, cache._free, self.pending
        get = slot_of.get
        eb = self.stored_bytes
        coalesce = self.load.coalesce
        hit_ops: list[tuple] = []
        # prefetched experts, put in the order their copies went: the holds of one layer-step
        # are numbered from one prefetch call, first..first + n - 1
        first, n = self._last_prefetch
        prefetched: list = [None] * n
        miss_ops: list[tuple] = []
        loads: list[tuple[int, int]] = []     # the misses' (slot, key), in order
        computes: list[tuple] = []          # and their computes
        used = 0
        for key, tok in zip(keys, tokens):
            slot = get(key)
            if slot is not None:
                if lru:
                    try:
                        move(key)
                    except KeyError:              # parked or released
                        pol.on_hit(key, 0)
                if pending:
                    held = pending.pop(key, None)
                    if held is not None:
                        if key in parked:
                            pol.on_release(key)
                        if held >= 0:             # arrives by a prefetch copy
                            used += 1
                            prefetched[held - first] = (COMPUTE, slot, key, tok)
                            continue
                hit_ops.append((COMPUTE, slot, key, tok))
                continue
            slot = None
            if free:                              # ExpertCache.insert's common steps, in place
                slot_of[key] = slot = free.popleft()
                order[key] = None
            elif order and not front:
                v = popitem(False)[0]
                if v in pending:                  # held: back in place, for the general search
                    order[v] = None
                    move(v, False)
                else:
                    slot_of[key] = slot = slot_of.pop(v)
                    order[key] = None
            if slot is None:
                slot = self._insert_demand(cache, key, s, l, keys, d)
            loads.append((slot, key))
            computes.append((COMPUTE, slot, key, tok))
        self.t += len(keys)
        m = len(loads)
        copies = 0
        if m:
            if not coalesce:                      # each copy, then its compute
                miss_ops = [None] * (2 * m)
                one = self.singles
                miss_ops[::2] = (zip(repeat(LOAD), [(sl,) for sl, _ in loads], [(k,) for _, k in loads], repeat(eb),
                                     repeat(False)) if one is None else
                                 [(LOAD, one[sl], one[k], eb, False) for sl, k in loads])
                miss_ops[1::2] = computes
                copies = m
            else:                                 # a group's copy, then its computes
                group: dict[int, int] = {}
                start = 0
                for i, (sl, k) in enumerate(loads):
                    if sl in group:
                        miss_ops.append(_group_load(group, eb, False))
                        miss_ops += computes[start:i]
                        group, start = {}, i
                        copies += 1
                    group[sl] = k
                miss_ops.append(_group_load(group, eb, False))
                miss_ops += computes[start:]
                copies += 1
        if used < n:
            prefetched = [op for op in prefetched if op is not None]
        return (), hit_ops, prefetched, miss_ops, (), m, m, copies, used, 0

    def _serve_each(self, cache: ExpertCache, s: int, l: int, keys: list[int], tokens: list[int],
                    d: Decisions) -> tuple:
        """A layer's requests one by one: ``(read_ops, hit_ops, prefetched_hits, miss_ops,
        cpu_ops, misses, transfers, copies, prefetches used, dequants)``."""
        eb = self.stored_bytes
        slot_of = cache.slot_of
        on_hit, on_release, parked = cache.policy.on_hit, cache.policy.on_release, cache.policy.parked
        pending = self.pending
        coalesce = self.load.coalesce
        raw, q, hc = self.raw, self.queue, self.host_cache
        tiered_miss = not self.miss_copies or hc is not None
        read_ops: list[tuple] = []          # disk reads: issued first, so that they overlap
        hit_ops: list[tuple] = []
        prefetched_hits: list[tuple[int, tuple]] = []
        arriving: dict[int, int] = {}       # key -> seq of the prefetch copy it arrives by
        miss_ops: list[tuple] = []
        cpu_ops: list[tuple] = []
        group: dict[int, int] = {}          # coalesced: the open group's slot -> key, in order
        group_computes: list[tuple] = []
        loaded_here: set[int] = set()
        misses = transfers = copies = used = dequants = 0
        t = self.t
        for key, tok in zip(keys, tokens):
            t += 1
            slot = slot_of.get(key)
            if slot is not None:
                on_hit(key, t)
                op = (COMPUTE, slot, key, tok)
                dq = None
                if raw and key in raw:                # prefetched quantised: dequantise first
                    raw.discard(key)
                    dq = (DEQUANT, slot, key, eb)
                    dequants += 1
                if q is not None:
                    q.compute(tok, dq is not None, key)
                if pending:
                    held = pending.pop(key, None)
                    if held is not None:
                        if key in parked:
                            on_release(key)
                        if held >= 0:                 # arrives by a prefetch copy
                            used += 1
                            arriving[key] = held
                            if dq is not None:
                                prefetched_hits.append((held, dq))
                            prefetched_hits.append((held, op))
                            continue
                if key in loaded_here:            # loaded earlier in this layer: compute after that load
                    (group_computes if coalesce and slot in group else miss_ops).append(op)
                elif key in arriving:                 # another token of a prefetched expert
                    prefetched_hits.append((arriving[key], op))
                else:
                    if dq is not None:
                        hit_ops.append(dq)
                    hit_ops.append(op)
                continue
            misses += 1
            if tiered_miss:
                self.t = t
                if self._route_miss(key, l, tok, read_ops, miss_ops, cpu_ops, d):
                    continue                  # served on the CPU or read directly
            self.t = t
            slot = self._insert_demand(cache, key, s, l, keys, d)
            loaded_here.add(key)
            transfers += 1
            compute = (COMPUTE, slot, key, tok)
            if raw is not None:               # dequantised on arrival, before its compute
                raw.discard(key)
                dequants += 1
                compute = (DEQUANT, slot, key, eb), compute
            if coalesce:
                if slot in group:
                    miss_ops.append(_group_load(group, eb, False))
                    copies += 1
                    miss_ops.extend(group_computes)
                    group, group_computes = {}, []
                group[slot] = key
                if raw is None:
                    group_computes.append(compute)
                else:
                    group_computes += compute
            else:
                miss_ops.append((LOAD, (slot,), (key,), eb, False))
                copies += 1
                if raw is None:
                    miss_ops.append(compute)
                else:
                    miss_ops += compute
        if group:
            miss_ops.append(_group_load(group, eb, False))
            copies += 1
            miss_ops.extend(group_computes)
        self.t = t
        prefetched_hits.sort(key=_first)         # stable: a key's tokens keep their order
        prefetched_hits = [op for _, op in prefetched_hits]
        return read_ops, hit_ops, prefetched_hits, miss_ops, cpu_ops, misses, transfers, copies, used, dequants

    def _plan_lookahead(self, s: int, l: int, tl: int, step: StepRouting, d: Decisions) -> list[tuple]:
        """Disk reads into host memory of the prefetch policy's picks for layer ``tl``."""
        req = PrefetchRequest(step=s, layer=l, target_step=s, target_layer=tl, current=step.routing[:, l, :],
                              future=step.future(tl))
        budget, base, ops, seen = self.prefetch.budget, tl * self.E, [], set()
        room = self.host_cache.evictable
        for e in self.prefetch.predict(req):
            key = base + int(e)
            if (budget is not None and len(seen) >= budget) or len(ops) >= room or not self.host_room():
                break
            if key in seen:
                continue
            seen.add(key)
            if self._host_read(key, ops, d, prefetch=True) and self.queue is not None:
                self.queue.read()
        return ops

    def _route_miss(self, key: int, l: int, tok: int, read_ops: list, miss_ops: list, cpu_ops: list,
                    d: Decisions) -> bool:
        """A miss beyond a plain copy: where the miss policy sends it, after its disk read (a
        disk tier). True if it is served on the CPU or by a direct read (the ops appended);
        False: the caller copies it."""
        hc = self.host_cache
        how = "copy"
        if not self.miss_copies:
            how = self.miss.route(key - l * self.E, tok, hc is not None and key not in hc.slot_of, self.queue)
        if hc is not None:
            self._host_read(key, read_ops, d)
        if how == "cpu":
            d.cpu_computes += 1
            cpu_ops.append((CPU, key, tok))
        elif how == "direct":
            d.direct_computes += 1
            d.bytes_direct += self.stored_bytes
            miss_ops.append((DIRECT, key, tok, self.stored_bytes))
        else:
            return False
        return True

    def _plan_staged(self, s: int, l: int, keys: list[int], tokens: list[int], step: StepRouting,
                     d: Decisions) -> list[tuple]:
        """:meth:`_plan_layer` for a cache that keeps nothing (``self.staged``): the same
        operations, built in bulk. Each request is a miss loaded into the next slot of the
        ring; coalesced loads group the requests until a slot would repeat."""
        n, eb = len(keys), self.stored_bytes
        slots = self.cache_of_layer[l].stage(n)
        self.t += n
        computes = list(zip(repeat(COMPUTE), slots, keys, tokens))
        ops: list[tuple] = [(DENSE,)]
        if self.load.coalesce:                  # ring slots are distinct within one ring length
            size = self.cache_of_layer[l].slots
            for i in range(0, n, size):
                j = min(n, i + size)
                ops.append((LOAD, tuple(slots[i:j]), tuple(keys[i:j]), eb * (j - i), False))
                ops += computes[i:j]
            copies = -(-n // size)
        else:
            one = self.singles
            ops += [None] * (2 * n)
            if one is None:
                ops[1::2] = zip(repeat(LOAD), zip(slots), zip(keys), repeat(eb), repeat(False))
            else:
                ops[1::2] = zip(repeat(LOAD), map(one.__getitem__, slots), map(one.__getitem__, keys), repeat(eb),
                                repeat(False))
            ops[2::2] = computes
            copies = n
        d.served += n
        d.misses += n
        d.transfers += n
        d.bytes_h2d += n * eb
        d.copies += copies
        return ops

    def _insert_demand(self, cache: ExpertCache, key: int, s: int, l: int, keys: list[int], d: Decisions) -> int:
        """Make a missed ``key`` resident; if every resident is held, release the held expert
        of this layer-step needed last (or not at all) and count its prefetch as wasted."""
        while True:
            try:
                return cache.insert(key, self.t, self.pending)[0]
            except NoVictim:
                order = {k: i for i, k in reversed(list(enumerate(keys)))}   # first request of each key
                held = [k for k in self.pending if k in cache]
                if not held:
                    raise
                drop = max(held, key=lambda k: (order.get(k, len(keys)), k))
                if self._release(drop) >= 0:
                    d.prefetches_wasted += 1

    def _plan_prefetch(self, s: int, l: int, step: StepRouting, d: Decisions) -> list[tuple]:
        # next layer of the same forward pass: the next step's routing depends on the token
        # sampled at this step's synchronise, so no prefetch crosses a step boundary
        ts, tl = s, l + 1
        eb = self.stored_bytes
        hc, raw, q = self.host_cache, self.raw, self.queue
        req = PrefetchRequest(s, l, ts, tl, step.routing[:, l, :], step.future(tl))
        cache = self.cache_of_layer[tl]
        slot_of, insert = cache.slot_of, cache.insert
        plain = cache.plain                 # LRU/FIFO: ExpertCache.insert's common steps done here
        if plain:
            order, front, free = cache.policy._order, cache.policy._front, cache._free
            popitem = order.popitem
        pending = self.pending
        budget = self.prefetch.budget
        cap = cache.slots if budget is None else budget     # (room runs out before the slots do)
        room = cache.evictable - (sum(1 for kk in pending if kk in slot_of) if pending else 0)
        reads: list[tuple] = []             # disk reads first, then the copies
        ops: list[tuple] = []
        coalesce = self.load.coalesce
        keys, slots = [], []                # coalesced: the copies, in order
        plain_picks = getattr(self.prefetch, "plain_picks", False)   # distinct ints: no checks
        one = self.singles
        seen = set()
        base, t, seq0 = tl * self.E, self.t, self._prefetch_seq
        seq, last = seq0, seq0 + cap
        for e in self.prefetch.predict(req):
            if seq >= last or room <= 0 or (hc is not None and not self.host_room()):
                break
            if plain_picks:
                key = base + e
            else:
                key = base + int(e)
                if key in seen:
                    continue
                seen.add(key)
            if key in slot_of:                    # already there: hold it for its layer
                if key not in pending:
                    pending[key] = -1
                    room -= 1
                continue
            if hc is not None and self._host_read(key, reads, d) and q is not None:
                q.read()
            slot = None
            if plain and free:                    # ExpertCache.insert's common steps, in place
                slot_of[key] = slot = free.popleft()
                order[key] = None
            elif plain and order and not front:
                v = popitem(False)[0]
                if v in pending:                  # held: back in place, for the general search
                    order[v] = None
                    order.move_to_end(v, False)
                else:
                    slot_of[key] = slot = slot_of.pop(v)
                    order[key] = None
            if slot is None:
                slot = insert(key, t, pending)[0]
            if raw is not None:
                raw.add(key)
            if q is not None:
                q.load(key)
            pending[key] = seq
            seq += 1
            room -= 1
            if coalesce:
                keys.append(key)
                slots.append(slot)
            elif one is None:
                ops.append((LOAD, (slot,), (key,), eb, True))
            else:
                ops.append((LOAD, one[slot], one[key], eb, True))
        issued = seq - seq0
        self._prefetch_seq = seq
        self._last_prefetch = (seq0, issued)
        if coalesce and keys:
            ops = _copies(slots, keys, eb, True, True)
        d.prefetches_issued += issued
        d.transfers += issued
        d.bytes_h2d += issued * eb
        d.copies += len(ops)
        return reads + ops if reads else ops


_first = itemgetter(0)


@lru_cache(maxsize=4)
def _singles(n: int) -> tuple[tuple[int], ...]:
    """``(0,), (1,), ... (n - 1,)``, shared by the planners of one size."""
    return tuple((i,) for i in range(n))


def _group_load(group: dict[int, int], expert_bytes: int, prefetch: bool) -> tuple:
    """The one copy of a coalesced group (slot -> key, in the order they joined)."""
    return (LOAD, tuple(group), tuple(group.values()), expert_bytes * len(group), prefetch)


def _copies(slots: list[int], keys: list[int], expert_bytes: int, prefetch: bool, coalesce: bool) -> list[tuple]:
    """The copies of ``keys`` into ``slots``, in order: one each, or (coalesced) one per group,
    a group closed where a slot would repeat in it."""
    if not coalesce:
        return list(zip(repeat(LOAD), zip(slots), zip(keys), repeat(expert_bytes), repeat(prefetch)))
    ops: list[tuple] = []
    group: dict[int, int] = {}
    for slot, key in zip(slots, keys):
        if slot in group:
            ops.append(_group_load(group, expert_bytes, prefetch))
            group = {}
        group[slot] = key
    if group:
        ops.append(_group_load(group, expert_bytes, prefetch))
    return ops
