"""Load modes: per-item (the published baseline), deduplicated, coalesced."""
from __future__ import annotations

from .base import LoadMode, register_load_mode


@register_load_mode("per-item")
class PerItem(LoadMode):
    """Every token loads and runs each of its experts on its own: no sharing in the batch."""

    def requests(self, routed, top_k):
        return [(e, 1) for e in routed]


@register_load_mode("dedup")
class Dedup(LoadMode):
    """Each expert a layer-step needs is requested once, with all the tokens routed to it."""

    def requests(self, routed, top_k):
        counts: dict[int, int] = {}
        for e in routed:
            counts[e] = counts.get(e, 0) + 1
        return sorted(counts.items())


@register_load_mode("coalesced")
class Coalesced(Dedup):
    """As dedup, and all of a layer's misses travel in one batched copy."""

    coalesce = True
