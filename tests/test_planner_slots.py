"""Every compute reads the expert its slot holds at that point of the issue order: a key evicted
and loaded again within a layer is computed after its new copy, never with the tokens of its
first (prefetched) copy."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.models import ModelSpec
from simulator.planner import COMPUTE, LOAD, Planner
from simulator.scenario import PolicySpec
from simulator.traces import generate

MODEL = ModelSpec(name="t", num_layers=4, num_experts=16, top_k=2, hidden=64, ffn=128)


def check(policy: PolicySpec, b: int, seed: int) -> None:
    tr = generate(num_layers=4, num_experts=16, top_k=2, batch_size=b, steps=3, seed=seed, generator="mixed",
                  zipf=0.6, temporal=0.3)
    pl = Planner(MODEL, policy, tr, seed=1)
    holds: dict[int, int] = dict((slot, key) for key, slot in pl.preloaded)
    for s in range(tr.num_steps):
        for ops in pl.plan_step(s)[0]:
            for op in ops:
                if op[0] == LOAD:
                    holds.update(zip(op[1], op[2]))
                elif op[0] == COMPUTE:
                    assert holds.get(op[1]) == op[2], (policy.name, s, op)


def test_a_prefetched_expert_evicted_and_reloaded_in_its_layer():
    """The minimal case found by the tiers' plan property (per-item loads, an LRU of 3, oracle
    prefetch): expert 0's prefetched copy is evicted by the layer's own misses and loaded again;
    its last token must wait for the new copy."""
    check(PolicySpec(name="p", load="per-item", cache={"kind": "lru", "capacity": 3}, prefetch={"kind": "oracle"}),
          5, 1)


@settings(max_examples=60, deadline=None)
@given(load=st.sampled_from(["per-item", "dedup", "coalesced"]), kind=st.sampled_from(["lru", "fifo", "lfu", "belady"]),
       capacity=st.integers(2, 12), prefetch=st.sampled_from(["none", "oracle", "predicted", "popularity"]),
       b=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_every_compute_reads_its_experts_copy(load, kind, capacity, prefetch, b, seed):
    pf = {"kind": prefetch} if prefetch != "none" else {"kind": "none"}
    check(PolicySpec(name="p", load=load, cache={"kind": kind, "capacity": capacity}, prefetch=pf), b, seed)
