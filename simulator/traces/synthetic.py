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
Version 3 (the default) groups the cells as version 2 does, but draws a row's top-k without a
random key for every expert when E > 8 k (:class:`_SamplerV3`): the same distribution, other
bits.
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
GENERATOR_VERSIONS = (1, 2, 3)
GENERATOR_VERSION = 3
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
    if version not in SAMPLERS:
        raise ValueError(f"unknown generator version {version}; known: {GENERATOR_VERSIONS}")
    return SAMPLERS[version](**kw).trace()


class _Sampler:
    """Version 2: each row's top-k by Gumbel keys over all E experts."""

    VERSION = 2

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
        self.width = row_keys(2, E, top_k)

    # ---- one group of independent cells ----------------------------------------------
    def _hot(self, layers: np.ndarray) -> np.ndarray:
        """Each cell's hot set ``(cells, pool)`` for batch locality."""
        keys = self.logw[layers] + self.rng.gumbel(size=(len(layers), self.E))
        return np.argpartition(-keys, self.pool - 1, axis=1)[:, :self.pool]

    def _pulls(self, pull, layers, prev, below, hot, ci, shape) -> None:
        """The pulls toward known experts, in the order both samplers draw them: the cell's
        previous step (temporal), the layer below through its permutation (cross-layer), the
        cell's hot set (batch locality). ``pull(experts, p)`` draws which are taken."""
        if prev is not None and self.temporal > 0:
            pull(prev, self.temporal)
        if below is not None and self.cross > 0:
            mapped = np.where(below >= 0, self.perms[layers][ci, np.maximum(below, 0)], -1)
            pull(mapped, self.cross)
        if hot is not None:
            pick = hot[np.broadcast_to(ci, shape), self.rng.integers(self.pool, size=shape)]
            pull(pick, self.locality)

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

        self._pulls(pull, layers, prev, below, hot, ci, shape)
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
        rows = max(1, CHUNK // self.width)
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
        per = max(1, CHUNK // (self.B * self.width))
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
            "generator": self.generator, "generator_version": self.VERSION, "seed": self.seed, "batch_size": B,
            "steps": S, "prefill_tokens": self.P,
            "params": {"zipf": self.zipf, "temporal": self.temporal, "batch_locality": self.locality,
                       "batch_pool": self.pool, "cross_layer": self.cross},
        }
        return concat_steps(parts, self.E, meta)


class _SamplerV3(_Sampler):
    """Version 3: the same distribution without E random keys per row.

    A row's top-k by Gumbel keys (``log w + Gumbel``, pulled experts first) is, in order, the
    pulled experts ranked by their own keys, then draws without replacement by weight from the
    rest (Plackett-Luce). Version 3 samples exactly that: Gumbel keys for the (at most 3k)
    pulled candidates only, then one draw per free position from the layer's popularity
    (inverse CDF), redrawn while it repeats an expert the row already has (a rejected draw
    leaves the remaining experts' weights renormalised, as drawing without replacement does).
    Each round draws once for every row still short. Rows still short after ``ROUNDS k + 8``
    rounds (heavy skew, or k close to E) get their remaining positions from Gumbel keys over the
    experts they do not have, the version 2 way. With ``E <= GUMBEL_RATIO k`` experts the
    version 2 draw is the cheaper one and version 3 uses it (its traces then equal version 2's).
    """

    VERSION = 3

    def __init__(self, **kw):
        super().__init__(**kw)
        self.width = row_keys(3, self.E, self.k)
        w = np.exp(self.logw)
        cdf = np.cumsum(w / w.sum(axis=1, keepdims=True), axis=1)
        cdf[:, -1] = 1.0
        # one sorted array for all layers: layer l's CDF shifted to [l, l + 1]
        self.cdf = (cdf + np.arange(self.L)[:, None]).ravel()

    def _draw(self, layers, n, prev, below, hot):
        if self.E <= GUMBEL_RATIO * self.k:            # few experts: E keys a row are cheaper
            return super()._draw(layers, n, prev, below, hot)
        rng, E, k = self.rng, self.E, self.k
        c = len(layers)
        ci = np.arange(c)[:, None, None]
        shape = (c, n, k)
        cands = []

        def pull(experts, p):
            m = (rng.random(shape) < p) & (experts >= 0)
            cands.append(np.where(m, experts, -1).reshape(c * n, k))

        self._pulls(pull, layers, prev, below, hot, ci, shape)
        layer = np.repeat(layers, n)                    # each row's layer
        R = c * n
        if cands:
            chosen, fill = self._pulled(np.concatenate(cands, axis=1).astype(np.int64), layer)
        else:
            chosen, fill = np.full((R, k), -1, dtype=np.int64), np.zeros(R, dtype=np.int64)
        act = np.flatnonzero(fill < k)
        for _ in range(ROUNDS * k + 8):
            if not act.size:
                break
            la = layer[act]
            e = np.searchsorted(self.cdf, rng.random(act.size) + la, side="right") - la * E
            np.minimum(e, E - 1, out=e)
            ok = ~(chosen[act] == e[:, None]).any(axis=1)
            a = act[ok]
            chosen[a, fill[a]] = e[ok]
            fill[a] += 1
            act = act[fill[act] < k]
        if act.size:
            self._fallback(chosen, fill, act, layer)
        return chosen.reshape(c, n, k).astype(self.dtype)

    def _pulled(self, cand: np.ndarray, layer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pulled experts of each row (``cand``, -1 where none, repeats allowed) ranked by
        their Gumbel keys, at most k: ``(chosen (rows, k), -1 after the first fill[row])``."""
        k = self.k
        cand.sort(axis=1)
        cand[:, 1:][cand[:, 1:] == cand[:, :-1]] = -1             # a pulled set, not a list
        valid = cand >= 0
        keys = self.logw[layer[:, None], np.maximum(cand, 0)] + self.rng.gumbel(size=cand.shape)
        keys[~valid] = -np.inf
        order = np.argsort(-keys, axis=1, kind="stable")[:, :k]
        chosen = np.take_along_axis(cand, order, axis=1)
        fill = np.minimum(valid.sum(axis=1), k)
        chosen[np.arange(k)[None, :] >= fill[:, None]] = -1          # (each knob pulls k: cand has >= k)
        return chosen, fill

    def _fallback(self, chosen, fill, act, layer):
        """Fill rows ``act``'s free positions by Gumbel keys over the experts they lack."""
        E, k = self.E, self.k
        j = np.arange(k)[None, :]
        for i in range(0, len(act), max(1, CHUNK // E)):
            a = act[i:i + max(1, CHUNK // E)]
            keys = self.logw[layer[a]] + self.rng.gumbel(size=(len(a), E))
            have = chosen[a]
            r, col = np.nonzero(have >= 0)
            keys[r, have[r, col]] = -np.inf
            top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
            top = np.take_along_axis(top, np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1, kind="stable"),
                                     axis=1)
            src = j - fill[a][:, None]
            take = src >= 0
            have[take] = np.take_along_axis(top, np.maximum(src, 0), axis=1)[take]
            chosen[a] = have
            fill[a] = k


SAMPLERS = {2: _Sampler, 3: _SamplerV3}
GUMBEL_RATIO = 8       # version 3 draws by Gumbel keys when E <= GUMBEL_RATIO k
ROUNDS = 4             # version 3: ROUNDS k + 8 rounds of draws before the Gumbel fallback


def row_keys(version: int, num_experts: int, top_k: int) -> int:
    """Random keys a sampler holds per routed row while it draws (its chunks are CHUNK keys):
    E Gumbel keys (versions 1 and 2), or the pulled candidates and the draws (version 3)."""
    if version != 3 or num_experts <= GUMBEL_RATIO * top_k:
        return num_experts
    return 4 * top_k


def expected_unique_uniform(num_experts: int, top_k: int, batch_size: int) -> float:
    """E[unique experts in one layer-step] under uniform routing."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch_size)
