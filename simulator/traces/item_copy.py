"""The ``item_copy`` generator: batch items that copy part of their experts from earlier items.

The locality model of the seed's deduplication study (seed 004: 128 experts, top-k 2/4/8/16,
locality 0.1/0.3/0.5/0.7, 5 seeds per point, 560 experiments). Within one layer-step, in batch
order:

- the first item chooses ``top_k`` distinct experts uniformly;
- every later item draws ``u ~ U[0, 1)`` and re-uses ``r = floor(top_k * locality * u)``
  experts, a uniform ``r``-subset of the distinct experts the earlier items of the same
  layer-step chose; its other ``top_k - r`` experts are a uniform subset of the experts it has
  not re-used (so they may still repeat an earlier item's, by chance).

So the expected share re-used per item is ``locality / 2`` (minus the floor), and the locality
is a share of each later item's experts, not a probability of a shared pool. Layers and steps
are independent; a prefill step's tokens are the items of one layer-step each.
"""
from __future__ import annotations

import numpy as np

from .trace import Trace, concat_steps

_CHUNK_ELEMENTS = 1 << 22  # layer-steps x experts drawn at once (bounds the key arrays to 32 MiB)


def _top_sorted(keys: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's ``k`` largest keys, largest first."""
    top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def item_copy_block(rng: np.random.Generator, rows: int, items: int, num_experts: int, top_k: int,
                    locality: float) -> np.ndarray:
    """``(rows, items, top_k)`` expert ids: ``rows`` independent layer-steps of ``items`` items."""
    E, k = num_experts, top_k
    out = np.empty((rows, items, k), dtype=np.int32)
    slot = np.arange(k)
    chunk = max(1, _CHUNK_ELEMENTS // E)
    for lo in range(0, rows, chunk):
        n = min(chunk, rows - lo)
        seen = np.zeros((n, E), dtype=bool)
        idx = np.arange(n)[:, None]
        for i in range(items):
            reuse = (np.floor(k * locality * rng.random(n)).astype(np.int64) if i else np.zeros(n, np.int64))
            # earlier items always hold >= k distinct experts, so r <= k of them can be re-used
            old = _top_sorted(np.where(seen, rng.random((n, E)), -1.0), k)
            taken = np.zeros((n, E), dtype=bool)
            taken[idx, old] = slot[None, :] < reuse[:, None]
            new = _top_sorted(np.where(taken, -1.0, rng.random((n, E))), k)
            pick = np.concatenate([slot[None, :] < reuse[:, None], slot[None, :] < (k - reuse)[:, None]], axis=1)
            chosen = np.concatenate([old, new], axis=1)[pick].reshape(n, k)
            out[lo:lo + n, i] = chosen
            seen[idx, chosen] = True
    return out


def generate_item_copy(*, num_layers: int, num_experts: int, top_k: int, batch_size: int, steps: int,
                       seed: int, locality: float, prefill_tokens: int = 0) -> Trace:
    """A trace of ``steps`` decode steps of ``batch_size`` items (after an optional prefill step
    of ``prefill_tokens`` per sequence), each layer-step drawn by the item-copy model."""
    L, B, k = num_layers, batch_size, top_k
    rng = np.random.Generator(np.random.PCG64(seed))
    parts = []
    if prefill_tokens > 0:
        P = prefill_tokens
        block = item_copy_block(rng, L, B * P, num_experts, k, locality)          # (L, B*P, k)
        parts.append((block.transpose(1, 0, 2), np.repeat(np.arange(B, dtype=np.int32), P), 1))
    if steps:
        block = item_copy_block(rng, steps * L, B, num_experts, k, locality)      # (steps*L, B, k)
        routing = block.reshape(steps, L, B, k).transpose(0, 2, 1, 3)            # (steps, B, L, k)
        seq_ids = np.arange(B, dtype=np.int32)
        parts += [(routing[s], seq_ids, 0) for s in range(steps)]
    meta = {"generator": "item_copy", "seed": seed, "batch_size": B, "steps": steps,
            "prefill_tokens": prefill_tokens, "params": {"locality": locality}}
    return concat_steps(parts, num_experts, meta)
