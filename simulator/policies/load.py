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


@register_load_mode("layer")
class Layer(LoadMode):
    """Every expert of the layer is copied at each forward, routed or not, as accelerate's
    ``device_map`` offload and DeepSpeed ZeRO-Inference do: all ``num_experts`` experts are
    requested in id order, the routed ones with their tokens, the others with 0 tokens (a
    0-token compute is no work), and a layer's misses travel in one copy. With ``cache: none``
    give ``capacity: num_experts`` so the whole layer fits the staging slots.

    The planner must construct it with the model's ``num_experts``."""

    coalesce = True

    def __init__(self, num_experts: int | None = None):
        if num_experts is None:
            from ..errors import InputError
            raise InputError("scenario", "policies.load",
                             "the layer load mode needs the planner to pass num_experts (not wired yet)")
        self.num_experts = num_experts

    def requests(self, routed, top_k):
        counts = dict.fromkeys(range(self.num_experts), 0)
        for e in routed:
            counts[e] += 1
        return list(counts.items())
