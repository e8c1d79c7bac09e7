"""GPU expert-cache eviction policies: none, LRU, FIFO, LFU, static-hot, Belady."""
from __future__ import annotations

from collections import OrderedDict
from heapq import heappop, heappush
from itertools import count
from bisect import bisect_right

import numpy as np

from .base import EvictionPolicy, NoVictim, PlanContext, register_eviction


class _Stamped(EvictionPolicy):
    """Residents in recency order (LRU: last use; FIFO: insertion) in an ordered dict, oldest
    first. A held resident met at the head by a victim search is parked until its hold ends, so
    no search walks past it twice; released, it rejoins the order at its old place: a parked
    resident is older than everything still in the order, so released ones wait in a small heap
    ahead of it, by when they were parked (a resident parked later is younger than every one
    parked before it: it was behind them in the order)."""

    retains = True
    restamp_on_hit = False

    def __init__(self, capacity, **options):
        super().__init__(capacity)
        self._order: OrderedDict[int, None] = OrderedDict()   # residents, oldest first
        self.parked: dict[int, int] = {}     # held residents set aside -> parking number
        self._front: list[tuple[int, int]] = []   # released residents (parking number, key): oldest of all
        self._in_front: dict[int, int] = {}
        self._parkings = count()
        self._plain_insert = type(self).on_insert is _Stamped.on_insert
        #: LRU/FIFO: the planner's fast paths move, insert and evict in ``_order`` directly,
        #: as on_hit, on_insert and replace do
        self.plain = self._plain_insert
        if self.restamp_on_hit:
            self.on_hit = self._restamp       # no extra call per hit

    def _restamp(self, key, t):
        order = self._order
        if key in order:
            order.move_to_end(key)
        else:                                 # parked or released: it is the newest now
            self.parked.pop(key, None)
            self._in_front.pop(key, None)
            order[key] = None

    def on_hit(self, key, t):
        pass

    def on_insert(self, key, t):
        self._order[key] = None

    def on_remove(self, key):
        if key in self._order:
            del self._order[key]
        else:
            self._in_front.pop(key, None)
            self.parked.pop(key, None)

    def on_release(self, key):
        stamp = self.parked.pop(key, None)
        if stamp is not None:
            heappush(self._front, (stamp, key))
            self._in_front[key] = stamp

    def replace(self, key, t, protected):
        order = self._order
        if not self._front and order:              # the common case: the oldest is not held
            v = next(iter(order))
            if v not in protected:
                del order[v]
                if self._plain_insert:
                    order[key] = None
                else:
                    self.on_insert(key, t)
                return v
        return super().replace(key, t, protected)

    def victim(self, protected, t):
        front = self._front
        while front:
            stamp, k = front[0]
            if self._in_front.get(k) != stamp:
                heappop(front)              # stale: used again or evicted since
            elif k in protected:
                heappop(front)
                del self._in_front[k]
                self.parked[k] = stamp
            else:
                return k
        order = self._order
        held = None
        for k in order:
            if k not in protected:
                break
            (held := held or []).append(k)
        else:
            k = None
        if held:
            for h in held:
                del order[h]
                self.parked[h] = next(self._parkings)
        if k is None:
            raise NoVictim
        return k


@register_eviction("none")
class NoCache(_Stamped):
    """Keeps nothing between uses: every request is a miss. The expert cache then reuses its
    slots in turn (a ring of staging buffers) and never asks this policy for a victim."""

    retains = False


@register_eviction("lru")
class LRU(_Stamped):
    """Evict the least recently used."""

    restamp_on_hit = True


@register_eviction("fifo")
class FIFO(_Stamped):
    """Evict the oldest insertion."""


class _ParkingHeap:
    """A lazy heap of ``(priority..., key)`` entries whose held keys are parked, not skipped
    at every search (LFU, Belady)."""

    def _init_heap(self):
        self._heap: list[tuple] = []
        self.parked: dict[int, tuple] = {}

    def _valid(self, entry) -> bool:
        raise NotImplementedError

    def on_release(self, key):
        entry = self.parked.pop(key, None)
        if entry is not None and self._valid(entry):
            heappush(self._heap, entry)

    def victim(self, protected, t):
        heap = self._heap
        while heap:
            entry = heap[0]
            if not self._valid(entry):
                heappop(heap)
            elif entry[-1] in protected:
                heappop(heap)
                self.parked[entry[-1]] = entry
            else:
                return entry[-1]
        raise NoVictim


@register_eviction("lfu")
class LFU(_ParkingHeap, EvictionPolicy):
    """Evict the least frequently used since insertion; ties go to the least recently used."""

    retains = True

    def __init__(self, capacity, **options):
        super().__init__(capacity)
        self._freq: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._init_heap()

    def _valid(self, entry):
        f, last, k = entry
        return self._freq.get(k) == f and self._last.get(k) == last

    def _push(self, key):
        heappush(self._heap, (self._freq[key], self._last[key], key))

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
        self.parked.pop(key, None)


@register_eviction("static-hot")
class StaticHot(_Stamped):
    """Pin the most popular experts of the whole trace (known ahead, e.g. from profiling) and
    stream every other expert through the remaining ``staging`` slots in FIFO order."""

    retains = True

    def __init__(self, capacity, staging: int | None = None, **options):
        super().__init__(capacity)
        self.staging = staging
        self.hot: set[int] = set()

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

    def on_insert(self, key, t):
        if key not in self.hot:
            self._order[key] = None

@register_eviction("belady")
class Belady(_ParkingHeap, EvictionPolicy):
    """Evict the resident whose next request is farthest in the future (needs the whole
    request stream: the bound no online policy beats)."""

    retains = True
    NEVER = 1 << 62

    def __init__(self, capacity, **options):
        super().__init__(capacity)
        self._next: dict[int, int] = {}
        self._init_heap()

    def _valid(self, entry):
        return self._next.get(entry[1]) == -entry[0]

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
        heappush(self._heap, (-n, key))

    def on_hit(self, key, t):
        self._set(key, t)

    def on_insert(self, key, t):
        self._set(key, t)

    def on_remove(self, key):
        del self._next[key]
        self.parked.pop(key, None)
