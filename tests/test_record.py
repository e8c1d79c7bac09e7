"""Recording routing from local Hugging Face MoE checkpoints: tiny randomly initialised
models written to a temporary folder (nothing downloaded). Skipped without transformers."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from simulator.errors import InputError

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
              max_position_embeddings=128)


def tiny_configs(T):
    mla = dict(moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1,
               kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    return {
        "mixtral": T.MixtralConfig(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, **COMMON),
        "olmoe": T.OlmoeConfig(intermediate_size=32, num_experts=8, num_experts_per_tok=2, **COMMON),
        "qwen2_moe": T.Qwen2MoeConfig(intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                      num_experts=8, num_experts_per_tok=2, **COMMON),
        "deepseek_v2": T.DeepseekV2Config(intermediate_size=32, num_experts_per_tok=2, q_lora_rank=None, n_group=1,
                                          topk_group=1, **mla, **COMMON),
        "deepseek_v3": T.DeepseekV3Config(intermediate_size=32, num_experts_per_tok=2, q_lora_rank=16, n_group=2,
                                          topk_group=1, **mla, **COMMON),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, cfg in tiny_configs(T).items():
        torch.manual_seed(0)
        T.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name, moe_layers", [("mixtral", [0, 1, 2]), ("olmoe", [0, 1, 2]), ("qwen2_moe", [0, 1, 2]),
                                              ("deepseek_v2", [1, 2]), ("deepseek_v3", [1, 2])])
def test_records_every_moe_layer_of_each_architecture(checkpoints, tmp_path, name, moe_layers):
    from calibrate.models.record import record_routing

    ss = record_routing(checkpoints[name], tmp_path / "r.npz", random_sequences=3, length=9, max_new_tokens=3, seed=1)
    assert ss.meta["moe_layers"] == moe_layers                  # DeepSeek's first layer is dense
    assert (ss.num_sequences, ss.num_layers, ss.top_k, ss.num_experts) == (3, len(moe_layers), 2, 8)
    assert ss.lengths.tolist() == [9 + 3 - 1] * 3              # prompt + generated (the last is never fed back)
    assert ss.prompt_lengths.tolist() == [9, 9, 9]
    assert len(np.unique(np.asarray(ss.experts))) > 2           # random routers spread tokens over experts


@pytest.mark.parametrize("name", ["mixtral", "olmoe", "qwen2_moe"])
def test_recorded_routing_is_the_routers_top_k(checkpoints, tmp_path, name):
    """Against an independent path: the router logits the model itself returns."""
    import torch
    import transformers as T

    from calibrate.models.record import record_routing

    prompts = tmp_path / "p.jsonl"
    ids = [[3, 14, 15, 9, 26, 5, 35], [8, 9, 7, 9, 3, 2]]
    prompts.write_text("".join(json.dumps({"input_ids": x}) + "\n" for x in ids))
    ss = record_routing(checkpoints[name], tmp_path / "r.npz", prompts=prompts)
    model = T.AutoModelForCausalLM.from_pretrained(checkpoints[name]).eval()
    for i, x in enumerate(ids):
        with torch.no_grad():
            logits = model(torch.tensor([x]), output_router_logits=True).router_logits
        for layer, lg in enumerate(logits):
            top = torch.topk(lg.float(), 2, dim=-1).indices.numpy()
            assert np.array_equal(np.sort(top, 1), np.sort(ss.sequence(i)[:, layer], 1)), (i, layer)


def test_cli_records_and_rejects_missing_prompts(checkpoints, tmp_path):
    from simmoe.cli import main

    res = CliRunner().invoke(main, ["trace", "record", "--model", str(checkpoints["olmoe"]), "--random", "2",
                                    "--length", "5", "-o", str(tmp_path / "r.npz")])
    assert res.exit_code == 0, res.output
    assert "2 sequences, 10 tokens, 3 MoE layers" in res.output
    res = CliRunner().invoke(main, ["trace", "record", "--model", str(checkpoints["olmoe"]), "-o", str(tmp_path / "x.npz")])
    assert res.exit_code == 2 and "give exactly one of --prompts and --random" in res.output
    res = CliRunner().invoke(main, ["trace", "record", "--model", str(tmp_path), "--random", "1",
                                    "-o", str(tmp_path / "x.npz")])
    assert res.exit_code == 2 and "no config.json" in res.output


def test_missing_transformers_is_a_clear_input_error(tmp_path, monkeypatch):
    from calibrate.models.record import record_routing

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(InputError, match=r"transformers is not installed: pip install 'simmoe\[record\]'"):
        record_routing(tmp_path, tmp_path / "r.npz", random_sequences=1)
