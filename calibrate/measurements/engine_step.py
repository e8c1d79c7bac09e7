"""The engine's terms as a whole decode step meets them (``simmoe calibrate engine --in-situ``).

The engine tables (:mod:`calibrate.measurements.engine`) time one decoder layer and one
routed-expert call in isolation, twenty trials back to back. In a real step the host runs a
long, varied code path (every layer's attention, router and experts in turn), and on the H200
host an eager step of OLMoE-1B-7B took 1.4x the sum of its isolated parts (docs/validation.md).
So this measures the whole model, every decoder layer built, through
:class:`calibrate.executors.model.ModelExecutor` on its own router's routing:

- ``null``: every routed-expert call replaced by zeros right after the router's choice has
  come to the host (the engine around the experts, plus the route sync);
- ``resident``: every expert resident in the executor's slots (the ``resident`` policy);
- ``styles``: the same resident steps in each grouped style measured (``offload-grouped``,
  ``offload-graphs``: the executor's grouped dispatch, the second between CUDA-graph replays),
  whose host terms a step meets differently from the per-expert loop's;
- ``pageable_copy``: every routed expert of the executor's pageable host pool (one tensor per
  expert, as :func:`calibrate.executors.model.host_experts` lays them out) copied to a GPU
  slot, a layer's experts back to back, as the layer baseline copies them. On the H200 these
  ran at 6.1-6.5 GB/s for OLMoE's 12.6 MB experts while the profile's pageable fit (slices
  of one buffer) said 7.9 GB/s, so every layer-baseline row was projected 18-22% fast.

Per (batch, context) point the median step of each, and the isolated tables' sum for the same
step, give two factors the profile keeps (``engine.<model>.in_situ``): ``dense`` =
(null step - head) / (layers x isolated layer), ``experts`` = (resident - null) / (MoE layers
x isolated offload call at the step's active experts), and per grouped style its own
``experts`` factor (its resident step less the step around its experts: the eager null step,
or for a graphed style the head and its replayed decode table, over MoE layers x its isolated
call). The simulator multiplies the decode table and the style's host terms by them (:class:`simulator.engine_costs.DenseCost`);
:func:`calibrate.measurements.engine_profile.in_situ_factors` computes them.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from calibrate.executors.model import ModelExecutor, host_experts, record_routing
from calibrate.models.build import build_model

STEP_BATCHES = [1, 4, 16, 64]
STEP_CONTEXTS = [256]
STEP_STEPS = 8
STEP_WARMUP = 2
STEP_PASSES = 3     # passes over the points (each point's runs in every pass)
COPY_PASSES = 2      # passes over the whole pageable pool (the first pass timed too: no warm-up)


def pageable_copy(host: list[list[torch.Tensor]], device: str, passes: int = COPY_PASSES) -> dict | None:
    """The ms of one expert's copy from the executor's pageable pool, as the layer baseline
    meets it: per layer, its experts copied back to back into a layer's worth of GPU slots on a
    copy stream (each copy from pageable memory returns to the host when done), the layer's
    wall time over its experts. ``{"bytes", "ms" (median over layers and passes), "p10",
    "p90", "n", "gbps"}``; None off CUDA (no copy engine to time)."""
    if not str(device).startswith("cuda") or not host or not host[0]:
        return None
    first = host[0][0]
    slots = torch.empty((len(host[0]), first.numel()), dtype=first.dtype, device=device)
    stream = torch.cuda.Stream(device)
    per = []
    torch.cuda.synchronize(device)
    for _ in range(passes):
        for layer in host:
            t0 = time.perf_counter()
            with torch.cuda.stream(stream):
                for i, src in enumerate(layer):
                    slots[i].copy_(src, non_blocking=True)
            stream.synchronize()
            per.append((time.perf_counter() - t0) * 1e3 / len(layer))
    nbytes = first.numel() * first.element_size()
    q = np.percentile(per, [10, 50, 90])
    del slots
    return {"bytes": int(nbytes), "ms": float(q[1]), "p10": float(q[0]), "p90": float(q[2]), "n": len(per),
            "gbps": float(nbytes / (q[1] * 1e-3) / 1e9)}


class _NullAfterRoute(ModelExecutor):
    """The executor with its experts' work left out: the router's choice still comes to the host."""

    def _run_layer(self, l, hidden, top_k_index, top_k_weights, act_fn):
        top_k_index.to("cpu")
        return torch.zeros_like(hidden)


def measure_in_situ(preset: str, *, device: str = "cuda", batches=None, contexts=None, steps: int = STEP_STEPS,
                    warmup: int = STEP_WARMUP, tiny: bool = False, layers: int | None = None, seed: int = 0,
                    progress=None, styles: dict[str, str] | None = None, passes: int = STEP_PASSES) -> dict:
    """Median decode-step ms of the whole model, ``null`` and ``resident``, per (batch, context),
    over ``passes`` passes of ``steps`` timed steps each, the points in turn in each pass, with
    each point's active experts per MoE layer (mean over the timed steps); ``styles``
    (style -> the executor's dispatch): also the resident step in each (``styles`` of a point)."""
    from calibrate.validation.model_rows import resident_policy

    built = build_model(preset, tiny=tiny, layers=layers, device=device, seed=seed)
    spec = built.spec
    host = host_experts(built, pinned=False)
    pol = resident_policy(spec.num_experts, spec.num_layers)
    points = [(C, B) for C in contexts or STEP_CONTEXTS for B in batches or STEP_BATCHES]
    traces = {}
    for C, B in points:   # every routing first, through the model's own experts
        if progress:
            progress(f"in situ routing B={B} context {C}")
        traces[C, B] = record_routing(built, batch=B, steps=steps + warmup, prompt_tokens=C, seed=seed, device=device)
    runs = [("resident", ModelExecutor, "loop")] + [(s, ModelExecutor, d) for s, d in (styles or {}).items()]
    runs.append(("null", _NullAfterRoute, "loop"))
    # the points in turn, ``passes`` times over: a host whose speed drifts between its two
    # states (the H200's, for tens of seconds) moves every point alike, not one point's runs
    timed: dict[tuple, list] = {}
    for p in range(passes):
        for C, B in points:
            if progress:
                progress(f"in situ B={B} context {C}, pass {p + 1}/{passes}")
            tr = traces[C, B]
            for name, cls, dispatch in runs:
                ex = cls(built, pol, tr, device=device, host=host, prompt_tokens=C, dispatch=dispatch)
                timed.setdefault((C, B, name), []).extend([ex.run_step(s)[0] for s in range(tr.num_steps)][warmup:])
                ex.release()
                ex = None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    pts = []
    for C, B in points:
        out = {}
        for name, _, _ in runs:
            steps_ = timed[C, B, name]
            fast = [st for st in steps_ if st.host_fast is not False]   # --host-state fast: those that ended fast
            out[name] = statistics.median(st.latency_ms for st in (fast if len(fast) >= 3 else steps_))
        tr = traces[C, B]
        active = float(np.mean([[len(np.unique(tr.step(s)[:, l, :])) for l in range(spec.num_layers)]
                                for s in range(warmup, tr.num_steps)]))
        pts.append({"batch": B, "context": C, "null_ms": out["null"], "resident_ms": out["resident"],
                    "active": active, **({"styles": {s: out[s] for s in styles}} if styles else {})})
    copy = pageable_copy(host, device)
    if progress and copy:
        progress(f"in situ pageable copies: {copy['ms']:.3f} ms per expert ({copy['gbps']:.1f} GB/s)")
    return {"layers": len(built.decoder_layers), "moe_layers": spec.num_layers, "steps": steps, "warmup": warmup,
            "passes": passes,
            "points": pts, **({"pageable_copy": copy} if copy else {})}
