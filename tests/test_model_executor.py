"""The real-model executor (calibrate/executors/model.py) on tiny models, on the CPU: its
decisions equal the simulator's, and its outputs equal the model's own."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

from calibrate.executors.model import ModelExecutor, decode_inputs, record_routing  # noqa: E402
from calibrate.models.build import build_model  # noqa: E402
from simulator.planner import Planner, StepRouting  # noqa: E402
from simulator.policies.load import Layer  # noqa: E402
from simulator.scenario import PolicySpec  # noqa: E402
from simulator.traces import generate  # noqa: E402

B, STEPS = 3, 4
POLICIES = [
    PolicySpec(name="per-item", load="per-item"),
    PolicySpec(name="dedup-lru-prefetch", load="dedup", cache={"kind": "lru", "capacity": 5},
               prefetch={"kind": "oracle"}),
    PolicySpec(name="coalesced-lru", load="coalesced", cache={"kind": "lru", "capacity": 4}),
    PolicySpec(name="cpu-miss", load="dedup", cache={"kind": "lru", "capacity": 3}, miss="cpu"),
]
COUNTED = ("transfers", "copies", "bytes_h2d", "cpu_computes")


def check_against_simulator(built, policy, trace, dispatch="loop"):
    ex = ModelExecutor(built, policy, trace, dispatch=dispatch)
    sim = Planner(built.spec, policy, trace)
    L, k = built.spec.num_layers, built.spec.top_k
    steps = []
    for s in range(trace.num_steps):
        step, decisions = ex.run_step(s)
        _, expected = sim.plan_step(s)
        want = expected.as_dict()
        assert {c: step.executed[c] for c in COUNTED} == {c: want[c] for c in COUNTED}, (policy.name, s)
        assert step.executed["computed_tokens"] == B * k * L        # every routed pair served once
        assert step.executed["denses"] == L
        steps.append(step)
    return steps


@pytest.mark.parametrize("name, policies", [("olmoe-1b-7b", POLICIES), ("deepseek-v2-lite", POLICIES[1::2]),
                                            ("qwen3-30b-a3b", POLICIES[::2])])
def test_own_router_decisions_equal_the_simulators(name, policies):
    trace = record_routing(build_model(name, tiny=True, dtype="fp32"), batch=B, steps=STEPS)
    for policy in policies:
        steps = check_against_simulator(build_model(name, tiny=True, dtype="fp32"), policy, trace)
        # the model's own router chose, at every MoE layer of every step, what the trace forced
        assert all(st.executed["router_agrees"] == trace.num_layers for st in steps)


def test_forced_routing_from_a_synthetic_trace():
    b = build_model("mixtral-8x7b", tiny=True, dtype="fp32")
    trace = generate(num_layers=b.spec.num_layers, num_experts=b.spec.num_experts, top_k=b.spec.top_k,
                     batch_size=B, steps=STEPS, seed=3, zipf=1.0)
    check_against_simulator(b, POLICIES[1], trace)


def test_grouped_dispatch_decisions_equal_the_simulators():
    b = build_model("qwen3-30b-a3b", tiny=True, dtype="fp32")
    trace = record_routing(b, batch=B, steps=STEPS)
    for policy in POLICIES:
        check_against_simulator(build_model("qwen3-30b-a3b", tiny=True, dtype="fp32"), policy, trace, "grouped")


@pytest.mark.parametrize("dispatch, policy, upload_first", [("loop", 3, True), ("grouped", 1, True), ("grouped", 0, True),
                                                         ("grouped", 2, True), ("grouped", 2, False)])
def test_outputs_equal_the_models_own(dispatch, policy, upload_first):
    """Offloaded experts computed from slots and host weights give the model's own logits,
    one FFN per expert or one grouped GEMM per call (its indices sent before its wait, the
    executor's order, or after it, the old one)."""
    check_outputs(dispatch, policy, upload_first)


def reference_logits(name: str, after_prefill=None):
    """(the model's own routing trace, its decode logits with every expert resident); with
    ``after_prefill``, a function applied to the reference model between the prompt's prefill
    and the decode steps."""
    trace = record_routing(build_model(name, tiny=True, dtype="fp32"), batch=B, steps=STEPS)
    ref = build_model(name, tiny=True, dtype="fp32")
    prompt, next_ids = decode_inputs(ref.arch.vocab, B, STEPS, 4, 0, "cpu")
    cache = DynamicCache()
    with torch.no_grad():
        ref.model(input_ids=prompt, past_key_values=cache, use_cache=True)
        if after_prefill is not None:
            after_prefill(ref)
        want = [ref.model(input_ids=next_ids[s], past_key_values=cache, use_cache=True).logits for s in range(STEPS)]
    return trace, want


def check_outputs(dispatch: str, policy: int, upload_first: bool = True) -> None:
    name = "deepseek-v2-lite"
    trace, want = reference_logits(name)
    ex = ModelExecutor(build_model(name, tiny=True, dtype="fp32"), POLICIES[policy], trace, dispatch=dispatch)
    ex.upload_first = upload_first
    for s in range(STEPS):
        ex.run_step(s)
        torch.testing.assert_close(ex.last_logits, want[s], rtol=1e-4, atol=1e-4)


def test_grouped_calls_wider_than_the_kernels_group_limit_split_into_windows(monkeypatch):
    """torch's grouped GEMM takes at most 1024 groups: a call whose slots spread wider is one
    GEMM pair per window of slots, with the same logits (the limit made 2 here)."""
    import calibrate.executors.model as mod
    calls = []
    real = mod.grouped_mm
    monkeypatch.setattr(mod, "GROUPED_MAX", 2)
    monkeypatch.setattr(mod, "grouped_mm", lambda x, w, offs: calls.append(w.shape[0]) or real(x, w, offs))
    check_outputs("grouped", 0)
    assert calls and max(calls) <= 2


def test_layer_load_mode_copies_every_expert_each_forward():
    routing = np.array([[[2], [1]], [[2], [3]], [[0], [3]]])          # 3 tokens, 2 layers, top-1
    per_layer = Layer().requests(StepRouting(routing, 4))
    assert per_layer == [([0, 1, 2, 3], [1, 0, 2, 0]), ([4, 5, 6, 7], [0, 1, 0, 2])]
    b = build_model("olmoe-1b-7b", tiny=True, dtype="fp32")
    E, L = b.spec.num_experts, b.spec.num_layers
    trace = record_routing(build_model("olmoe-1b-7b", tiny=True, dtype="fp32"), batch=B, steps=2)
    policy = PolicySpec(name="accelerate-like", load="layer", cache={"kind": "none", "capacity": E})
    for step in check_against_simulator(b, policy, trace):
        assert step.executed["transfers"] == E * L and step.executed["copies"] == L
        assert step.executed["bytes_h2d"] == E * L * b.spec.expert_bytes


@pytest.mark.parametrize("name", ["olmoe-1b-7b", "deepseek-v2-lite"])
def test_chunked_prefill_gives_the_one_shot_caches_next_logits(name):
    """A prompt prefilled in chunks of positions (a long prompt at a large batch) leaves the
    cache that one forward leaves: the next token's logits agree, in a dynamic and a static cache."""
    import torch
    from calibrate.executors.graphs import static_cache
    from calibrate.executors.model import prefill
    b = build_model(name, tiny=True, dtype="fp32")
    prompt, nxt = decode_inputs(b.arch.vocab, 3, 1, 40, 0, "cpu")
    outs = []
    for chunk in (None, 3 * 16, 3 * 25):
        for static in (False, True):
            cache = static_cache(b, 41) if static else DynamicCache()
            with torch.no_grad():
                if chunk is None:
                    b.model(input_ids=prompt, past_key_values=cache, use_cache=True)
                else:
                    prefill(b.model, prompt, cache, chunk_tokens=chunk)
                outs.append(b.model(input_ids=nxt[0], past_key_values=cache, use_cache=True,
                                    cache_position=torch.tensor([40])).logits)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-4, atol=1e-4)


def test_prefill_traces_are_refused():
    b = build_model("olmoe-1b-7b", tiny=True)
    trace = generate(num_layers=b.spec.num_layers, num_experts=b.spec.num_experts, top_k=b.spec.top_k,
                     batch_size=2, steps=2, seed=0, prefill_tokens=3)
    with pytest.raises(ValueError, match="decode steps only"):
        ModelExecutor(b, POLICIES[0], trace)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("memory,dispatch,upload_first,miss", [
    ("pinned", "loop", True, "copy"), ("pageable", "loop", True, "copy"), ("pinned", "grouped", True, "copy"),
    ("pinned", "grouped", False, "copy"), ("pinned", "grouped", True, "direct")])
def test_gpu_executor_decisions_and_outputs(memory, dispatch, upload_first, miss):
    """On CUDA (bf16, copy stream, events): decisions equal the simulator's, the outputs the
    model's own with every expert resident; the grouped dispatch with its index upload before
    its wait (the executor's order) and after it (the old one) alike, and direct reads (the
    kernels read pinned host weights mapped into the GPU's address space)."""
    name = "qwen3-30b-a3b"
    trace = record_routing(build_model(name, tiny=True, device="cuda"), batch=B, steps=STEPS, device="cuda")
    policy = PolicySpec(name="g", load="dedup", memory=memory, cache={"kind": "lru", "capacity": 5},
                        prefetch={"kind": "oracle"}, miss=miss)
    ex = ModelExecutor(build_model(name, tiny=True, device="cuda"), policy, trace, device="cuda", dispatch=dispatch)
    ex.upload_first = upload_first
    sim = Planner(ex.spec, policy, trace)
    ref = build_model(name, tiny=True, device="cuda")
    prompt, next_ids = decode_inputs(ref.arch.vocab, B, STEPS, 4, 0, "cuda")
    cache = DynamicCache()
    with torch.no_grad():
        ref.model(input_ids=prompt, past_key_values=cache, use_cache=True)
        for s in range(STEPS):
            want = ref.model(input_ids=next_ids[s], past_key_values=cache, use_cache=True).logits
            step, _ = ex.run_step(s)
            exp = sim.plan_step(s)[1].as_dict()
            assert {c: step.executed[c] for c in COUNTED + ("direct_computes",)} == \
                {c: exp[c] for c in COUNTED + ("direct_computes",)}
            torch.testing.assert_close(ex.last_logits, want, rtol=2e-2, atol=2e-2)


def test_a_finished_row_releases_its_executor_and_an_oom_is_one_line(monkeypatch):
    """run_live frees each executor's memory when its row ends (the blocks keep only their
    activation), and a row that runs out of GPU memory stops with one clear error naming it."""
    import torch
    from calibrate.executors.model import ReleasedExperts
    from calibrate.validation.model_rows import run_live
    from simulator.errors import InputError
    b = build_model("olmoe-1b-7b", tiny=True, dtype="fp32")
    from calibrate.executors.model import host_experts
    trace = record_routing(b, batch=2, steps=2)
    host = host_experts(b, pinned=False)
    lru, dedup = POLICIES[1], POLICIES[0]
    steps, same = run_live(b, lru, trace, device="cpu", host=host, prompt=4)
    assert same and len(steps) == 2
    assert all(isinstance(blk.experts, ReleasedExperts) for blk in b.moe_blocks())
    with pytest.raises(RuntimeError, match="released"):
        b.moe_blocks()[0].experts(None, None, None)
    steps, same = run_live(b, dedup, trace, device="cpu", host=host, prompt=4)   # a new row runs
    assert same

    def oom(self, s):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB.")
    monkeypatch.setattr(ModelExecutor, "run_step", oom)
    with pytest.raises(InputError, match=r"row dedup-lru-prefetch B=2 prompt 4: out of GPU memory \(CUDA out"):
        run_live(b, lru, trace, device="cpu", host=host, prompt=4)


QUANT_POLICY = dict(name="q", load="dedup", cache={"kind": "lru", "capacity": 5}, prefetch={"kind": "oracle"})


@pytest.mark.parametrize("dtype", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
def test_quantised_copies_decisions_equal_the_simulators(dtype, dispatch):
    """A policy with quantised experts (``expert_dtype``) in the real model: each load copies
    the stored bytes (fewer than the model's), each dequantise the planner asks for runs, and
    every count equals the simulator's, dequantises included."""
    name = "qwen3-30b-a3b"
    trace = record_routing(build_model(name, tiny=True, dtype="fp32"), batch=B, steps=STEPS)
    policy = PolicySpec(**QUANT_POLICY, expert_dtype=dtype)
    ex = ModelExecutor(build_model(name, tiny=True, dtype="fp32"), policy, trace, dispatch=dispatch)
    sim = Planner(ex.spec, policy, trace)
    full = ex.spec.expert_bytes
    for s in range(STEPS):
        st, dec = ex.run_step(s)
        exp = sim.plan_step(s)[1].as_dict()
        assert dec.as_dict() == exp
        assert {c: st.executed[c] for c in COUNTED + ("dequants",)} == {c: exp[c] for c in COUNTED + ("dequants",)}
        if st.executed["transfers"]:
            assert st.executed["bytes_h2d"] < st.executed["transfers"] * full * (0.6 if dtype == "int4" else 1.0)
    assert ex.stage.dtype == torch.uint8 and ex.host_q[0][0].numel() == ex.stage.shape[1]


def test_quantised_copies_give_the_logits_of_the_round_tripped_experts():
    """The decode logits with int4 experts are the model's own with each expert's weights
    replaced by their quantise -> dequantise round trip (the prompt's prefill reads the
    full-precision weights in both), and they differ from the full-precision model's."""
    from calibrate.executors.quant import dequantise, quantise

    def round_trip(ref):
        for blk in ref.moe_blocks():
            for w in (blk.experts.gate_up_proj, blk.experts.down_proj):
                for e in range(w.shape[0]):
                    flat = w[e].reshape(-1)
                    w[e].copy_(dequantise(quantise(flat, "int4"), "int4", torch.empty_like(flat)).view_as(w[e]))
    name = "deepseek-v2-lite"
    _, plain = reference_logits(name)
    trace, want = reference_logits(name, round_trip)
    full = plain[0]
    ex = ModelExecutor(build_model(name, tiny=True, dtype="fp32"), PolicySpec(**QUANT_POLICY, expert_dtype="int4"),
                       trace, dispatch="grouped")
    for s in range(STEPS):
        ex.run_step(s)
        torch.testing.assert_close(ex.last_logits, want[s], rtol=1e-4, atol=1e-4)
    assert (want[0] - full).abs().max() > 1e-3     # int4 moves the logits: the test can fail


@pytest.mark.parametrize("extra, match", [
    ({"miss": {"kind": "cheapest"}}, "needs the projection's cost model"),
    ({"host": {"capacity": 8}}, "disk tiers run live in the twin executor only"),
    ({"expert_dtype": "int8", "miss": "cpu"}, "cpu misses of quantised experts"),
    ({"expert_dtype": "int4", "miss": "direct"}, "direct misses of quantised experts"),
])
def test_tier_policies_the_real_model_does_not_run_are_refused_in_one_line(extra, match):
    b = build_model("qwen3-30b-a3b", tiny=True, dtype="fp32")
    trace = record_routing(b, batch=B, steps=2)
    with pytest.raises(ValueError, match=match):
        ModelExecutor(b, PolicySpec(**{**QUANT_POLICY, **extra}), trace)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_gpu_quantised_copies_decisions_and_counts(dtype):
    """On CUDA (pinned stored bytes, the copy stream into staging buffers, dequantises on the
    compute stream): decisions and counts equal the simulator's, and the logits stay finite."""
    name = "qwen3-30b-a3b"
    trace = record_routing(build_model(name, tiny=True, device="cuda"), batch=B, steps=STEPS, device="cuda")
    policy = PolicySpec(**QUANT_POLICY, expert_dtype=dtype)
    ex = ModelExecutor(build_model(name, tiny=True, device="cuda"), policy, trace, device="cuda", dispatch="grouped")
    sim = Planner(ex.spec, policy, trace)
    for s in range(STEPS):
        st, dec = ex.run_step(s)
        exp = sim.plan_step(s)[1].as_dict()
        assert dec.as_dict() == exp
        assert {c: st.executed[c] for c in COUNTED + ("dequants",)} == {c: exp[c] for c in COUNTED + ("dequants",)}
        assert torch.isfinite(ex.last_logits).all()
    assert ex.host_q[0][0].is_pinned()


@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
@pytest.mark.parametrize("max_tokens", [None, 1])
def test_direct_reads_decisions_and_logits_equal_the_simulators_and_the_models(dispatch, max_tokens):
    """``miss: direct`` in the real model: each miss the planner sends to a direct read is
    computed from the expert's host weights in its place among the layer's operations (no
    slot, no copy); decisions and counts are the simulator's, and the logits the model's own
    with every expert resident (the same weights, read from elsewhere)."""
    name = "deepseek-v2-lite"
    trace, want = reference_logits(name)
    miss = {"kind": "direct", **({"max_tokens": max_tokens} if max_tokens else {})}
    policy = PolicySpec(name="d", load="dedup", cache={"kind": "lru", "capacity": 4}, miss=miss)
    ex = ModelExecutor(build_model(name, tiny=True, dtype="fp32"), policy, trace, dispatch=dispatch)
    sim = Planner(ex.spec, policy, trace)
    direct = 0
    for s in range(STEPS):
        st, dec = ex.run_step(s)
        exp = sim.plan_step(s)[1].as_dict()
        assert dec.as_dict() == exp
        assert {c: st.executed[c] for c in COUNTED + ("direct_computes",)} == \
            {c: exp[c] for c in COUNTED + ("direct_computes",)}
        direct += st.executed["direct_computes"]
        torch.testing.assert_close(ex.last_logits, want[s], rtol=1e-4, atol=1e-4)
    assert direct > 0

