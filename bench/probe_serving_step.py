"""Probe: what does the serving forward add to a decode step? (issue 15)

On the H200 (2026-12-02) OLMoE's live serving decode steps took 36-55 ms after the first
rows where their replay projected 33-37 ms (docs/serving.md, "Live on the H200"). The serving
executor (``calibrate/executors/serving.py``) runs each step as transformers' batched forward
with a padding mask of (batch, past + new) tokens and left-padded caches, while the
calibration's decode grid times a layer with no mask over equal-length sequences. This probe
times one whole decode forward of the model (every expert resident: the non-expert part is
what differs) at each (batch, context) in three ways, on the same cache:

- ``plain``: no attention mask, equal-length sequences (as ``calibrate engine`` and
  ``validate --executor model`` run a step);
- ``mask``: a 2-D attention mask of ones, as the serving forward passes one;
- ``ragged``: each sequence's past a different length, left-padded to the longest, with the
  mask marking the padding (the serving forward at a step of mixed requests).

    python bench/probe_serving_step.py --out DIR [--batches 1,4] [--contexts 256,1024] [--layers N]
    python bench/probe_serving_step.py --out /tmp/p --tiny --device cpu   # a CPU check (seconds)

Writes DIR/probe-serving-step.json: per (batch, context) the median ms of each way (and its
p10/p90 over the trials) and each way over ``plain``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from calibrate.measurements.engine import contiguous_kv
from calibrate.models.build import build_model


def filled_cache(built, batch: int, context: int, device, gen: torch.Generator):
    """A DynamicCache of ``context`` random tokens per sequence in every layer, with the
    layers' own key/value shapes (one real forward of one token gives them)."""
    from transformers import DynamicCache

    probe = DynamicCache()
    with torch.no_grad():
        built.model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), past_key_values=probe,
                    use_cache=True)
    cache = DynamicCache()
    for i, lay in enumerate(probe.layers):
        k, v = lay.keys, lay.values
        dt = k.dtype
        kk = torch.randn((batch, k.shape[1], context, k.shape[3]), generator=gen, device=device).to(dt)
        vv = torch.randn((batch, v.shape[1], context, v.shape[3]), generator=gen, device=device).to(dt)
        cache.update(kk, vv, i)
    return cache


def time_step(fn, trials: int, sync) -> list[float]:
    out = []
    for _ in range(trials):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="olmoe-1b-7b")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--contexts", default="256,1024")
    ap.add_argument("--layers", type=int, help="keep the first N decoder layers")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small dimensions (a CPU check of the script)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    built = build_model(a.model, layers=a.layers, tiny=a.tiny, device=dev)
    build_s = time.perf_counter() - t0
    vocab = built.arch.vocab
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for B in [int(x) for x in a.batches.split(",")]:
        for C in [int(x) for x in a.contexts.split(",")]:
            cache = filled_cache(built, B, C, dev, gen)
            ids = torch.randint(0, vocab, (B, 1), generator=gen, device=dev)
            pos = torch.full((B, 1), C, dtype=torch.long, device=dev)
            ones = torch.ones((B, C + 1), dtype=torch.long, device=dev)
            ragged = ones.clone()
            pasts = np.linspace(C, max(1, C // 4), B).astype(int) if B > 1 else np.array([C])
            for b, p in enumerate(pasts):        # left padding: the first C - p positions unused
                ragged[b, :C - p] = 0
            ragged_pos = torch.tensor(pasts, device=dev).view(B, 1)

            kept = [contiguous_kv(cache, i) for i in range(len(cache.layers))]

            def run(mask, position):
                def fn():
                    # back to C tokens (each trial appends one): the filled tensors, not a crop's
                    # strided view (calibrate.measurements.engine.restore_kv)
                    for lay, kv in zip(cache.layers, kept):
                        lay.keys, lay.values = kv
                    with torch.no_grad():
                        built.model(input_ids=ids, position_ids=position, attention_mask=mask,
                                    past_key_values=cache, use_cache=True)
                return fn
            ways = {"plain": run(None, pos), "mask": run(ones, pos), "ragged": run(ragged, ragged_pos)}
            row = {"batch": B, "context": C}
            for name, fn in ways.items():
                for _ in range(3):               # warm-up: kernels, allocator, mask builders
                    fn()
                ms = time_step(fn, a.trials, sync)
                row[name] = {"median_ms": statistics.median(ms), "p10_ms": float(np.percentile(ms, 10)),
                             "p90_ms": float(np.percentile(ms, 90))}
            for name in ("mask", "ragged"):
                row[f"{name}_over_plain"] = row[name]["median_ms"] / row["plain"]["median_ms"]
            rows.append(row)
            print(f"B={B:<3} context {C:>5}: plain {row['plain']['median_ms']:7.2f} ms, mask "
                  f"{row['mask']['median_ms']:7.2f} ({row['mask_over_plain']:.2f}x), ragged "
                  f"{row['ragged']['median_ms']:7.2f} ({row['ragged_over_plain']:.2f}x)", flush=True)
            del cache
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    doc = {"model": built.spec.name, "layers": len(built.decoder_layers), "device": str(dev),
           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none", "torch": torch.__version__,
           "trials": a.trials, "build_s": build_s, "elapsed_s": time.perf_counter() - t0, "rows": rows}
    (a.out / "probe-serving-step.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
