"""The engine's terms as a whole decode step meets them (``simmoe calibrate engine --in-situ``).

The engine tables (:mod:`calibrate.measurements.engine`) time one decoder layer and one
routed-expert call in isolation, twenty trials back to back. In a real step the host runs a
long, varied code path (every layer's attention, router and experts in turn), and on the H200
host an eager step of OLMoE-1B-7B took 1.4x the sum of its isolated parts (docs/validation.md).
So this measures the whole model, every decoder layer built, through
:class:`calibrate.executors.model.ModelExecutor` on its own router's routing:

Each timed step is preceded by the host-speed probe (:mod:`calibrate.measurements.host_speed`),
as a validation row's steps are; each point keeps its median (``probe_dispatch_us``), the
speed its steps were measured at:

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
  of one buffer) said 7.9 GB/s, so every layer-baseline row was projected 18-22% fast;
- ``pinned_copy``: the same over the pinned pool the rows load from (``simmoe validate
  --in-situ``), else a pinned copy of the pool's first ``PINNED_LAYERS`` layers, as every
  pinned policy's loads meet it (with the two-layer copy, 53.5 GB/s on the H200 while the
  rows, loading from all 16 layers' pinned pool, met 48-51): on the H200 (2026-12-04) OLMoE's copy-bound rows
  moved 12.6 MB experts at 50-51 GB/s or less, step gaps included, while ``calibrate``'s one
  timed copy of a 12.6 MB buffer said 54.4 GB/s, and dedup and LRU were projected 4-7% fast;
- ``route_wait``: how long the router's read waits behind copies queued before it, as a
  fraction of their time (:func:`route_wait`);
- ``cpu_path``: the executor's own CPU expert (:func:`cpu_path`) by tokens, with its torch
  threads: the real model's styles price a CPU miss by it in place of the profile's CPU table
  (the twin's path).

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
from simulator.scenario import PolicySpec

STEP_BATCHES = [1, 4, 16, 64]
STEP_CONTEXTS = [256]
STEP_STEPS = 8
STEP_WARMUP = 2
STEP_PASSES = 3     # passes over the points (each point's runs in every pass)
COPY_PASSES = 2      # passes over the whole pageable pool (the first pass timed too: no warm-up)
PINNED_LAYERS = 2    # layers of the pool pinned for ``pinned_copy`` (OLMoE: 1.6 GB; Mixtral: 5.6 GB)
PINNED_PASSES = 3
ROUTE_TRIALS = 20


def pageable_copy(host: list[list[torch.Tensor]], device: str, passes: int = COPY_PASSES) -> dict | None:
    """The ms of one expert's copy from the executor's pool ``host`` (pageable, or pinned:
    :func:`pinned_copy`), as the layer baseline meets it: per layer, its experts copied back
    to back into a layer's worth of GPU slots on a copy stream (each copy from pageable memory
    returns to the host when done), the layer's wall time over its experts. ``{"bytes", "ms" (median over layers and passes), "p10",
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


def pinned_pool(host: list[list[torch.Tensor]], device: str, layers: int = PINNED_LAYERS):
    """A pinned copy of the first ``layers`` layers of the pool, one pinned tensor per expert
    as :func:`calibrate.executors.model.host_experts` lays out a pinned policy's pool; None
    off CUDA (nothing to pin for)."""
    if not str(device).startswith("cuda") or not host or not host[0]:
        return None
    return [[torch.empty(t.numel(), dtype=t.dtype, pin_memory=True).copy_(t) for t in layer] for layer in host[:layers]]


def route_wait(pinned: list[list[torch.Tensor]], device: str, batch: int = 4, top_k: int = 8,
               trials: int = ROUTE_TRIALS) -> dict | None:
    """How long the executor's router read waits behind the copies queued before it, as a
    fraction of their time: per trial a layer's experts are queued on a copy stream (pinned,
    back to back), then a router's choice (``batch x top_k`` ids on the idle compute stream)
    comes to the host as the executor's ``top_k_index.to("cpu")`` does; the read's wait over
    the copies' wall. 0: the read does not wait; 1: it returns with the last copy. On the H200
    a live timeline (2026-12-02) found the read behind the prefetches at two layer boundaries in
    five, and the engine has had it wait at every one, which made LRU + prefetch 6-8% slow at
    B=4 (2026-12-04). ``{"fraction" (mean), "fractions", "copies_ms" (median)}``; None off CUDA."""
    if pinned is None or not str(device).startswith("cuda"):
        return None
    layer = pinned[0]
    slots = torch.empty((len(layer), layer[0].numel()), dtype=layer[0].dtype, device=device)
    ids = torch.zeros((batch, top_k), dtype=torch.int64, device=device)
    stream = torch.cuda.Stream(device)
    fracs, walls = [], []
    for t in range(trials + 1):           # the first warms up
        torch.cuda.synchronize(device)
        with torch.cuda.stream(stream):
            for i, src in enumerate(layer):
                slots[i].copy_(src, non_blocking=True)
        t1 = time.perf_counter()
        ids.to("cpu")
        t2 = time.perf_counter()
        stream.synchronize()
        t3 = time.perf_counter()
        if t:
            fracs.append(min(1.0, (t2 - t1) / max(t3 - t1, 1e-9)))
            walls.append((t3 - t1) * 1e3)
    del slots
    return {"fraction": float(np.mean(fracs)), "fractions": fracs, "copies_ms": float(np.median(walls))}


CPU_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CPU_PASSES = 3       # passes over the token counts (each count's bursts in every pass)
CPU_BURSTS = 4       # bursts per token count and pass
CPU_STOP_MS = 25.0   # no larger token count once a call took this long


def cpu_path(built, host: list[list[torch.Tensor]], trace, device: str, tokens=None,
             passes: int = CPU_PASSES) -> dict:
    """The ms of one CPU expert as the real-model executor runs it (``ModelExecutor._cpu``), by
    the tokens it computes: per burst, a layer's activations and routing weights come down once
    (as the executor does at the router sync), then ``top_k`` CPU experts on successive experts
    of the pool (cold weights), each result sent up from pinned memory; the time per call of
    the burst, medians over bursts and passes. ``{"tokens", "ms", "threads"}`` (the points
    stop past ``CPU_STOP_MS``). The profile's CPU table is the twin's path (each call copies
    its tokens down and up and waits for the GPU), which the executor no longer takes."""
    spec = built.spec
    act_fn = built.moe_blocks()[0].experts.act_fn
    pol = PolicySpec(name="cpu-probe", load="dedup", cache={"kind": "lru", "capacity": spec.num_experts}, miss="cpu")
    ex = ModelExecutor(built, pol, trace, device=device, host=host)
    cuda = str(device).startswith("cuda")
    tokens = list(tokens or CPU_TOKENS)
    n = max(tokens)
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, spec.hidden, generator=gen, device=device, dtype=host[0][0].dtype)
    weights = torch.rand(n, spec.top_k, generator=gen, device=device)
    burst = max(2, spec.top_k)
    L, E = len(host), len(host[0])
    key = 0
    times: dict[int, list[float]] = {}
    live = list(tokens)
    for p in range(passes + 1):               # the first pass warms up, untimed
        for t in list(live):
            out = torch.zeros(t, spec.hidden, device=device, dtype=hidden.dtype)
            tok = np.arange(t)
            pairs = tok * spec.top_k
            for _ in range(CPU_BURSTS if p else 1):
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                on_host = (hidden[:t].to("cpu"), weights[:t].reshape(-1).to("cpu"))
                for _ in range(burst):
                    ex._cpu(out, on_host, tok, pairs, host[(key // E) % L][key % E], act_fn)
                    key += 1
                ms = (time.perf_counter() - t0) * 1e3 / burst
                if p:
                    times.setdefault(t, []).append(ms)
            if p == 1 and statistics.median(times[t]) > CPU_STOP_MS:
                live = live[:live.index(t) + 1]
                break
    if cuda:
        torch.cuda.synchronize(device)
    ex.release()
    pts = sorted(times)
    return {"tokens": pts, "ms": [statistics.median(times[t]) for t in pts], "threads": torch.get_num_threads()}


class _NullAfterRoute(ModelExecutor):
    """The executor with its experts' work left out: the router's choice still comes to the host."""

    def _run_layer(self, l, hidden, top_k_index, top_k_weights, act_fn):
        top_k_index.to("cpu")
        return torch.zeros_like(hidden)


def measure_in_situ(preset: str, *, device: str = "cuda", batches=None, contexts=None, steps: int = STEP_STEPS,
                    warmup: int = STEP_WARMUP, tiny: bool = False, layers: int | None = None, seed: int = 0,
                    progress=None, styles: dict[str, str] | None = None, passes: int = STEP_PASSES,
                    built=None, host: list[list[torch.Tensor]] | None = None,
                    pinned_host: list[list[torch.Tensor]] | None = None) -> dict:
    """Median decode-step ms of the whole model, ``null`` and ``resident``, per (batch, context),
    over ``passes`` passes of ``steps`` timed steps each, the points in turn in each pass, with
    each point's active experts per MoE layer (mean over the timed steps); ``styles``
    (style -> the executor's dispatch): also the resident step in each (``styles`` of a point).
    ``built``, ``host``: a model already built with its own experts (``simmoe validate
    --in-situ``: the model its rows run on, before any executor) and its pageable pool;
    ``pinned_host``: its pinned pool, which the pinned copies are then timed over whole (as the
    rows' loads meet it) and, without ``host``, the steps run from (no second copy of the
    experts: Qwen3-30B-A3B's two would not fit the H200 host's 128 GiB; no pageable copies
    are timed then)."""
    from calibrate.validation.model_rows import resident_policy

    if built is None:
        built = build_model(preset, tiny=tiny, layers=layers, device=device, seed=seed)
    spec = built.spec
    pageable = host is not None or pinned_host is None
    if host is None:
        host = pinned_host if pinned_host is not None else host_experts(built, pinned=False)
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
                ex = cls(built, pol, tr, device=device, host=host, prompt_tokens=C, dispatch=dispatch, probe=True)
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
        probes = [st.probe["dispatch_us"] for name, _, _ in runs for st in timed[C, B, name]
                  if st.probe and st.probe.get("dispatch_us")]
        tr = traces[C, B]
        active = float(np.mean([[len(np.unique(tr.step(s)[:, l, :])) for l in range(spec.num_layers)]
                                for s in range(warmup, tr.num_steps)]))
        pts.append({"batch": B, "context": C, "null_ms": out["null"], "resident_ms": out["resident"],
                    "active": active, **({"styles": {s: out[s] for s in styles}} if styles else {}),
                    # the host-speed probe before each timed step (validate's "now" divides by it)
                    **({"probe_dispatch_us": statistics.median(probes)} if probes else {})})
    copy = pageable_copy(host, device) if pageable else None
    if progress and copy:
        progress(f"in situ pageable copies: {copy['ms']:.3f} ms per expert ({copy['gbps']:.1f} GB/s)")
    pool = pinned_host if pinned_host is not None and str(device).startswith("cuda") else pinned_pool(host, device)
    pinned = None if pool is None else pageable_copy(pool, device, PINNED_PASSES)
    route = route_wait(pool, device, top_k=spec.top_k)
    pool = None
    if progress and pinned and route:
        progress(f"in situ pinned copies: {pinned['ms']:.3f} ms per expert ({pinned['gbps']:.1f} GB/s); the router "
                 f"read waits {route['fraction']:.2f} of the copies queued before it")
    if progress:
        progress("in situ CPU experts")
    cpu = cpu_path(built, host, traces[points[0]], device)
    return {"layers": len(built.decoder_layers), "moe_layers": spec.num_layers, "steps": steps, "warmup": warmup,
            "passes": passes, "cpu_path": cpu,
            "points": pts, **({"pageable_copy": copy} if copy else {}), **({"pinned_copy": pinned} if pinned else {}),
            **({"route_wait": route} if route else {})}
