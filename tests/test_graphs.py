"""The ``graphs`` engine style (calibrate/executors/graphs.py) on tiny models, on the CPU: the
pieces around the routed experts give the model's own logits for every family, and the
offload executor in graphs dispatch decides what the simulator decides."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

from calibrate.executors.graphs import GraphedLayers, attention_mask, static_cache  # noqa: E402
from calibrate.executors.model import ModelExecutor, decode_inputs, record_routing  # noqa: E402
from calibrate.models.build import build_model  # noqa: E402
from simulator.planner import Planner  # noqa: E402
from simulator.scenario import PolicySpec  # noqa: E402

B, P, STEPS = 3, 4, 3
FAMILIES = ["olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v2-lite"]
POLICIES = [
    PolicySpec(name="dedup-lru-prefetch", load="dedup", cache={"kind": "lru", "capacity": 5},
               prefetch={"kind": "oracle"}),
    PolicySpec(name="cpu-miss", load="dedup", cache={"kind": "lru", "capacity": 3}, miss="cpu"),
    PolicySpec(name="accelerate-like", load="layer", cache={"kind": "none", "capacity": 8}),
]
COUNTED = ("transfers", "copies", "bytes_h2d", "cpu_computes")


def own_logits(name: str, device: str = "cpu", dtype: str = "fp32"):
    """The model's own decode logits (DynamicCache, every expert resident), and its inputs."""
    ref = build_model(name, tiny=True, dtype=dtype, device=device)
    prompt, next_ids = decode_inputs(ref.arch.vocab, B, STEPS, P, 0, device)
    cache = DynamicCache()
    with torch.no_grad():
        ref.model(input_ids=prompt, past_key_values=cache, use_cache=True)
        want = [ref.model(input_ids=next_ids[s], past_key_values=cache, use_cache=True).logits for s in range(STEPS)]
    return want, prompt, next_ids


def graphed_logits(name: str, prompt, next_ids, device: str = "cpu", dtype: str = "fp32"):
    b = build_model(name, tiny=True, dtype=dtype, device=device)
    cache = static_cache(b, P + STEPS)
    with torch.no_grad():
        b.model(input_ids=prompt, past_key_values=cache, use_cache=True)
    g = GraphedLayers(b)
    g.capture(B, P + STEPS, cache, position=P)
    return [g.run(next_ids[s], P + s).clone() for s in range(STEPS)], g


@pytest.mark.parametrize("name", FAMILIES)
def test_pieces_give_the_models_own_logits(name):
    """Static cache, position tensor and the routed experts between the pieces: the model's
    own logits at every step (MLA included)."""
    want, prompt, next_ids = own_logits(name)
    got, g = graphed_logits(name, prompt, next_ids)
    assert len(g.runs) == len(g.captures) + 1          # one piece per MoE layer, and the head
    for s in range(STEPS):
        torch.testing.assert_close(got[s], want[s], rtol=1e-5, atol=1e-5)
    # the experts modules are the model's own again after each eager run
    assert all(not type(blk.experts).__name__.startswith("Capture") for blk in g.b.moe_blocks())


def test_a_wrong_position_or_batch_is_refused():
    g = GraphedLayers(build_model("olmoe-1b-7b", tiny=True))
    g.capture(B, P + STEPS)
    with pytest.raises(ValueError, match="outside the static cache"):
        g.run(torch.zeros((B, 1), dtype=torch.long), P + STEPS)
    with pytest.raises(ValueError, match="captured for"):
        g.run(torch.zeros((B + 1, 1), dtype=torch.long), P)


def test_the_mask_hides_keys_past_the_position():
    m = attention_mask(torch.tensor(2), 5, torch.float32).flatten()
    assert m[:3].tolist() == [0.0, 0.0, 0.0] and (m[3:] == torch.finfo(torch.float32).min).all()


@pytest.mark.parametrize("name, policy", [("deepseek-v2-lite", 0), ("qwen3-30b-a3b", 1), ("olmoe-1b-7b", 2)])
def test_offload_graphs_executor_outputs_and_decisions(name, policy):
    """The offload executor in graphs dispatch: the model's own logits, and the simulator's
    decisions (the same counts as the other dispatches)."""
    want, _, _ = own_logits(name)
    trace = record_routing(build_model(name, tiny=True, dtype="fp32"), batch=B, steps=STEPS, prompt_tokens=P)
    b = build_model(name, tiny=True, dtype="fp32")
    pol = POLICIES[policy]
    ex = ModelExecutor(b, pol, trace, dispatch="graphs", prompt_tokens=P)
    sim = Planner(b.spec, pol, trace)
    L, k = b.spec.num_layers, b.spec.top_k
    for s in range(STEPS):
        step, _ = ex.run_step(s)
        _, expected = sim.plan_step(s)
        assert {c: step.executed[c] for c in COUNTED} == {c: expected.as_dict()[c] for c in COUNTED}
        assert step.executed["computed_tokens"] == B * k * L and step.executed["router_agrees"] == L
        torch.testing.assert_close(ex.last_logits, want[s], rtol=1e-4, atol=1e-4)
    assert isinstance(ex.graphs, GraphedLayers) and len(ex.graphs.runs) == L + 1   # the pieces ran the steps


def test_graphs_dispatch_refuses_a_serving_planner():
    b = build_model("olmoe-1b-7b", tiny=True)
    trace = record_routing(build_model("olmoe-1b-7b", tiny=True), batch=2, steps=2)
    with pytest.raises(ValueError, match="serving"):
        ModelExecutor(b, POLICIES[0], trace, dispatch="graphs", planner=Planner(b.spec, POLICIES[0], trace))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", FAMILIES)
def test_gpu_capture_and_replay(name):
    """On CUDA the pieces are captured once (in one shared memory pool) and replayed: the
    model's own logits (fp32, so a rounding cannot flip a router's choice)."""
    want, prompt, next_ids = own_logits(name, "cuda", "fp32")
    got, g = graphed_logits(name, prompt, next_ids, "cuda", "fp32")
    assert all(isinstance(getattr(r, "__self__", None), torch.cuda.CUDAGraph) for r in g.runs)
    for s in range(STEPS):
        torch.testing.assert_close(got[s], want[s], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_offload_graphs_executor():
    name = "qwen3-30b-a3b"
    want, _, _ = own_logits(name, "cuda", "bf16")
    trace = record_routing(build_model(name, tiny=True, device="cuda"), batch=B, steps=STEPS, prompt_tokens=P,
                           device="cuda")
    ex = ModelExecutor(build_model(name, tiny=True, device="cuda"), POLICIES[0], trace, device="cuda",
                       dispatch="graphs", prompt_tokens=P)
    sim = Planner(ex.spec, POLICIES[0], trace)
    for s in range(STEPS):
        step, _ = ex.run_step(s)
        _, expected = sim.plan_step(s)
        assert {c: step.executed[c] for c in COUNTED} == {c: expected.as_dict()[c] for c in COUNTED}
        torch.testing.assert_close(ex.last_logits.float(), want[s].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prompt,steps", [(256, 8), (256, 12), (4000, 10)])
def test_gpu_offload_graphs_captures_at_the_validation_lengths(prompt, steps):
    """The full-width OLMoE layer pieces capture over a static cache of prompt + steps tokens:
    on the H200 a cache of 264 tokens (256 + 8) failed at capture
    (cudaErrorStreamCaptureInvalidated) where 268 captured (docs/validation.md); a multiple of
    8 now gets one masked key more (graphed_cache_len)."""
    from calibrate.models.build import build_model as build
    b = build("olmoe-1b-7b", layers=2, device="cuda")
    trace = record_routing(b, batch=4, steps=steps, prompt_tokens=prompt, device="cuda")
    ex = ModelExecutor(b, POLICIES[0], trace, device="cuda", dispatch="graphs", prompt_tokens=prompt)
    for s in range(steps):
        ex.run_step(s)
    ex.release()


def test_a_graphed_cache_is_never_a_multiple_of_8_keys():
    from calibrate.executors.model import graphed_cache_len
    assert [graphed_cache_len(n) for n in (264, 268, 4008, 4010, 129)] == [265, 268, 4009, 4010, 129]
