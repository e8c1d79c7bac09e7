"""Load modes: per-item (the published baseline), deduplicated, coalesced."""
from __future__ import annotations

import numpy as np

from .base import LoadMode, register_load_mode


@register_load_mode("per-item")
class PerItem(LoadMode):
    """Every token loads and runs each of its experts on its own: no sharing in the batch."""

    def requests(self, step):
        return [(keys, [1] * len(keys)) for keys in step.layer_keys()]

    def request_keys(self, step):
        return step.keys.transpose(1, 0, 2).ravel()


@register_load_mode("dedup")
class Dedup(LoadMode):
    """Each expert a layer-step needs is requested once, with all the tokens routed to it."""

    distinct = True

    def requests(self, step):
        (keys, tokens), b = step.lists(), step.bounds
        return [(keys[b[l]:b[l + 1]], tokens[b[l]:b[l + 1]]) for l in range(len(b) - 1)]

    def request_keys(self, step):
        return np.asarray(step.uniq)


@register_load_mode("coalesced")
class Coalesced(Dedup):
    """As dedup, and all of a layer's misses travel in one batched copy."""

    coalesce = True


@register_load_mode("layer")
class Layer(LoadMode):
    """Every expert of the layer is copied at each forward, routed or not, as accelerate's
    ``device_map`` offload and DeepSpeed ZeRO-Inference do: all ``num_experts`` experts are
    requested in id order, the routed ones with their tokens, the others with 0 tokens (a
    0-token compute is no work), and a layer's misses travel in one copy. With ``cache: none``
    give ``capacity: num_experts`` so the whole layer fits the staging slots."""

    coalesce = True
    distinct = True

    def requests(self, step):
        E, L = step.E, step.keys.shape[1]
        counts = np.zeros(L * E, dtype=np.int64)
        np.add.at(counts, step.uniq, step.counts)
        keys, tokens = np.arange(L * E).tolist(), counts.tolist()
        return [(keys[l * E:(l + 1) * E], tokens[l * E:(l + 1) * E]) for l in range(L)]

    def request_keys(self, step):
        return np.arange(step.keys.shape[1] * step.E, dtype=np.int64)
