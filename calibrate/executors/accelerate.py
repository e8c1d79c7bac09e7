"""The baseline users run today: transformers with its routed experts offloaded by accelerate.

accelerate's offload (``device_map`` with experts on ``"cpu"``, or :func:`accelerate.cpu_offload`,
as DeepSpeed ZeRO-Inference does likewise) keeps a module's weights in host memory and copies
every one of them to the GPU at each forward of the module, used or not, then drops them. Here
each MoE block's ``experts`` module (transformers' fused experts: ``gate_up_proj`` and
``down_proj`` of every expert, two tensors) is offloaded so; the rest of the model stays on the
GPU. So each MoE layer of each step copies the layer's every expert from pageable memory in
two copies, and computes its routed experts with transformers' own experts implementation
(``hf-eager``: the per-expert loop; ``grouped``: grouped_mm).

simmoe prices this as the ``layer`` load mode (every expert of a layer copied at each forward,
pageable, no cache) in the engine style of the experts implementation
(:func:`layer_baseline_policy`); ``bench/accelerate_baseline.py`` runs both and reports the
distance, so that a speed-up simmoe projects can be stated against what users run.
"""
from __future__ import annotations

import statistics
import time

import torch

from calibrate.models.build import BuiltModel
from simulator.scenario import PolicySpec


def layer_baseline_policy(num_experts: int) -> PolicySpec:
    """The policy that prices accelerate's offload: a layer's every expert copied at each
    forward from pageable memory, nothing kept."""
    return PolicySpec(name="accelerate-offload", load="layer", memory="pageable",
                      cache={"kind": "none", "capacity": num_experts})


def offload_experts(built: BuiltModel, device: str) -> int:
    """Offload every MoE block's routed experts with accelerate (weights in pageable host
    memory, copied to ``device`` at each forward and dropped after); returns the bytes each
    step copies (every MoE layer's experts)."""
    from accelerate import cpu_offload

    nbytes = 0
    for blk in built.moe_blocks():
        experts = blk.experts
        nbytes += sum(p.numel() * p.element_size() for p in experts.parameters())
        experts.to("cpu")
        cpu_offload(experts, execution_device=torch.device(device))
    return nbytes


def time_decode(built: BuiltModel, *, batch: int, prompt: int, steps: int, warmup: int = 1, seed: int = 0,
                device: str = "cuda") -> dict:
    """The model's own decode steps after a ``prompt``-token prefill (the same inputs as
    :func:`calibrate.executors.model.record_routing` with the same seed): each step's ms,
    synchronised. ``{"steps_ms", "median_ms", "warmup_ms"}``; the last step's logits as
    ``logits`` (for the equality test)."""
    from transformers import DynamicCache

    from calibrate.executors.model import decode_inputs, prefill

    ids, nxt = decode_inputs(built.arch.vocab, batch, warmup + steps, prompt, seed, device)
    cuda = str(device).startswith("cuda")
    cache = DynamicCache()
    out, logits = [], None
    with torch.no_grad():
        prefill(built.model, ids, cache)
        for s in range(warmup + steps):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            logits = built.model(input_ids=nxt[s], past_key_values=cache, use_cache=True).logits
            if cuda:
                torch.cuda.synchronize(device)
            out.append((time.perf_counter() - t0) * 1e3)
    timed = out[warmup:]
    return {"steps_ms": timed, "median_ms": statistics.median(timed), "warmup_ms": out[:warmup], "logits": logits}
