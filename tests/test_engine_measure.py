"""`simmoe calibrate engine`: the engine around the experts, timed on tiny real models (CPU)."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from calibrate.measurements.engine import (  # noqa: E402
    Budget, EngineMeasurer, EnginePlan, coarse_to_fine, fit_per_expert, grid_order, measure_engine, restore_kv,
)
from calibrate.models.build import build_model  # noqa: E402
from simmoe.cli import main  # noqa: E402
from simulator.models import PRESETS  # noqa: E402

SMALL = dict(batches=[1, 4], contexts=[8, 32], prompts=[8], trials=3, warmup=1, styles=["hf-eager", "grouped"])


def test_coarse_to_fine_prefixes_span_the_range():
    order = coarse_to_fine(9)
    assert sorted(order) == list(range(9)) and order[:3] == [0, 4, 8]
    pairs = grid_order(9, 9)
    assert len(set(pairs)) == 81 and set(pairs[:9]) == {(b, c) for b in (0, 4, 8) for c in (0, 4, 8)}


def test_budget_shares_roll_over():
    b = Budget(10.0, ["head", "decode"])
    b.start("head")
    assert 0 < b.deadline - b.end + 10.0 <= 10.0 * 0.05 / 0.55 + 0.01
    b.start("decode")
    assert b.deadline == pytest.approx(b.end, abs=0.01)  # the last table gets all that is left
    assert not Budget(None, ["head"]).spent()


def test_fit_per_expert_recovers_a_line():
    pts = [{"active": a, "ms": 0.3 + 0.05 * a} for a in (2, 8, 32, 64)]
    f = fit_per_expert(pts)
    assert f["base_ms"] == pytest.approx(0.3) and f["per_expert_ms"] == pytest.approx(0.05)
    assert f["max_abs_error"] < 1e-9
    assert fit_per_expert(pts[:1]) is None


@pytest.mark.parametrize("name", ["olmoe-1b-7b", "qwen3-30b-a3b", "deepseek-v2-lite"])
def test_decode_cache_holds_context_and_its_real_size(name):
    """The measured layer attends over exactly `context` cached tokens plus the new one, and
    the cache holds what the architecture says (MLA: the compressed latent)."""
    b = build_model(name, tiny=True)
    m = EngineMeasurer(EnginePlan(name, device="cpu", tiny=True, **SMALL), b)
    layer = b.moe_layers[0]
    shapes = m.kv_shapes(layer)
    per_token = sum(s[1] * s[3] for s in shapes) * 2
    assert per_token == b.arch.kv_bytes_per_token(2)
    cache = m.filled_cache(layer, 3, 20, shapes)
    call = m._layer_call(layer, 3, 1, 20, cache)
    for _ in range(3):
        out = call()
        assert cache.layers[layer].keys.shape[-2] == 21
    assert out.shape == (3, 1, b.spec.hidden)


@pytest.mark.parametrize("name", ["olmoe-1b-7b", "deepseek-v2-lite"])
def test_each_decode_trial_appends_to_the_filled_contiguous_cache(name):
    """A trial starts from the cache as filled, contiguous, as a running model's is after each
    append: a crop back to ``context`` would leave a strided view, whose append the GPU runs
    element by element (1.85 against 0.53 ms of OLMoE's layer at B=16 and 4k tokens)."""
    b = build_model(name, tiny=True)
    m = EngineMeasurer(EnginePlan(name, device="cpu", tiny=True, **SMALL), b)
    layer = b.moe_layers[0]
    cache = m.filled_cache(layer, 2, 12, m.kv_shapes(layer))
    k0, v0 = cache.layers[layer].keys.clone(), cache.layers[layer].values.clone()
    call = m._layer_call(layer, 2, 1, 12, cache)
    lay = cache.layers[layer]
    seen, update = [], lay.update

    def spy(*a, **kw):   # the cache as the trial's append meets it
        seen.append(lay.keys.is_contiguous() and lay.values.is_contiguous())
        return update(*a, **kw)
    lay.update = spy
    for _ in range(3):
        call()
        assert lay.keys.shape[-2] == 13 and torch.equal(lay.keys[..., :12, :], k0)
        assert torch.equal(lay.values[..., :12, :], v0)
    assert seen == [True] * 3
    restore_kv(cache, layer, (k0, v0), 1)
    assert cache.layers[layer].keys is k0 and cache.layers[layer].keys.is_contiguous()
    update(torch.zeros_like(k0[..., :1, :]), torch.zeros_like(v0[..., :1, :]))
    restore_kv(cache, layer, None, 1)   # no kept tensors (the prefill table's empty cache): a crop
    assert cache.layers[layer].keys.shape[-2] == 12 and not cache.layers[layer].keys.is_contiguous()


def test_measure_engine_tables_and_skips():
    doc = measure_engine(EnginePlan("deepseek-v2-lite", device="cpu", tiny=True, **SMALL, kv_budget_bytes=20_000))
    t = doc["tables"]
    assert doc["format"] == "simmoe-engine" and doc["built"]["attention"] == "mla"
    assert set(t) == {"head", "experts", "prefill", "dense_decode", "decode"}
    # (batch 4, context 32): 4 x 33 tokens x (2 copies of the latent + the expanded heads) > 20 kB: skipped
    grid = t["decode"]["points"]
    assert grid[0][0] is not None and grid[1][1] is None
    assert any(s["table"] == "decode" and s["batch"] == 4 and "KV cache" in s["why"] for s in doc["skipped"])
    for row in grid:
        for p in row:
            if p:
                assert p["p10"] <= p["ms"] <= p["p90"] and p["trials"] == 3
    assert set(t["experts"]) == {"hf-eager", "grouped"}
    assert [p["batch"] for p in t["experts"]["grouped"]["points"]] == [1, 4]
    assert all(1 <= p["active"] <= 8 for p in t["experts"]["hf-eager"]["points"])
    active = {s: [p["active"] for p in e["points"]] for s, e in t["experts"].items()}
    assert active["hf-eager"] == active["grouped"]  # both styles serve the same routing


def test_contexts_past_the_models_positions_are_skipped():
    plan = EnginePlan("olmoe-1b-7b", device="cpu", tiny=True, **{**SMALL, "contexts": [16, 8192], "batches": [1]})
    doc = measure_engine(plan)
    assert doc["tables"]["decode"]["context"] == [16, 4032]      # the edge measured instead (max - 64)
    assert all(doc["tables"]["decode"]["points"][0])
    assert any(s["context"] == 8192 and "positions" in s["why"] and "4032" in s["why"] for s in doc["skipped"])


def test_time_budget_trims_the_grid():
    doc = measure_engine(EnginePlan("olmoe-1b-7b", device="cpu", tiny=True, **SMALL, max_seconds=1.0))
    assert doc["elapsed_s"] < 60
    assert any(s["why"] == "time budget" for s in doc["skipped"]) or doc["elapsed_s"] <= 1.5


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "e.json"
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "engine", "--model", "qwen3-30b-a3b", "--device", "cpu", "--tiny", "--batch", "1,2",
              "--context", "16", "--prompt", "8", "--trials", "3", "--style", "grouped", "--out", str(out)],
             standalone_mode=True)
    assert e.value.code == 0
    doc = json.loads(out.read_text())
    assert doc["model"] == "qwen3-30b-a3b" and list(doc["tables"]["experts"]) == ["grouped"]
    assert doc["tables"]["decode"]["batch"] == [1, 2] and doc["tables"]["decode"]["context"] == [16]


@pytest.mark.parametrize("args, field", [
    (["--model", "published-study"], "--model"),
    (["--model", "olmoe-1b-7b", "--batch", "0"], "--batch"),
    (["--model", "olmoe-1b-7b", "--context", "x"], "--context"),
    (["--model", "olmoe-1b-7b", "--batch", "2,2"], "--batch"),
    (["--model", "olmoe-1b-7b", "--device", "tpu"], "--device"),
    (["--model", "deepseek-v2-lite", "--layers", "1"], "--layers"),
])
def test_cli_bad_input_one_line(tmp_path, capsys, args, field):
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "engine", "--device", "cpu", "--tiny", *args, "--out", str(tmp_path / "e.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and field in err[0] and err[0].startswith("error:")
    assert not (tmp_path / "e.json").exists()
    assert PRESETS["olmoe-1b-7b"].arch is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_engine_measure_tiny():
    doc = measure_engine(EnginePlan("qwen3-30b-a3b", device="cuda", tiny=True, **SMALL))
    assert doc["provenance"]["gpu"] != "none"
    pts = [p for row in doc["tables"]["decode"]["points"] for p in row]
    assert all(p is not None and p["ms"] > 0 for p in pts)
    assert {s: len(e["points"]) for s, e in doc["tables"]["experts"].items()} == {"hf-eager": 2, "grouped": 2}
