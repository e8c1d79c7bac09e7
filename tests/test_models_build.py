"""Model presets' public architectures, and the real transformers models built from them."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from simulator.models import PRESETS, Architecture
from simulator.scenario import parse_scenario
from tests.conftest import scenario_dict

REAL = ["olmoe-1b-7b", "qwen3-30b-a3b", "deepseek-v2-lite", "mixtral-8x7b"]
# published total parameter counts (billions): model cards / papers
PUBLISHED_PARAMS_B = {"olmoe-1b-7b": 6.92, "qwen3-30b-a3b": 30.5, "deepseek-v2-lite": 15.7, "mixtral-8x7b": 46.7}


def test_presets_carry_architecture():
    for name in REAL:
        a = PRESETS[name].arch
        assert a is not None and a.moe_layers == PRESETS[name].num_layers
    ds = PRESETS["deepseek-v2-lite"].arch
    assert ds.attention == "mla" and ds.dense_layers == (0,) and ds.total_layers == 27
    assert PRESETS["qwen3-30b-a3b"].arch.kv_heads == 4 and PRESETS["qwen3-30b-a3b"].num_layers == 48


@pytest.mark.parametrize("bad, msg", [
    (dict(kv_heads=3), "multiple of kv_heads"),
    (dict(attention="mla"), "mla attention needs"),
    (dict(kv_lora_rank=512), "MLA ranks given"),
    (dict(dense_layers=(20,)), "outside"),
    (dict(dense_layers=(0,)), "without dense_ffn"),
])
def test_architecture_checks(bad, msg):
    base = PRESETS["olmoe-1b-7b"].arch.model_dump()
    with pytest.raises(ValidationError, match=msg):
        Architecture(**{**base, **bad})


def test_shape_override_drops_architecture():
    sc = parse_scenario(scenario_dict(model={"preset": "olmoe-1b-7b", "num_layers": 4}))
    assert sc.model.arch is None and sc.model.num_layers == 4
    sc = parse_scenario(scenario_dict(model={"preset": "olmoe-1b-7b", "dtype": "fp8"}))
    assert sc.model.arch == PRESETS["olmoe-1b-7b"].arch
    again = parse_scenario({**scenario_dict(), "model": sc.effective()["model"]})
    assert again.model == sc.model


torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

from calibrate.models.build import build_model  # noqa: E402


@pytest.mark.parametrize("name", REAL)
def test_full_size_matches_published_parameter_count(name):
    b = build_model(name, device="meta")
    n = sum(p.numel() for p in b.model.parameters()) / 1e9
    assert n == pytest.approx(PUBLISHED_PARAMS_B[name], rel=0.01)
    assert len(b.decoder_layers) == b.arch.total_layers
    assert len(b.moe_layers) == PRESETS[name].num_layers
    e = b.moe_blocks()[0].experts
    spec = PRESETS[name]
    assert tuple(e.gate_up_proj.shape) == (spec.num_experts, 2 * spec.ffn, spec.hidden)


def test_layers_keeps_leading_dense_layer():
    b = build_model("deepseek-v2-lite", layers=3, device="meta")
    assert b.moe_layers == [1, 2] and b.spec.num_layers == 2
    with pytest.raises(ValueError, match="no MoE layer"):
        build_model("deepseek-v2-lite", layers=1, device="meta")
    with pytest.raises(ValueError, match="no architecture"):
        build_model("published-study", tiny=True)


@pytest.mark.parametrize("style", ["hf-eager", "grouped"])
@pytest.mark.parametrize("name", REAL)
def test_tiny_model_decodes_with_kv_cache(name, style):
    """Prefill then one decode step with the KV cache gives the logits of the whole sequence."""
    b = build_model(name, tiny=True, dtype="fp32", style=style)
    assert len(b.decoder_layers) == 2 and b.arch.attention == PRESETS[name].arch.attention
    ids = torch.randint(0, b.arch.vocab, (3, 6), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=b.config)
    with torch.no_grad():
        b.model(input_ids=ids[:, :5], past_key_values=cache, use_cache=True)
        step = b.model(input_ids=ids[:, 5:], past_key_values=cache, use_cache=True).logits[:, -1]
        whole = b.model(input_ids=ids).logits[:, -1]
    assert cache.get_seq_length() == 6
    torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-4)
