"""The accelerate baseline: transformers with its experts offloaded by accelerate, and simmoe's
``layer`` load mode that prices it (calibrate/executors/accelerate.py,
calibrate/validation/accelerate.py, bench/accelerate_baseline.py)."""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from calibrate.validation.accelerate import accelerate_rows, project_layer_baseline  # noqa: E402
from simulator.errors import InputError  # noqa: E402
from simulator.models import get_preset  # noqa: E402
from simulator.profile import load_profile, parse_profile  # noqa: E402
from simulator.runner import build_trace, cost_model  # noqa: E402
from simulator.scenario import parse_scenario  # noqa: E402

MODEL = "olmoe-1b-7b"


def trace(batch: int):
    sc = parse_scenario({"name": "acc", "model": MODEL, "profile": "h200", "batch_sizes": [batch],
                         "trace": {"generator": "zipf", "steps": 5, "zipf": 1.0, "prompt_tokens": 256},
                         "policies": [{"name": "dedup"}]}, "t.yaml")
    return sc, build_trace(sc, batch, 0, None)


def test_offloaded_experts_give_the_same_logits():
    pytest.importorskip("accelerate")
    from calibrate.executors.accelerate import offload_experts, time_decode
    from calibrate.models.build import build_model
    b = build_model(MODEL, tiny=True)
    ref = time_decode(b, batch=2, prompt=6, steps=2, device="cpu")["logits"]
    nbytes = offload_experts(b, "cpu")
    assert nbytes == b.spec.num_layers * b.spec.num_experts * b.spec.expert_bytes
    got = time_decode(b, batch=2, prompt=6, steps=2, device="cpu")
    assert torch.equal(got["logits"], ref) and len(got["steps_ms"]) == 2
    assert all(type(blk.experts).__name__ != "OffloadedExperts" for blk in b.moe_blocks())


def test_a_step_is_at_least_its_layers_pageable_copies_and_ignores_the_executor_pool():
    """accelerate copies each layer's fused expert tensors from pageable memory at every
    forward: the projected step holds L such copies (the host waits on each), priced by the
    profile's pageable curve; the executor's own pool copy (in_situ.pageable_copy) does not
    apply to transformers' styles."""
    spec = get_preset(MODEL)
    prof = load_profile("h200")
    sc, tr = trace(4)
    layer_copy = cost_model(sc, prof, 4).copy_ms(spec.num_experts * spec.expert_bytes, "pageable")
    for style in ("grouped", "hf-eager"):
        ms = project_layer_baseline(spec, tr, 256, prof, "h200", style, 1)
        assert ms >= spec.num_layers * layer_copy
        doc = copy.deepcopy(prof.to_json())
        doc["engine"][MODEL]["in_situ"]["pageable_copy"] = {"bytes": spec.expert_bytes, "ms": 50.0}
        assert project_layer_baseline(spec, tr, 256, parse_profile(doc, "p"), "p", style, 1) == ms


def test_rows_on_the_cpu_and_a_profile_without_the_tables_refused_before_the_build():
    pytest.importorskip("accelerate")
    rep = accelerate_rows(MODEL, tiny=True, device="cpu", batches=[1, 2], prompt=6, steps=2, warmup=1, project=False)
    assert [r["batch"] for r in rep["rows"]] == [1, 2] and all(r["live_median_ms"] > 0 for r in rep["rows"])
    with pytest.raises(InputError, match="engine.olmoe-1b-7b-tiny"):
        accelerate_rows(MODEL, tiny=True, device="cpu", batches=[1], prompt=6, steps=2)
    with pytest.raises(ValueError, match="transformers' own experts"):
        accelerate_rows(MODEL, style="offload", tiny=True, device="cpu", project=False)
