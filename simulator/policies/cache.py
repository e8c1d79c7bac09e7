"""GPU expert-cache eviction policies: none, LRU, FIFO, LFU, static-hot, Belady."""
from __future__ import annotations

import heapq
from bisect import bisect_right
from collections import OrderedDict

import numpy as np

from .base import EvictionPolicy, PlanContext, register_eviction


def _first_unprotected(order, protected) -> int:
    for k in order:
        if k not in protected:
            return k
    raise AssertionError("no unprotected resident")


class _Ordered(EvictionPolicy):
    retains = True
    move_on_hit = False

    def __init__(self, capacity, **options):
        super().__init__(capacity)
        self._order: OrderedDict[int, None] = OrderedDict()

    def on_hit(self, key, t):
        if self.move_on_hit:
            self._order.move_to_end(key)

    def on_insert(self, key, t):
        self._order[key] = None

    def on_remove(self, key):
        del self._order[key]

    def victim(self, protected, t):
        return _first_unprotected(self._order, protected)


@register_eviction("none")
class NoCache(_Ordered):
    """Keeps nothing between uses: every request is a miss. The expert cache then reuses its
    slots in turn (a ring of staging buffers) and never asks this policy for a victim."""

    retains = False


@register_eviction("lru")
class LRU(_Ordered):
    """Evict the least recently used."""

    move_on_hit = True


@register_eviction("fifo")
class FIFO(_Ordered):
    """Evict the oldest insertion."""


@register_eviction("lfu")
class LFU(EvictionPolicy):
    """Evict the least frequently used since insertion; ties go to the least recently used."""

    retains = True

    def __init__(self, capacity, **options):
        super().__init__(capacity)
        self._freq: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._heap: list[tuple[int, int, int]] = []

    def _push(self, key):
        heapq.heappush(self._heap, (self._freq[key], self._last[key], key))

    def on_hit(self, key, t):
        self._freq[key] += 1
        self._last[key] = t
        self._push(key)

    def on_insert(self, key, t):
        self._freq[key] = 1
        self._last[key] = t
        self._push(key)

    def on_remove(self, key):
        del self._freq[key]
        del self._last[key]

    def victim(self, protected, t):
        skipped = []
        try:
            while True:
                f, last, k = heapq.heappop(self._heap)
                if self._freq.get(k) != f or self._last.get(k) != last:
                    continue  # stale entry
                skipped.append((f, last, k))
                if k not in protected:
                    return k
        finally:
            for item in skipped:
                heapq.heappush(self._heap, item)


@register_eviction("static-hot")
class StaticHot(EvictionPolicy):
    """Pin the most popular experts of the whole trace (known ahead, e.g. from profiling) and
    stream every other expert through the remaining ``staging`` slots in FIFO order."""

    retains = True

    def __init__(self, capacity, staging: int | None = None, **options):
        super().__init__(capacity)
        self.staging = staging
        self.hot: set[int] = set()
        self._order: OrderedDict[int, None] = OrderedDict()

    def prepare(self, ctx: PlanContext, layers):
        staging = self.staging if self.staging is not None else max(1, self.capacity // 4)
        staging = min(max(1, staging), self.capacity)
        n_hot = self.capacity - staging
        E = ctx.model.num_experts
        keys = ctx.request_keys
        keys = keys[np.isin(keys // E, list(layers))]
        counts = np.bincount(keys, minlength=ctx.model.num_layers * E)
        order = np.lexsort((np.arange(len(counts)), -counts))  # most requested, then lowest key
        self.hot = {int(k) for k in order[:n_hot] if counts[k] > 0}

    def preload(self):
        return sorted(self.hot)

    def on_hit(self, key, t):
        pass

    def on_insert(self, key, t):
        if key not in self.hot:
            self._order[key] = None

    def on_remove(self, key):
        self._order.pop(key, None)

    def victim(self, protected, t):
        return _first_unprotected(self._order, protected)


@register_eviction("belady")
class Belady(EvictionPolicy):
    """Evict the resident whose next request is farthest in the future (needs the whole
    request stream: the bound no online policy beats)."""

    retains = True
    NEVER = 1 << 62

    def __init__(self, capacity, **options):
        super().__init__(capacity)
        self._next: dict[int, int] = {}
        self._heap: list[tuple[int, int]] = []

    def prepare(self, ctx: PlanContext, layers):
        keys = ctx.request_keys
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        bounds = np.flatnonzero(np.diff(sk)) + 1
        self._positions: dict[int, np.ndarray] = {
            int(sk[s]): order[s:e] for s, e in zip(np.r_[0, bounds], np.r_[bounds, len(sk)]) if len(sk)
        }

    def next_use(self, key, t):
        pos = self._positions.get(key)
        if pos is None:
            return self.NEVER
        i = bisect_right(pos, t)
        return int(pos[i]) if i < len(pos) else self.NEVER

    def _set(self, key, t):
        n = self.next_use(key, t)
        self._next[key] = n
        heapq.heappush(self._heap, (-n, key))

    def on_hit(self, key, t):
        self._set(key, t)

    def on_insert(self, key, t):
        self._set(key, t)

    def on_remove(self, key):
        del self._next[key]

    def victim(self, protected, t):
        skipped = []
        try:
            while True:
                negn, k = heapq.heappop(self._heap)
                if self._next.get(k) != -negn:
                    continue
                skipped.append((negn, k))
                if k not in protected:
                    return k
        finally:
            for item in skipped:
                heapq.heappush(self._heap, item)
