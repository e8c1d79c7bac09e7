"""GPU expert slots and which expert each holds. Eviction choices come from an
:class:`~simulator.policies.EvictionPolicy`; this class only keeps the slot map honest."""
from __future__ import annotations

from collections import deque

from .policies import EvictionPolicy


class ExpertCache:
    """``slots`` GPU expert slots numbered from ``first_slot``.

    A policy that does not retain experts (``none``) never hits; its slots are used in turn,
    as a ring of staging buffers.
    """

    def __init__(self, policy: EvictionPolicy, slots: int, first_slot: int = 0):
        if slots < 1:
            raise ValueError("a cache needs at least one slot")
        self.policy = policy
        self.slots = slots
        self.first_slot = first_slot
        self.retains = getattr(policy, "retains", True)
        #: an LRU/FIFO policy (residents in an ordered dict, the oldest evicted unless held),
        #: whose common steps the planner's fast paths take in place
        self.plain = self.retains and getattr(policy, "plain", False)
        self.slot_of: dict[int, int] = {}
        self._free = deque(range(first_slot, first_slot + slots))
        self._ring = 0
        staging = getattr(policy, "staging", None)
        hot = len(getattr(policy, "hot", ()))
        #: slots a prefetch or a demand miss may take (static-hot pins the rest)
        self.evictable = slots - hot if hot else slots
        del staging

    def __len__(self) -> int:
        return len(self.slot_of)

    def __contains__(self, key: int) -> bool:
        return key in self.slot_of

    def lookup(self, key: int, t: int) -> int | None:
        slot = self.slot_of.get(key)
        if slot is not None:
            self.policy.on_hit(key, t)
        return slot

    def insert(self, key: int, t: int, protected) -> tuple[int, int | None]:
        """Make ``key`` resident; returns its slot and the evicted key (or None). Raises
        :class:`~simulator.policies.NoVictim` when the cache is full and every resident is in
        ``protected``."""
        if not self.retains:
            slot = self.first_slot + self._ring
            self._ring = (self._ring + 1) % self.slots
            return slot, None
        slot_of = self.slot_of
        if self._free:
            slot_of[key] = slot = self._free.popleft()
            self.policy.on_insert(key, t)
            return slot, None
        victim = self.policy.replace(key, t, protected)
        slot_of[key] = slot = slot_of.pop(victim)
        return slot, victim

    def stage(self, n: int) -> list[int]:
        """The next ``n`` slots of the ring of a cache that does not retain (``none``): the
        slots ``n`` calls of :meth:`insert` would return."""
        first, size, ring = self.first_slot, self.slots, self._ring
        self._ring = (ring + n) % size
        if ring + n <= size:
            return list(range(first + ring, first + ring + n))
        return [first + (ring + i) % size for i in range(n)]

    def release(self, key: int) -> None:
        """The hold on resident ``key`` has ended (see :meth:`EvictionPolicy.on_release`)."""
        if key in self.policy.parked:
            self.policy.on_release(key)

    def preload(self, keys: list[int]) -> list[tuple[int, int]]:
        out = []
        for k in keys:
            slot = self._free.popleft()
            self.slot_of[k] = slot
            out.append((k, slot))
        return out
