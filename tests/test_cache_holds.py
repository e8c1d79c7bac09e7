"""Eviction policies pick the same victims as the obvious scan past held residents, whatever
the holds: LRU/FIFO/static-hot park held residents off their heap, LFU and Belady likewise."""
from __future__ import annotations

from hypothesis import example, given, settings, strategies as st

from simulator.policies import EVICTION_POLICIES, NoVictim

ops = st.lists(st.tuples(st.sampled_from(["use", "use", "use", "hold", "release"]), st.integers(0, 7)),
               min_size=1, max_size=200)


class Naive:
    """Residents in a list; victim = the first one the policy's order ranks lowest that is not
    held, found by scanning everything."""

    def __init__(self, kind):
        self.kind, self.res, self.freq, self.last, self.clock = kind, [], {}, {}, 0

    def rank(self, k):
        if self.kind == "lfu":
            return (self.freq[k], self.last[k])
        return self.res.index(k)

    def hit(self, k, t):
        self.freq[k] += 1
        self.last[k] = t
        if self.kind == "lru":
            self.res.remove(k)
            self.res.append(k)

    def insert(self, k, t):
        self.res.append(k)
        self.freq[k], self.last[k] = 1, t

    def victim(self, held):
        free = [k for k in self.res if k not in held]
        if not free:
            raise NoVictim
        return min(free, key=self.rank)

    def remove(self, k):
        self.res.remove(k)


@settings(max_examples=400, deadline=None)
@example("lru", 2, [("use", 0), ("use", 1), ("hold", 0), ("use", 2), ("release", 0), ("use", 3)])
@given(kind=st.sampled_from(["lru", "fifo", "lfu"]), capacity=st.integers(1, 6), seq=ops)
def test_victims_equal_the_naive_scan(kind, capacity, seq):
    pol, ref = EVICTION_POLICIES[kind](capacity), Naive(kind)
    resident, held = set(), set()
    for t, (what, k) in enumerate(seq):
        if what == "hold" and k in resident:
            held.add(k)
        elif what == "release" and k in held:
            held.discard(k)
            pol.on_release(k)
        elif what == "use":
            if k in resident:
                pol.on_hit(k, t)
                ref.hit(k, t)
                continue
            if len(resident) >= capacity:
                try:
                    expect = ref.victim(held)
                except NoVictim:
                    try:
                        pol.victim(held, t)
                    except NoVictim:
                        continue
                    raise AssertionError("policy found a victim where every resident is held")
                got = pol.victim(held, t)
                assert got == expect
                resident.discard(got)
                pol.on_remove(got)
                ref.remove(got)
            resident.add(k)
            pol.on_insert(k, t)
            ref.insert(k, t)
