"""Seeded synthetic routing generators.

One sampler with four knobs covers every named generator; the names only choose which knobs a
scenario may turn:

- ``zipf`` (s >= 0): per-layer expert popularity ~ 1 / rank^s over a random (seeded) ranking
  of the experts; s = 0 is uniform.
- ``temporal`` (p): each of a sequence's previous-step experts at a layer is kept with
  probability p (a sequence re-uses its experts from one token to the next).
- ``batch_locality`` (p): each expert slot of a token is, with probability p, drawn from a
  per-(step, layer) hot set of ``batch_pool`` experts shared by the whole batch.
- ``cross_layer`` (p): each expert e a token chose at layer l-1 pulls expert pi_l(e) at layer l
  with probability p (pi_l a fixed random permutation: a layer-to-layer affinity).

Every token draws ``top_k`` distinct experts: those pulled by the knobs first (random order
among them when they are more than top_k), the rest by popularity without replacement (Gumbel
top-k). With all knobs at 0, each token's set is a uniform k-subset, so
E[unique experts per layer-step] = E (1 - (1 - k/E)^B).
"""
from __future__ import annotations

import numpy as np

from .item_copy import generate_item_copy
from .trace import Trace, concat_steps

GENERATORS = {
    "uniform": set(),
    "zipf": {"zipf"},
    "temporal": {"zipf", "temporal"},
    "batch_locality": {"zipf", "batch_locality", "batch_pool"},
    "cross_layer": {"zipf", "cross_layer"},
    "mixed": {"zipf", "temporal", "batch_locality", "batch_pool", "cross_layer"},
    "item_copy": {"locality"},  # simulator/traces/item_copy.py
}
_FORCE = 1e6


def generate(
    *, num_layers: int, num_experts: int, top_k: int, batch_size: int, steps: int, seed: int,
    generator: str = "mixed", zipf: float = 0.0, temporal: float = 0.0, batch_locality: float = 0.0,
    batch_pool: int | None = None, cross_layer: float = 0.0, prefill_tokens: int = 0, locality: float = 0.0,
) -> Trace:
    """A trace of ``steps`` decode steps of ``batch_size`` sequences (after an optional prefill
    step of ``prefill_tokens`` per sequence)."""
    if generator == "item_copy":
        return generate_item_copy(num_layers=num_layers, num_experts=num_experts, top_k=top_k, batch_size=batch_size,
                                  steps=steps, seed=seed, locality=locality, prefill_tokens=prefill_tokens)
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
        out = np.empty((n, L, k), dtype=np.int16)
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
        "generator": generator, "seed": seed, "batch_size": B, "steps": steps,
        "prefill_tokens": prefill_tokens,
        "params": {"zipf": zipf, "temporal": temporal, "batch_locality": batch_locality,
                   "batch_pool": pool, "cross_layer": cross_layer},
    }
    return concat_steps(parts, E, meta)


def expected_unique_uniform(num_experts: int, top_k: int, batch_size: int) -> float:
    """E[unique experts in one layer-step] under uniform routing."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch_size)
