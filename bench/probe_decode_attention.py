"""Probe: does the real model meet a decode layer's GPU work as the isolated table does?

On the H200 (2026-12-04, docs/validation.md) OLMoE's isolated decode table put the GPU work
alone of one layer at B=16 and context 4,032 at 1.92 ms (an eager layer over a filled
``DynamicCache``), while the live resident step of the whole 16-layer model at B=16 and
context 4,000 took 29.5 ms, experts included: less than the table's 16 x 1.92 ms. So at
large batch x context the real model's layer is cheaper than the isolated one, and the
projection of every row there is slow (resident +97%, dedup and LRU +6 to +8%).

Its first run on the H200 (2026-12-04, seventh session) found the isolated and the model's
layer alike (1.85 and 1.87 ms), 1.59 ms of each in one cat kernel (``CatArrayBatchedCopy``,
2-byte elements): both put the cache back after each step with a crop, which leaves a strided
view whose next append takes the GPU's element-wise path. A running model's cache is the
contiguous tensor the last append wrote. The calibration now puts the filled tensors back
instead (:func:`calibrate.measurements.engine.restore_kv`); this probe times both ways.

It times, at each (batch, context), with torch.profiler (CUPTI: the GPU's own timestamps),
per decode step:

- ``isolated``: the calibration's own call (:class:`calibrate.measurements.engine.EngineMeasurer`:
  one MoE layer, its routed experts left out, over a filled ``DynamicCache`` of ``context``
  tokens, ``attention_mask=None``), as ``simmoe calibrate engine`` times it;
- ``isolated_crop``: the same, the cache cropped back after each trial (the calibration
  before 2026-12-04);
- ``model``: the model's own decode forward (the first ``--layers`` decoder layers, their
  routed experts left out as in the isolated call), its cache prefilled with ``context``
  prompt tokens and its filled tensors put back after each step, per decoder layer (the
  embedding and LM head spread over the layers).

For each: GPU ms per layer, and the kernels behind it (name, calls, us per layer), so the
attention kernel each path takes is named. Writes ``--out``/probe-decode-attention.json.

    python bench/probe_decode_attention.py --out DIR [--model olmoe-1b-7b] [--points 16x4032,4x4032,64x256]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from calibrate.executors.model import decode_inputs, prefill
from calibrate.measurements.engine import EngineMeasurer, EnginePlan, _null_experts, contiguous_kv
from calibrate.models.build import build_model

STEPS = 6


def profiled(fn, steps: int, per: int, cuda: bool) -> dict:
    """``fn`` run ``steps`` times under the profiler: GPU ms per unit (``per`` units a call)
    and the kernels (the profiler's device-side events only, so no CPU op's launch is counted
    beside its kernel), heaviest first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    for _ in range(2):
        fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    by_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    total = sum(sum(v) for v in by_name.values())
    kernels = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    return {"gpu_ms_per_layer": total / 1e3 / steps / per,
            "kernels": [{"name": name[:120], "calls_per_layer": len(v) / steps / per,
                         "us_per_layer": sum(v) / steps / per} for name, v in kernels[:12]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", default="olmoe-1b-7b")
    ap.add_argument("--points", default="16x4032,4x4032,64x1024,1x256", help="BxCONTEXT,...")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the model to build")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="two small layers (a CPU smoke test)")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    points = [tuple(int(x) for x in p.split("x")) for p in a.points.split(",")]
    built = build_model(a.model, tiny=a.tiny, layers=None if a.tiny else a.layers, device=a.device)
    _null_experts(built)   # both paths without their routed experts: the non-expert work alone
    m = EngineMeasurer(EnginePlan(a.model, device=a.device, tiny=a.tiny), built)
    idx = m.layer_idx
    shapes = m.kv_shapes(idx)
    n_layers = len(built.decoder_layers)
    rows = []
    for B, C in points:
        call = m._layer_call(idx, B, 1, C, m.filled_cache(idx, B, C, shapes))
        iso = profiled(call, STEPS, 1, cuda)
        cache = m.filled_cache(idx, B, C, shapes)
        call = m._layer_call(idx, B, 1, C, cache)

        def cropped(call=call, cache=cache):
            extra = cache.get_seq_length(idx) - C
            if extra > 0:
                cache.layers[idx].crop(-extra)
            return call()
        iso_crop = profiled(cropped, STEPS, 1, cuda)
        call = cache = cropped = None
        from transformers import DynamicCache
        prompt, nxt = decode_inputs(built.arch.vocab, B, 1, C, 0, a.device)
        cache = DynamicCache()
        with torch.no_grad():
            prefill(built.model, prompt, cache)
        kept = [contiguous_kv(cache, i) for i in range(len(cache.layers))]

        def step():
            for lay, kv in zip(cache.layers, kept):   # back to the prompt: every step appends one
                lay.keys, lay.values = kv
            with torch.no_grad():
                built.model(input_ids=nxt[0], past_key_values=cache, use_cache=True,
                            cache_position=torch.arange(C, C + 1, device=nxt.device))
        own = profiled(step, STEPS, n_layers, cuda)
        cache = None
        if cuda:
            torch.cuda.empty_cache()
        rows.append({"batch": B, "context": C, "isolated": iso, "isolated_crop": iso_crop, "model": own})
        print(f"B={B:3d} context {C:5d}: GPU ms per layer isolated {iso['gpu_ms_per_layer']:.3f}, "
              f"cropped {iso_crop['gpu_ms_per_layer']:.3f}, in the model {own['gpu_ms_per_layer']:.3f} "
              f"(its head and embedding spread over {n_layers} layers)")
        for name, r in (("isolated", iso), ("cropped", iso_crop), ("model", own)):
            for k in r["kernels"][:4]:
                print(f"  {name:8s} {k['us_per_layer']:8.1f} us x{k['calls_per_layer']:.1f}  {k['name'][:60]}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "probe-decode-attention.json").write_text(json.dumps(
        {"model": a.model, "layers": n_layers, "device": a.device, "steps": STEPS, "points": rows}, indent=1))


if __name__ == "__main__":
    main()
