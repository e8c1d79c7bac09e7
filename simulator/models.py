"""MoE model shapes: presets from public configs, and custom models.

Only what expert offloading needs is kept: how many MoE layers, how many routed experts per
layer, how many each token picks, and the shape and dtype of one expert, from which its size
in bytes follows (a gated FFN has three matrices: gate, up, down).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: physical bounds of a model's shape (the largest published MoE models are well inside them:
#: ~61 layers, ~384 routed experts; PEER-style layers reach 2^20 = 1,048,576 tiny experts)
MAX_LAYERS = 1024
MAX_EXPERTS = 1 << 20
MAX_TOP_K = 4096
MAX_DIM = 1 << 20
#: the largest expert (bytes) and the largest non-expert time per layer (ms) a model may have
MAX_EXPERT_BYTES = 1 << 40
MAX_DENSE_MS = 1e4

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}
Dtype = Literal["fp32", "fp16", "bf16", "fp8", "int8"]


class ModelSpec(BaseModel):
    """The MoE part of a model, enough to size and time its experts."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    name: str
    num_layers: int = Field(gt=0, le=MAX_LAYERS, description="MoE layers")
    num_experts: int = Field(gt=0, le=MAX_EXPERTS, description="routed experts per MoE layer")
    top_k: int = Field(gt=0, le=MAX_TOP_K, description="routed experts each token picks per layer")
    hidden: int = Field(gt=0, le=MAX_DIM, description="model (hidden) dimension")
    ffn: int = Field(gt=0, le=MAX_DIM, description="expert FFN (intermediate) dimension")
    dtype: Dtype = "bf16"
    gated: bool = Field(True, description="gated FFN (3 matrices) or plain (2)")
    shared_experts: int = Field(0, ge=0, le=MAX_EXPERTS, description="always-resident shared experts per layer")
    dense_ms_per_layer: float = Field(
        0.0, ge=0, le=MAX_DENSE_MS,
        description="non-expert GPU time per layer and step (attention, router, norms)"
    )
    source: str = ""

    @model_validator(mode="after")
    def _check_top_k(self) -> "ModelSpec":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        if self.expert_bytes > MAX_EXPERT_BYTES:
            raise ValueError(f"one expert would be {self.expert_bytes:,} bytes (hidden x ffn x matrices x "
                             f"dtype), more than {MAX_EXPERT_BYTES:,}")
        return self

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def matrices(self) -> int:
        return 3 if self.gated else 2

    @property
    def expert_bytes(self) -> int:
        return self.matrices * self.hidden * self.ffn * self.dtype_bytes

    @property
    def shape_key(self) -> str:
        """Key of this expert shape in a hardware profile's compute tables."""
        return f"{self.hidden}x{self.ffn}-{self.dtype}-{'gated' if self.gated else 'plain'}"

    @property
    def activation_bytes_per_token(self) -> int:
        return self.hidden * self.dtype_bytes


PRESETS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec(
            name="published-study", num_layers=12, num_experts=128, top_k=2, hidden=768,
            ffn=3072, dtype="fp32", gated=True,
            source="the RTX 3090 study's expert (768x3072 gated, fp32, 27.0 MiB, 128 experts); "
                   "12 layers and top-2 are simmoe's choice, the study timed single layers",
        ),
        ModelSpec(
            name="switch-base-128", num_layers=12, num_experts=128, top_k=1, hidden=768,
            ffn=3072, dtype="fp32", gated=False,
            source="google/switch-base-128 config: d_model 768, d_ff 3072, 128 experts, top-1, "
                   "ReLU FFN (2 matrices), sparse every other layer of 12+12 = 12 MoE layers",
        ),
        ModelSpec(
            name="mixtral-8x7b", num_layers=32, num_experts=8, top_k=2, hidden=4096,
            ffn=14336, dtype="bf16", gated=True,
            source="mistralai/Mixtral-8x7B-v0.1 config",
        ),
        ModelSpec(
            name="deepseek-v2-lite", num_layers=26, num_experts=64, top_k=6, hidden=2048,
            ffn=1408, dtype="bf16", gated=True, shared_experts=2,
            source="deepseek-ai/DeepSeek-V2-Lite config: 26 MoE layers (layer 0 dense), "
                   "64 routed top-6 + 2 shared, moe_intermediate_size 1408",
        ),
        ModelSpec(
            name="olmoe-1b-7b", num_layers=16, num_experts=64, top_k=8, hidden=2048,
            ffn=1024, dtype="bf16", gated=True,
            source="allenai/OLMoE-1B-7B-0924 config",
        ),
        ModelSpec(
            name="qwen3-30b-a3b", num_layers=48, num_experts=128, top_k=8, hidden=2048,
            ffn=768, dtype="bf16", gated=True,
            source="Qwen/Qwen3-30B-A3B config: moe_intermediate_size 768",
        ),
    ]
}


def get_preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
