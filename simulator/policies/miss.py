"""Miss handling: copy the expert to the GPU, compute it on the host CPU, compute it on the GPU
straight from mapped host memory, or pick the cheapest of these per miss."""
from __future__ import annotations

from .base import MissPolicy, register_miss


@register_miss("copy")
class CopyToGpu(MissPolicy):
    def on_cpu(self, expert, tokens):
        return False


@register_miss("cpu")
class CpuCompute(MissPolicy):
    """Run missed experts on the CPU (only those with at most ``max_tokens`` tokens, if set)."""

    def __init__(self, max_tokens: int | None = None, **options):
        self.max_tokens = max_tokens

    def on_cpu(self, expert, tokens):
        return self.max_tokens is None or tokens <= self.max_tokens


@register_miss("direct")
class DirectRead(MissPolicy):
    """Compute missed experts on the GPU straight from mapped pinned host memory (no slot, no
    copy; only those with at most ``max_tokens`` tokens, if set; the others are copied)."""

    def __init__(self, max_tokens: int | None = None, **options):
        self.max_tokens = max_tokens

    def on_cpu(self, expert, tokens):
        return False

    def route(self, expert, tokens, read, queue):
        return "direct" if self.max_tokens is None or tokens <= self.max_tokens else "copy"


@register_miss("cheapest")
class Cheapest(MissPolicy):
    """Per miss, the cheapest of ``choices`` (copy, direct, cpu) by the planner's predicted
    stream times: the choice after which the host and the compute stream are done soonest
    (ties: copy, then direct, then cpu). CPU is left out when the profile has no CPU timings."""

    needs_queue = True

    def __init__(self, choices=None, **options):
        from ..tiers import MISS_CHOICES

        self.choices = tuple(c for c in MISS_CHOICES if choices is None or c in choices)

    def on_cpu(self, expert, tokens):
        raise NotImplementedError("cheapest decides with route()")

    def route(self, expert, tokens, read, queue):
        opts = queue.options(tokens, read, self.choices)
        how = min(opts, key=lambda k: opts[k][0])   # dict order is choice order: ties to the first
        queue.commit(opts[how])
        return how
