"""Routing traces: the in-memory/on-disk form and the synthetic generators."""
from .synthetic import GENERATORS, expected_unique_uniform, generate
from .trace import Trace, concat_steps, expert_dtype, load_trace

__all__ = ["Trace", "load_trace", "concat_steps", "expert_dtype", "generate", "GENERATORS", "expected_unique_uniform"]
