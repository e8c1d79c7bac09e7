"""Routing traces: the in-memory/on-disk form and the synthetic generators."""
from .synthetic import GENERATORS, expected_unique_uniform, generate
from .trace import Trace, concat_steps, load_trace

__all__ = ["Trace", "load_trace", "concat_steps", "generate", "GENERATORS", "expected_unique_uniform"]
