"""Real MoE models built from a preset's public architecture, with random weights.

``build_model`` makes the transformers model of a preset (OLMoE, Qwen3-MoE, DeepSeek-V2,
Mixtral) with transformers' own config classes: no download, no checkpoint, random weights.
At full size (``tiny=False``) it has the published shapes (``layers`` may keep only the first
N decoder layers, to fit memory or time); ``tiny=True`` keeps the architecture (attention kind,
GQA ratio, MLA, shared experts, a leading dense layer) at small dimensions and two layers, for
CPU tests.

Every MoE block of these four families has the same shape in transformers 5.x: a ``gate``
router returning ``(logits, top_k_weights, top_k_index)`` and an ``experts`` module called as
``experts(hidden, top_k_index, top_k_weights)`` with fused 3D weights (``gate_up_proj``,
``down_proj``) whose forward is picked at call time by ``config._experts_implementation``
(``eager``: the per-expert loop; ``grouped_mm``: one grouped GEMM per projection). So simmoe
measures and replaces the experts without forking transformers (``moe_blocks``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from simulator.models import Architecture, ModelSpec, get_preset

# engine style -> transformers' experts implementation
EXPERTS_IMPLEMENTATION = {"hf-eager": "eager", "grouped": "grouped_mm", "graphs": "grouped_mm"}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

_TINY = dict(hidden=64, ffn=32, dense_ffn=96, heads=4, head_dim=16, vocab=256, max_positions=4096,
             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
             num_experts=8, top_k=2)


@dataclass
class BuiltModel:
    """A built model and what simmoe needs to know about it."""

    spec: ModelSpec            # the expert shape actually built (tiny: the small one)
    arch: Architecture         # the architecture actually built
    model: torch.nn.Module     # the *ForCausalLM
    config: object             # its transformers config
    moe_layers: list[int]      # decoder-layer indices with a routed-expert block

    @property
    def decoder_layers(self):
        return self.model.model.layers

    def moe_blocks(self) -> list[torch.nn.Module]:
        """The MoE block (``mlp``) of each MoE layer, in order."""
        return [self.decoder_layers[i].mlp for i in self.moe_layers]


def tiny_spec(spec: ModelSpec) -> ModelSpec:
    """The same architecture at small dimensions with two decoder layers (a dense first layer
    stays dense: DeepSeek-V2-Lite then has one dense and one MoE layer)."""
    a = _arch_of(spec)
    t = _TINY
    dense = tuple(i for i in a.dense_layers if i < 1)
    kv_heads = t["heads"] if a.attention != "gqa" else max(1, t["heads"] * a.kv_heads // a.heads) or 1
    kv_heads = kv_heads if t["heads"] % kv_heads == 0 else 1
    mla = a.attention == "mla"
    arch = a.model_copy(update=dict(
        total_layers=2, dense_layers=dense, dense_ffn=t["dense_ffn"] if dense else 0, heads=t["heads"],
        kv_heads=kv_heads,
        head_dim=t["qk_nope_head_dim"] + t["qk_rope_head_dim"] if mla else t["head_dim"],
        kv_lora_rank=t["kv_lora_rank"] if mla else None,
        qk_nope_head_dim=t["qk_nope_head_dim"] if mla else None,
        qk_rope_head_dim=t["qk_rope_head_dim"] if mla else None,
        v_head_dim=t["v_head_dim"] if mla else None,
        vocab=t["vocab"], max_positions=t["max_positions"],
    ))
    return spec.model_copy(update=dict(
        name=f"{spec.name}-tiny", num_layers=arch.moe_layers, num_experts=t["num_experts"],
        top_k=min(spec.top_k, t["top_k"]), hidden=t["hidden"], ffn=t["ffn"], arch=arch,
    ))


def _arch_of(spec: ModelSpec) -> Architecture:
    if spec.arch is None:
        raise ValueError(f"model {spec.name!r} has no architecture (arch) to build; "
                         "presets with one: olmoe-1b-7b, qwen3-30b-a3b, deepseek-v2-lite, mixtral-8x7b")
    return spec.arch


def keep_layers(spec: ModelSpec, layers: int) -> ModelSpec:
    """The first ``layers`` decoder layers of ``spec`` (at least one MoE layer among them)."""
    a = _arch_of(spec)
    if not 0 < layers <= a.total_layers:
        raise ValueError(f"layers must be 1..{a.total_layers}, got {layers}")
    arch = a.model_copy(update=dict(total_layers=layers, dense_layers=tuple(i for i in a.dense_layers if i < layers)))
    if arch.moe_layers < 1:
        raise ValueError(f"the first {layers} layer(s) of {spec.name} hold no MoE layer")
    return spec.model_copy(update=dict(num_layers=arch.moe_layers, arch=arch))


def hf_config(spec: ModelSpec, experts_implementation: str = "eager"):
    """The transformers config of ``spec`` (its class from the architecture's family)."""
    a = _arch_of(spec)
    common = dict(
        vocab_size=a.vocab, hidden_size=spec.hidden, num_hidden_layers=a.total_layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, rms_norm_eps=a.norm_eps,
        max_position_embeddings=a.max_positions, tie_word_embeddings=a.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
        num_experts_per_tok=spec.top_k, experts_implementation=experts_implementation,
        pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )
    if a.family == "olmoe":
        from transformers import OlmoeConfig
        return OlmoeConfig(**common, intermediate_size=spec.ffn, num_experts=spec.num_experts,
                           norm_topk_prob=a.norm_topk_prob)
    if a.family == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        return Qwen3MoeConfig(**common, head_dim=a.head_dim, moe_intermediate_size=spec.ffn,
                              intermediate_size=a.dense_ffn or spec.ffn, num_experts=spec.num_experts,
                              norm_topk_prob=a.norm_topk_prob, mlp_only_layers=list(a.dense_layers))
    if a.family == "mixtral":
        from transformers import MixtralConfig
        return MixtralConfig(**common, head_dim=a.head_dim, intermediate_size=spec.ffn,
                             num_local_experts=spec.num_experts)
    if a.family == "deepseek_v2":
        from transformers import DeepseekV2Config
        first_dense = len(a.dense_layers)
        if a.dense_layers != tuple(range(first_dense)):
            raise ValueError("deepseek_v2: dense layers must be the first ones (first_k_dense_replace)")
        return DeepseekV2Config(**common, intermediate_size=a.dense_ffn, moe_intermediate_size=spec.ffn,
                                n_routed_experts=spec.num_experts, n_shared_experts=spec.shared_experts,
                                first_k_dense_replace=first_dense, q_lora_rank=a.q_lora_rank,
                                kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
                                qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim,
                                head_dim=a.qk_rope_head_dim, topk_method="greedy", n_group=1, topk_group=1,
                                norm_topk_prob=a.norm_topk_prob)
    raise ValueError(f"unknown family {a.family!r}")  # pragma: no cover (Literal-checked)


def build_model(preset: str | ModelSpec, *, layers: int | None = None, tiny: bool = False,
                dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
                style: str = "hf-eager", seed: int = 0) -> BuiltModel:
    """Build ``preset`` as a real transformers model with random weights, in eval mode.

    ``tiny``: two layers at small dimensions (CPU tests); ``layers``: keep the first N decoder
    layers of the full model; ``dtype`` defaults to the preset's (bf16); ``style`` picks the
    experts implementation (``hf-eager``: per-expert loop, ``grouped``/``graphs``: grouped_mm).
    """
    from transformers import AutoModelForCausalLM

    spec = get_preset(preset) if isinstance(preset, str) else preset
    if tiny:
        spec = tiny_spec(spec)
    if layers is not None:
        spec = keep_layers(spec, layers)
    if style not in EXPERTS_IMPLEMENTATION:
        raise ValueError(f"unknown engine style {style!r}; known: {', '.join(EXPERTS_IMPLEMENTATION)}")
    tdtype = TORCH_DTYPES[dtype or spec.dtype] if not isinstance(dtype, torch.dtype) else dtype
    name = {v: k for k, v in TORCH_DTYPES.items()}[tdtype]
    if name != spec.dtype:
        spec = spec.model_copy(update={"dtype": name})  # expert bytes as built
    config = hf_config(spec, EXPERTS_IMPLEMENTATION[style])
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=tdtype)
    model.eval().requires_grad_(False)
    if tiny:
        _spread_routers(model)
    moe = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    if len(moe) != spec.num_layers:  # pragma: no cover (a transformers change)
        raise RuntimeError(f"built {len(moe)} MoE layers, expected {spec.num_layers}")
    return BuiltModel(spec=spec, arch=spec.arch, model=model, config=config, moe_layers=moe)


def _spread_routers(model: torch.nn.Module) -> None:
    """Larger router weights in tiny models, so that random tokens pick varied experts."""
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "weight"):
            torch.nn.init.normal_(gate.weight, std=1.0)
