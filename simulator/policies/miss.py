"""Miss handling: copy the expert to the GPU, or compute it on the host CPU."""
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
