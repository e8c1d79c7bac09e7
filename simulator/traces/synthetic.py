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

How it is sampled (version 2): a (step, layer) cell depends only on the cell before it in time
(``temporal``) and the one below it in depth (``cross_layer``). Cells with no dependency
between them are drawn together in one set of numpy calls: all cells at once when neither knob
is on, a step's layers together with ``temporal`` alone, a layer's steps together with
``cross_layer`` alone, and the anti-diagonals (step + layer constant) with both. Version 1
(:mod:`simulator.traces.synthetic_v1`) drew the same distributions one cell at a time; the two
versions draw their random numbers in a different order, so their traces differ bit for bit.
"""
from __future__ import annotations

import numpy as np

from .item_copy import generate_item_copy
from .synthetic_v1 import generate_v1
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
GENERATOR_VERSIONS = (1, 2)
GENERATOR_VERSION = 2
_FORCE = 1e6
CHUNK = 1 << 20        # random keys drawn at once (floats): bounds the sampler's memory


def generate(
    *, num_layers: int, num_experts: int, top_k: int, batch_size: int, steps: int, seed: int,
    generator: str = "mixed", zipf: float = 0.0, temporal: float = 0.0, batch_locality: float = 0.0,
    batch_pool: int | None = None, cross_layer: float = 0.0, prefill_tokens: int = 0, locality: float = 0.0,
    version: int = GENERATOR_VERSION,
) -> Trace:
    """A trace of ``steps`` decode steps of ``batch_size`` sequences (after an optional prefill
    step of ``prefill_tokens`` per sequence)."""
    if generator == "item_copy":
        return generate_item_copy(num_layers=num_layers, num_experts=num_experts, top_k=top_k, batch_size=batch_size,
                                  steps=steps, seed=seed, locality=locality, prefill_tokens=prefill_tokens)
    kw = dict(num_layers=num_layers, num_experts=num_experts, top_k=top_k, batch_size=batch_size, steps=steps,
              seed=seed, generator=generator, zipf=zipf, temporal=temporal, batch_locality=batch_locality,
              batch_pool=batch_pool, cross_layer=cross_layer, prefill_tokens=prefill_tokens)
    if version == 1:
        return generate_v1(**kw)
    if version != 2:
        raise ValueError(f"unknown generator version {version}; known: {GENERATOR_VERSIONS}")
    return _Sampler(**kw).trace()


class _Sampler:
    def __init__(self, *, num_layers, num_experts, top_k, batch_size, steps, seed, generator, zipf, temporal,
                 batch_locality, batch_pool, cross_layer, prefill_tokens):
        self.E, self.k, self.L, self.B, self.S = num_experts, top_k, num_layers, batch_size, steps
        self.P = prefill_tokens
        self.generator, self.seed = generator, seed
        self.zipf, self.temporal, self.locality, self.cross = zipf, temporal, batch_locality, cross_layer
        E, L = self.E, self.L
        self.rng = rng = np.random.Generator(np.random.PCG64(seed))
        ranks = np.stack([rng.permutation(E) for _ in range(L)])        # popularity rank per layer
        self.logw = -zipf * np.log1p(ranks.astype(float))               # log of 1/(rank+1)^s
        self.perms = np.stack([rng.permutation(E) for _ in range(L)])   # cross-layer affinity maps
        self.pool = min(E, batch_pool or top_k)
        self.dtype = np.int16 if E <= np.iinfo(np.int16).max else np.int32

    # ---- one group of independent cells ----------------------------------------------
    def _hot(self, layers: np.ndarray) -> np.ndarray:
        """Each cell's hot set ``(cells, pool)`` for batch locality."""
        keys = self.logw[layers] + self.rng.gumbel(size=(len(layers), self.E))
        return np.argpartition(-keys, self.pool - 1, axis=1)[:, :self.pool]

    def _draw(self, layers: np.ndarray, n: int, prev: np.ndarray | None, below: np.ndarray | None,
              hot: np.ndarray | None) -> np.ndarray:
        """Routing ``(cells, n, k)`` of cells at ``layers``, given each cell's previous-step
        experts ``prev`` and previous-layer experts ``below`` (``(cells, n, k)``, or None where
        no cell of the group has them; a row of -1 marks a cell without)."""
        rng, E, k = self.rng, self.E, self.k
        c = len(layers)
        forced = None
        ci = np.arange(c)[:, None, None]
        ri = np.arange(n)[None, :, None]
        shape = (c, n, k)

        def pull(experts, p):
            nonlocal forced
            if forced is None:
                forced = np.zeros((c, n, E))
            m = (rng.random(shape) < p) & (experts >= 0)
            cc, rr = np.broadcast_to(ci, shape)[m], np.broadcast_to(ri, shape)[m]
            forced[cc, rr, experts[m]] = 1.0

        if prev is not None and self.temporal > 0:
            pull(prev, self.temporal)
        if below is not None and self.cross > 0:
            mapped = np.where(below >= 0, self.perms[layers][ci, np.maximum(below, 0)], -1)
            pull(mapped, self.cross)
        if hot is not None:
            pick = hot[np.broadcast_to(ci, shape), rng.integers(self.pool, size=shape)]
            pull(pick, self.locality)
        keys = self.logw[layers][:, None, :] + rng.gumbel(size=(c, n, E))
        if forced is not None:
            keys += forced * _FORCE
        top = np.argpartition(-keys, k - 1, axis=2)[..., :k]
        order = np.argsort(-np.take_along_axis(keys, top, axis=2), axis=2, kind="stable")
        return np.take_along_axis(top, order, axis=2).astype(self.dtype)

    # ---- the trace ---------------------------------------------------------------------
    def _prefill(self) -> np.ndarray:
        """The prefill step ``(B * P, L, k)``: layers in turn, rows in chunks."""
        n = self.B * self.P
        out = np.empty((n, self.L, self.k), dtype=self.dtype)
        rows = max(1, CHUNK // self.E)
        for l in range(self.L):
            layer = np.array([l])
            hot = self._hot(layer) if self.locality > 0 else None
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                below = out[None, r0:r1, l - 1] if l > 0 and self.cross > 0 else None
                out[r0:r1, l] = self._draw(layer, r1 - r0, None, below, hot)[0]
        return out

    def _waves(self):
        """Groups of decode cells ``(steps, layers)`` that may be drawn together, in an order
        that has every cell's dependencies drawn before it."""
        S, L = self.S, self.L
        s_all, l_all = np.divmod(np.arange(S * L), L)
        if self.temporal > 0 and self.cross > 0:
            d = s_all + l_all
            order = np.argsort(d, kind="stable")
            bounds = np.flatnonzero(np.diff(d[order])) + 1
            groups = np.split(order, bounds)
        elif self.temporal > 0:
            groups = np.split(np.arange(S * L), np.arange(L, S * L, L))
        elif self.cross > 0:
            order = np.argsort(l_all, kind="stable")
            groups = np.split(order, np.arange(S, S * L, S))
        else:
            groups = [np.arange(S * L)]
        per = max(1, CHUNK // (self.B * self.E))
        for g in groups:
            for i in range(0, len(g), per):
                part = g[i:i + per]
                yield s_all[part], l_all[part]

    def trace(self) -> Trace:
        B, L, k, S = self.B, self.L, self.k, self.S
        parts = []
        last = None                                   # (B, L, k): each sequence's latest token
        if self.P > 0:
            routing = self._prefill()
            parts.append((routing, np.repeat(np.arange(B, dtype=np.int32), self.P), 1))
            last = routing.reshape(B, self.P, L, k)[:, -1]
        out = np.empty((S, B, L, k), dtype=self.dtype)
        for ss, ls in self._waves():
            prev = below = None
            if self.temporal > 0:                     # (cells, B, k); -1 where there is none
                prev = out[np.maximum(ss - 1, 0), :, ls]
                first = ss == 0
                if first.any():
                    prev[first] = last[:, ls[first]].transpose(1, 0, 2) if last is not None else -1
            if self.cross > 0:
                below = out[ss, :, np.maximum(ls - 1, 0)]
                below[ls == 0] = -1
            hot = self._hot(ls) if self.locality > 0 else None
            out[ss, :, ls] = self._draw(ls, B, prev, below, hot)
        seq_ids = np.arange(B, dtype=np.int32)
        parts.extend((out[s], seq_ids, 0) for s in range(S))
        meta = {
            "generator": self.generator, "generator_version": 2, "seed": self.seed, "batch_size": B,
            "steps": S, "prefill_tokens": self.P,
            "params": {"zipf": self.zipf, "temporal": self.temporal, "batch_locality": self.locality,
                       "batch_pool": self.pool, "cross_layer": self.cross},
        }
        return concat_steps(parts, self.E, meta)


def expected_unique_uniform(num_experts: int, top_k: int, batch_size: int) -> float:
    """E[unique experts in one layer-step] under uniform routing."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch_size)
