"""Pure-cache mode against an independent implementation (libcachesim)."""
from __future__ import annotations

import pytest

lcs = pytest.importorskip("libcachesim")

from simulator.models import ModelSpec  # noqa: E402
from simulator.planner import Planner, RequestStream  # noqa: E402
from simulator.scenario import PolicySpec  # noqa: E402
from simulator.traces import generate  # noqa: E402

M = ModelSpec(name="m", num_layers=6, num_experts=32, top_k=4, hidden=768, ffn=3072, dtype="fp32")
LCS = {"lru": lcs.LRU, "fifo": lcs.FIFO, "belady": lcs.Belady}


def libcachesim_hits(kind, keys, capacity):
    cache = LCS[kind](cache_size=capacity)
    nxt, nexts = {}, [0] * len(keys)
    for i in range(len(keys) - 1, -1, -1):
        nexts[i] = nxt.get(keys[i], 1 << 62)
        nxt[keys[i]] = i
    hits = 0
    for i, k in enumerate(keys):
        r = lcs.Request()
        r.obj_id, r.obj_size, r.clock_time, r.next_access_vtime = int(k), 1, i, nexts[i]
        hits += bool(cache.get(r))
    return hits


def our_hits(kind, capacity, scope, load, seed):
    tr = generate(num_layers=M.num_layers, num_experts=M.num_experts, top_k=M.top_k, batch_size=5, steps=30,
                  seed=seed, generator="mixed", zipf=1.0, temporal=0.5)
    pol = PolicySpec(name=kind, load=load, cache={"kind": kind, "capacity": capacity, "scope": scope})
    planner = Planner(M, pol, tr)
    hits = sum(planner.plan_step(s)[1].hits for s in range(tr.num_steps))
    return hits, RequestStream(tr, M, planner.load).keys


@pytest.mark.parametrize("kind", ["lru", "fifo", "belady"])
@pytest.mark.parametrize("capacity", [1, 7, 40, 150])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("load", ["dedup", "per-item"])
def test_global_cache_hits_equal_libcachesim(kind, capacity, seed, load):
    hits, stream = our_hits(kind, capacity, "global", load, seed)
    assert hits == libcachesim_hits(kind, stream.tolist(), capacity)


@pytest.mark.parametrize("kind", ["lru", "fifo", "belady"])
@pytest.mark.parametrize("capacity", [1, 5, 20])
def test_per_layer_cache_hits_equal_libcachesim(kind, capacity):
    hits, stream = our_hits(kind, capacity, "per-layer", "dedup", 3)
    expected = sum(libcachesim_hits(kind, stream[stream // M.num_experts == l].tolist(), capacity)
                   for l in range(M.num_layers))
    assert hits == expected


def test_oracle_comparison_is_not_vacuous():
    """The streams above are long enough for caching to matter at the larger capacities."""
    for kind in ("lru", "fifo", "belady"):
        hits, stream = our_hits(kind, 150, "global", "dedup", 0)
        assert 0.2 * len(stream) < hits < len(stream)
