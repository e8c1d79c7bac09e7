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

    def requests(self, step):
        keys, tokens, b = step.uniq.tolist(), step.counts.tolist(), step.bounds
        return [(keys[b[l]:b[l + 1]], tokens[b[l]:b[l + 1]]) for l in range(len(b) - 1)]

    def request_keys(self, step):
        return np.asarray(step.uniq)


@register_load_mode("coalesced")
class Coalesced(Dedup):
    """As dedup, and all of a layer's misses travel in one batched copy."""

    coalesce = True
