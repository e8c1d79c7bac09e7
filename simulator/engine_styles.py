"""How an engine style issues a layer's expert work: one call per expert, or grouped.

The planner decides *what* each layer does (docs/architecture.md); an engine style decides how
the expert computes are issued. The per-expert styles (``twin``, ``hf-eager``, ``offload``)
issue one FFN per ``COMPUTE``. A grouped style (``grouped``: transformers' grouped_mm;
``offload-grouped``: simmoe's real-model executor with one grouped GEMM over its slots;
``graphs`` and ``offload-graphs``: the same calls between piecewise CUDA-graph replays) issues
a layer's ready experts in one call: :func:`group_layer` rewrites the planner's layer

    DENSE, hit and prefetched COMPUTEs, (demand LOAD, COMPUTE)..., CPU..., prefetch LOADs

into

    DENSE, GROUP(hits and prefetched), demand LOADs, GROUP(the missed experts), CPU..., prefetch LOADs

so the first call runs while the misses copy, and the second waits for the last of them (a
cache too small to hold a layer's misses at once refills a slot within the layer: the computes
that must read it first are then issued before that load, as a call of their own). The
engine (:mod:`simulator.engine`) and the live executor (:mod:`calibrate.executors.model`)
apply this same function, so what runs live is what the simulator timed.

``(GROUP, slots, computes, tokens, active)``: ``computes`` the planner's ``COMPUTE`` ops it
serves, ``slots`` their distinct slots in order, ``active`` how many.
"""
from __future__ import annotations

from .planner import COMPUTE, CPU, DEQUANT, DENSE, DIRECT, LOAD, READ

GROUP = max(DENSE, LOAD, COMPUTE, CPU, DEQUANT, DIRECT, READ) + 1   # an opcode of its own
GROUPED_STYLES = ("grouped", "offload-grouped", "graphs", "offload-graphs")
#: the styles whose non-expert part of a decode step is replayed from piecewise CUDA graphs
#: (``graphs``: transformers' grouped_mm experts eager between the replays; ``offload-graphs``:
#: simmoe's real-model executor's grouped dispatch between them): priced by their own decode
#: table (``engine.<model>.styles.<style>.decode``), measured from the replays
GRAPHED_STYLES = ("graphs", "offload-graphs")
#: the styles whose batched forward is transformers': a step's rows of new tokens right-padded
#: to its longest (a decode token beside a 256-token prompt chunk is a row of 256), so the
#: non-expert part of a mixed step runs on rows x longest tokens (the MoE layers see the real
#: tokens only, as the live executor routes them): priced so in a serving run
#: (:meth:`simulator.engine_costs.MixedStepCost.price`)
PADDED_STYLES = ("hf-eager", "grouped", "offload", "offload-grouped")
#: the styles that price simmoe's real-model executor, and its dispatch in each
EXECUTOR_DISPATCH = {"offload": "loop", "offload-grouped": "grouped", "offload-graphs": "graphs"}


def _group(computes: list[tuple]) -> tuple:
    slots = tuple(dict.fromkeys(op[1] for op in computes))
    return (GROUP, slots, tuple(computes), sum(op[3] for op in computes), len(slots))


def group_layer(ops: list[tuple]) -> list[tuple]:
    """One layer's operations with its computes grouped into as few calls as the slots allow:
    the computes before the first demand load in one call (issued before the copies), then
    every later compute in one call after the loads, except that a load into a slot a pending
    compute still has to read first issues those computes (a small cache refilling a slot
    within the layer). CPU experts and the next layer's prefetch loads keep their places at
    the end; any other operation (the tiers': disk reads, dequantises, direct reads) stays
    where the planner put it among the loads."""
    out, pending, cpus, prefetch = [], [], [], []
    seen_load = False

    def flush():
        if pending:
            out.append(_group(pending))
            pending.clear()
    for op in ops:
        kind = op[0]
        if kind == DENSE:
            out.append(op)
        elif kind == COMPUTE:
            pending.append(op)
        elif kind == LOAD and op[4]:
            prefetch.append(op)
        elif kind == LOAD:
            if not seen_load or not {c[1] for c in pending}.isdisjoint(op[1]):
                flush()
            seen_load = True
            out.append(op)
        elif kind == CPU:
            cpus.append(op)
        else:   # the tiers' own work (a disk read, a dequantise, a direct read) keeps its place
            out.append(op)
    flush()
    return out + cpus + prefetch
