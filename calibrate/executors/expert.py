"""The expert FFN as simmoe times it, shared by calibration and the live executor.

One expert of a :class:`~simulator.models.ModelSpec` is a gated FFN
``down(silu(x @ W_gate) * (x @ W_up))`` (3 matrices) or a plain one ``down(relu(x @ W_up))``
(2 matrices), with ``W_gate, W_up`` of shape ``hidden x ffn`` and ``W_down`` of shape
``ffn x hidden``, in the model's dtype. All matrices of one expert are views into one flat,
contiguous buffer, so a single copy moves a whole expert (``expert.flat``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from simulator.errors import InputError
from simulator.models import ModelSpec

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Memory = Literal["device", "pinned", "pageable"]


@dataclass
class ExpertWeights:
    """One expert's matrices, views into ``flat``; ``gate`` is None for a plain FFN."""

    flat: torch.Tensor
    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor


def torch_dtype(spec: ModelSpec) -> torch.dtype:
    """The torch dtype of a model's experts (fp8/int8 experts cannot be timed with torch matmuls)."""
    if spec.dtype not in TORCH_DTYPES:
        raise InputError("command line", "--model",
                         f"{spec.name}: {spec.dtype} experts cannot be timed (supported: {', '.join(TORCH_DTYPES)})")
    return TORCH_DTYPES[spec.dtype]


def expert_ffn(x: torch.Tensor, w_gate: torch.Tensor | None, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One expert on ``x`` (tokens x hidden): gated (SiLU) if ``w_gate`` is given, else plain (ReLU)."""
    if w_gate is None:
        return torch.relu(x @ w_up) @ w_down
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def run_expert(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """:func:`expert_ffn` with the matrices of ``w``."""
    return expert_ffn(x, w.gate, w.up, w.down)


def expert_views(flat: torch.Tensor, spec: ModelSpec) -> ExpertWeights:
    """Split a flat buffer of ``spec.matrices * hidden * ffn`` elements into the expert's matrices."""
    h, f = spec.hidden, spec.ffn
    mats = [flat[i * h * f:(i + 1) * h * f] for i in range(spec.matrices)]
    down = mats[-1].view(f, h)
    if spec.gated:
        return ExpertWeights(flat, mats[0].view(h, f), mats[1].view(h, f), down)
    return ExpertWeights(flat, None, mats[0].view(h, f), down)


def alloc_expert(spec: ModelSpec, memory: Memory = "device", device: str | torch.device = "cpu") -> ExpertWeights:
    """One expert with random weights (uniform in +-1/sqrt(hidden)), every page written.

    ``memory``: ``device`` (on ``device``), ``pinned`` (page-locked host memory; needs CUDA) or
    ``pageable`` (ordinary host memory).
    """
    numel = spec.matrices * spec.hidden * spec.ffn
    dtype = torch_dtype(spec)
    if memory == "device":
        flat = torch.empty(numel, dtype=dtype, device=device)
    else:
        flat = torch.empty(numel, dtype=dtype, pin_memory=(memory == "pinned"))
    bound = spec.hidden ** -0.5
    flat.uniform_(-bound, bound)
    return expert_views(flat, spec)
