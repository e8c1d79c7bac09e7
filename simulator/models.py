"""MoE model shapes: presets from public configs, and custom models.

What expert offloading needs: how many MoE layers, how many routed experts per layer, how many
each token picks, and the shape and dtype of one expert, from which its size in bytes follows
(a gated FFN has three matrices: gate, up, down).

A preset also carries its public architecture beyond the experts (:class:`Architecture`:
attention kind and heads, MLA ranks, dense layers, vocabulary, norm eps, rope theta), from
the model's published ``config.json``. ``calibrate.models.build`` turns it into the real
transformers model (random weights) to measure the engine around the experts; the simulator
itself only reads the expert shape.
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


AttentionKind = Literal["mha", "gqa", "mla"]
Family = Literal["olmoe", "qwen3_moe", "deepseek_v2", "mixtral"]


class Architecture(BaseModel):
    """The public architecture of a model beyond its routed experts (its ``config.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Family = Field(description="transformers model type, e.g. olmoe, qwen3_moe")
    total_layers: int = Field(gt=0, description="decoder layers, MoE and dense")
    dense_layers: tuple[int, ...] = Field((), description="indices of the layers with a dense FFN")
    dense_ffn: int = Field(0, ge=0, description="intermediate size of a dense layer's FFN")
    attention: AttentionKind
    heads: int = Field(gt=0, description="query heads")
    kv_heads: int = Field(gt=0, description="key/value heads (= heads for MHA and MLA)")
    head_dim: int = Field(gt=0, description="per-head dimension (MLA: qk_nope + qk_rope)")
    q_lora_rank: int | None = Field(None, gt=0, description="MLA query low-rank (None: full q_proj)")
    kv_lora_rank: int | None = Field(None, gt=0, description="MLA compressed KV rank")
    qk_nope_head_dim: int | None = Field(None, gt=0)
    qk_rope_head_dim: int | None = Field(None, gt=0)
    v_head_dim: int | None = Field(None, gt=0)
    vocab: int = Field(gt=0)
    norm_eps: float = Field(gt=0)
    rope_theta: float = Field(gt=0)
    max_positions: int = Field(gt=0)
    norm_topk_prob: bool = False
    tie_embeddings: bool = False

    @model_validator(mode="after")
    def _check(self) -> "Architecture":
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) not a multiple of kv_heads ({self.kv_heads})")
        mla = (self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim)
        if self.attention == "mla" and None in mla:
            raise ValueError("mla attention needs kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim")
        if self.attention != "mla" and any(v is not None for v in mla + (self.q_lora_rank,)):
            raise ValueError(f"MLA ranks given for {self.attention} attention")
        if any(not 0 <= i < self.total_layers for i in self.dense_layers):
            raise ValueError(f"dense_layers {list(self.dense_layers)} outside 0..{self.total_layers - 1}")
        if self.dense_layers and self.dense_ffn == 0:
            raise ValueError("dense_layers given without dense_ffn")
        return self

    @property
    def moe_layers(self) -> int:
        return self.total_layers - len(self.dense_layers)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV-cache bytes per token and layer, as transformers caches it (MLA: the compressed
        latent and the rope key, one head)."""
        if self.attention == "mla":
            return (self.kv_lora_rank + self.qk_rope_head_dim) * dtype_bytes
        return 2 * self.kv_heads * self.head_dim * dtype_bytes


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
    arch: Architecture | None = Field(None, description="public architecture beyond the experts")

    @model_validator(mode="after")
    def _check_top_k(self) -> "ModelSpec":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        if self.expert_bytes > MAX_EXPERT_BYTES:
            raise ValueError(f"one expert would be {self.expert_bytes:,} bytes (hidden x ffn x matrices x "
                             f"dtype), more than {MAX_EXPERT_BYTES:,}")
        if self.arch is not None and self.arch.moe_layers != self.num_layers:
            raise ValueError(f"arch has {self.arch.moe_layers} MoE layers, num_layers is {self.num_layers}")
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
            arch=Architecture(
                family="mixtral", total_layers=32, attention="gqa", heads=32, kv_heads=8, head_dim=128,
                vocab=32000, norm_eps=1e-5, rope_theta=1e6, max_positions=32768, norm_topk_prob=True,
            ),
        ),
        ModelSpec(
            name="deepseek-v2-lite", num_layers=26, num_experts=64, top_k=6, hidden=2048,
            ffn=1408, dtype="bf16", gated=True, shared_experts=2,
            source="deepseek-ai/DeepSeek-V2-Lite config: 26 MoE layers (layer 0 dense), "
                   "64 routed top-6 + 2 shared, moe_intermediate_size 1408",
            arch=Architecture(
                family="deepseek_v2", total_layers=27, dense_layers=(0,), dense_ffn=10944, attention="mla",
                heads=16, kv_heads=16, head_dim=192, q_lora_rank=None, kv_lora_rank=512,
                qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab=102400, norm_eps=1e-6,
                rope_theta=10000.0, max_positions=163840,
            ),
        ),
        ModelSpec(
            name="olmoe-1b-7b", num_layers=16, num_experts=64, top_k=8, hidden=2048,
            ffn=1024, dtype="bf16", gated=True,
            source="allenai/OLMoE-1B-7B-0924 config",
            arch=Architecture(
                family="olmoe", total_layers=16, attention="mha", heads=16, kv_heads=16, head_dim=128,
                vocab=50304, norm_eps=1e-5, rope_theta=10000.0, max_positions=4096,
            ),
        ),
        ModelSpec(
            name="qwen3-30b-a3b", num_layers=48, num_experts=128, top_k=8, hidden=2048,
            ffn=768, dtype="bf16", gated=True,
            source="Qwen/Qwen3-30B-A3B config: moe_intermediate_size 768",
            arch=Architecture(
                family="qwen3_moe", total_layers=48, attention="gqa", heads=32, kv_heads=4, head_dim=128,
                vocab=151936, norm_eps=1e-6, rope_theta=1e6, max_positions=40960, norm_topk_prob=True,
            ),
        ),
    ]
}


def get_preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
