"""Placement of experts over several GPUs (docs/multigpu.md): which GPU holds each expert of
each layer in expert-parallel mode. A placement sees the run's trace (an oracle, as static-hot
does: the popularity and co-routing counts of the very trace it is run on) and returns an
``(layers, experts)`` array of GPU ids. Every layer's experts are spread over all GPUs; the
balanced placements put at most ``ceil(E / N)`` experts of a layer on one GPU (each GPU holds
about the same bytes)."""
from __future__ import annotations

import numpy as np

from ..traces import Trace
from .base import _registry

PLACEMENT_POLICIES, register_placement = _registry("placement")


def popularity(trace: Trace) -> np.ndarray:
    """``(layers, experts)``: how many tokens routed to each expert over the whole trace."""
    L, E = trace.num_layers, trace.num_experts
    keys = trace.experts.astype(np.int64) + (np.arange(L, dtype=np.int64) * E)[None, :, None]
    return np.bincount(keys.ravel(), minlength=L * E).reshape(L, E)


def co_occurrence(trace: Trace, layer: int) -> np.ndarray:
    """``(experts, experts)``: tokens of the trace that routed to both experts at ``layer``
    (the diagonal is zero)."""
    E = trace.num_experts
    r = trace.experts[:, layer, :].astype(np.int64)
    onehot = np.zeros((len(r), E), dtype=np.int64)
    np.put_along_axis(onehot, r, 1, axis=1)
    co = onehot.T @ onehot
    np.fill_diagonal(co, 0)
    return co


class PlacementPolicy:
    """Which GPU holds each expert: :meth:`place` returns ``(layers, experts)`` GPU ids."""

    name = "?"

    def place(self, trace: Trace, num_gpus: int) -> np.ndarray:
        raise NotImplementedError


@register_placement("round-robin")
class RoundRobin(PlacementPolicy):
    """Expert ``e`` on GPU ``e mod N`` in every layer (what engines do by default)."""

    def place(self, trace, num_gpus):
        E = trace.num_experts
        return np.tile(np.arange(E) % num_gpus, (trace.num_layers, 1))


def _balanced(trace: Trace, num_gpus: int, rank, placed=None) -> np.ndarray:
    """Per layer, experts from the most routed down (ties: the lower id), each to the GPU
    with room that ``rank(l, e, g, load)`` puts first (``load``: routed tokens per GPU so far);
    ``placed(l, e, g)`` is told of each choice."""
    pop = popularity(trace)
    E = trace.num_experts
    cap = -(-E // num_gpus)
    out = np.full((trace.num_layers, E), -1, dtype=np.int64)
    for l, row in enumerate(pop):
        load = np.zeros(num_gpus, dtype=np.int64)
        room = np.full(num_gpus, cap, dtype=np.int64)
        for e in np.lexsort((np.arange(E), -row)).tolist():
            g = min((gg for gg in range(num_gpus) if room[gg] > 0), key=lambda gg: rank(l, e, gg, load))
            out[l, e] = g
            room[g] -= 1
            load[g] += row[e]
            if placed is not None:
                placed(l, e, g)
    return out


@register_placement("popularity")
class Popularity(PlacementPolicy):
    """Per layer, greedy longest-processing-time: experts from the most routed down, each to
    the GPU with the fewest routed tokens so far (ties: the lower id) that has room."""

    def place(self, trace, num_gpus):
        return _balanced(trace, num_gpus, lambda l, e, g, load: (load[g], g))


@register_placement("affinity")
class Affinity(PlacementPolicy):
    """Per layer, co-routed experts together: experts from the most routed down, each to the
    GPU with room whose experts share the most tokens with it (co-occurrence counts), ties to
    the GPU with the fewest routed tokens, then the lower id. Fewer destinations per token
    (less all-to-all), at the price of balance."""

    def place(self, trace, num_gpus):
        E = trace.num_experts
        co = [co_occurrence(trace, l) for l in range(trace.num_layers)]
        shared = np.zeros((trace.num_layers, E, num_gpus), dtype=np.int64)  # tokens shared with each GPU

        def placed(l, e, g):
            shared[l, :, g] += co[l][:, e]

        def rank(l, e, g, load):
            return (-shared[l, e, g], load[g], g)

        return _balanced(trace, num_gpus, rank, placed)
