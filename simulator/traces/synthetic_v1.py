"""Version 1 of the synthetic sampler (simmoe 0.1): one (step, layer) cell at a time.

Kept so that a scenario with ``trace.generator_version: 1`` reproduces the traces, and so the
results, of simmoe 0.1 bit for bit. Version 2 (:mod:`simulator.traces.synthetic`) samples the
same distributions vectorised over steps and layers, and draws its random numbers in another
order.
"""
from __future__ import annotations

import numpy as np

from .trace import Trace, concat_steps, expert_dtype

_FORCE = 1e6


def generate_v1(
    *, num_layers: int, num_experts: int, top_k: int, batch_size: int, steps: int, seed: int,
    generator: str = "mixed", zipf: float = 0.0, temporal: float = 0.0, batch_locality: float = 0.0,
    batch_pool: int | None = None, cross_layer: float = 0.0, prefill_tokens: int = 0,
) -> Trace:
    """Version 1 of the sampler: one (step, layer) at a time."""
    E, k, L, B = num_experts, top_k, num_layers, batch_size
    rng = np.random.Generator(np.random.PCG64(seed))
    ranks = np.stack([rng.permutation(E) for _ in range(L)])            # popularity rank per layer
    logw = -zipf * np.log1p(ranks.astype(float))                         # log of 1/(rank+1)^s
    perms = np.stack([rng.permutation(E) for _ in range(L)])             # cross-layer affinity maps
    pool = min(E, batch_pool or k)

    def draw(layer_logw: np.ndarray, n: int, forced: np.ndarray | None) -> np.ndarray:
        keys = layer_logw[None, :] + rng.gumbel(size=(n, E))
        if forced is not None:
            keys = keys + forced * _FORCE
        top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1)

    def force(n: int, prev: np.ndarray | None, cur_prev_layer: np.ndarray | None, l: int) -> np.ndarray | None:
        forced = None
        rows = np.arange(n)[:, None]
        if temporal > 0 and prev is not None:
            forced = np.zeros((n, E))
            m = rng.random(prev.shape) < temporal
            forced[np.broadcast_to(rows, prev.shape)[m], prev[m]] = 1.0
        if cross_layer > 0 and cur_prev_layer is not None:
            forced = np.zeros((n, E)) if forced is None else forced
            mapped = perms[l][cur_prev_layer]
            m = rng.random(mapped.shape) < cross_layer
            forced[np.broadcast_to(rows, mapped.shape)[m], mapped[m]] = 1.0
        if batch_locality > 0:
            forced = np.zeros((n, E)) if forced is None else forced
            hot = np.argpartition(-(logw[l] + rng.gumbel(size=E)), pool - 1)[:pool]
            pick = hot[rng.integers(pool, size=(n, k))]
            m = rng.random((n, k)) < batch_locality
            forced[np.broadcast_to(rows, pick.shape)[m], pick[m]] = 1.0
        return forced

    def one_step(n: int, prev: np.ndarray | None) -> np.ndarray:
        out = np.empty((n, L, k), dtype=expert_dtype(E))   # int16 wrapped ids above 32,767
        for l in range(L):
            f = force(n, None if prev is None else prev[:, l], out[:, l - 1] if l > 0 else None, l)
            out[:, l] = draw(logw[l], n, f)
        return out

    parts = []
    last = None  # (B, L, k): each sequence's most recent token
    if prefill_tokens > 0:
        P = prefill_tokens
        routing = one_step(B * P, None)
        seq = np.repeat(np.arange(B, dtype=np.int32), P)
        parts.append((routing, seq, 1))
        last = routing.reshape(B, P, L, k)[:, -1]
    seq_ids = np.arange(B, dtype=np.int32)
    for _ in range(steps):
        routing = one_step(B, last)
        parts.append((routing, seq_ids, 0))
        last = routing
    meta = {
        "generator": generator, "generator_version": 1, "seed": seed, "batch_size": B, "steps": steps,
        "prefill_tokens": prefill_tokens,
        "params": {"zipf": zipf, "temporal": temporal, "batch_locality": batch_locality,
                   "batch_pool": pool, "cross_layer": cross_layer},
    }
    return concat_steps(parts, E, meta)
