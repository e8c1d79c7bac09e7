"""The engine around the experts, measured on a real model (``simmoe calibrate engine``).

On a model built by :func:`calibrate.models.build.build_model` (random weights, the preset's
public architecture) this times, per decoder layer:

- ``decode``: the non-expert work of one MoE layer (norms, attention over a KV cache of
  ``context`` tokens, router and top-k, shared experts) for ``batch`` sequences of one new
  token each, over a (batch x context) grid. The layer runs as transformers runs it, with its
  routed experts replaced by a module that returns zeros (``NullExperts``), so what remains is
  everything but the routed experts. The KV cache is transformers' ``DynamicCache`` filled
  with random keys/values of the layer's own shapes (MLA: the compressed latent), cropped back
  to ``context`` before every trial, so every trial appends one token as a decode step does.
- ``dense_decode``: the same for a dense layer (DeepSeek-V2-Lite's first), if the model has one.
- ``prefill``: the non-expert work of one MoE layer over a prompt of ``tokens`` (one
  sequence, empty cache).
- ``head``: per step, the embedding of ``batch`` tokens, the rotary table, the final norm and
  the LM head.
- ``decode_graphs`` (and ``dense_decode_graphs``), with a graphed style (``graphs``,
  ``offload-graphs``): the same grid, the layer's piece as :mod:`calibrate.executors.graphs`
  replays it (the residual add of the layer before, then the layer over a static cache of
  ``context + 1`` tokens at position ``context``), captured as a CUDA graph per point and
  replayed per trial (on the CPU run eagerly: the same code).
- ``experts``: per engine style, one MoE layer's routed-expert call
  (``experts(hidden, top_k_index, top_k_weights)``) by batch, with the router's own choice on
  random activations: ``hf-eager`` is transformers' per-expert loop, ``grouped`` its
  grouped_mm (``graphs``: the same call, run eagerly between the replays), ``offload`` simmoe's own real-model executor
  (:class:`calibrate.executors.model.ModelExecutor`: gather an expert's tokens, its FFN from a
  GPU slot, scatter-add) with every expert resident, preloaded into its slots as the
  ``resident`` policy has them, so only the executor's dispatch is timed. Each point records
  how many distinct experts were active; a line ``ms = base + per_expert x active`` is fitted
  per style (its errors kept), and another on the host time of the call (``host_fit``); the
  executor's styles also time the call's GPU work alone, behind a sleep kernel (``gpu_ms``,
  ``gpu_fit``: what a layer exposes after its last copy, the host's issue being done by then).

Timing: :class:`calibrate.measurements.timing.Timer` (CUDA events from an idle device, so the host's issue
gaps count as a real step's do; ``perf_counter`` on the CPU), warm-ups first, the median of
the trials kept with p10/p90 and the host time of the call. With ``max_seconds`` the work is
budgeted: each table gets a share of what is left, and a table's points are taken coarse to
fine (corners and every 4th point first), so a short budget trims the grid evenly; points left
out, points whose KV cache would not fit ``kv_budget_bytes`` and contexts past the model's
``max_position_embeddings`` (OLMoE: 4096) are listed in ``skipped``.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from calibrate.executors.model import host_experts
from calibrate.models.build import EXPERTS_IMPLEMENTATION, BuiltModel, build_model
from calibrate.measurements.timing import Timer
from simulator.engine_styles import EXECUTOR_DISPATCH, GRAPHED_STYLES

ENGINE_FORMAT = "simmoe-engine"
ENGINE_VERSION = 1
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CONTEXTS = [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
PROMPTS = [16, 64, 256, 1024, 4096]
# what ``--style`` may name (the executor's last: they replace the experts modules); measured
# by default: all but the graphed ones (their GPU tests pass on the H200, but one capture failed
# there at a static cache of 264 tokens: docs/validation.md; --style graphs)
STYLES = ["hf-eager", "grouped", "offload", "offload-grouped", "graphs", "offload-graphs"]
DEFAULT_STYLES = [s for s in STYLES if s not in GRAPHED_STYLES]
EXECUTOR_STYLES = EXECUTOR_DISPATCH   # style -> ModelExecutor dispatch
# share of the time budget per table (after the model is built)
SHARES = {"head": 0.05, "experts": 0.25, "prefill": 0.1, "dense_decode": 0.1, "decode": 0.5,
          "dense_decode_graphs": 0.05, "decode_graphs": 0.3}
KV_COPIES = 2  # a DynamicCache append copies the layer's whole cache: old and new side by side
QUICK = dict(batches=[1, 4, 16], contexts=[16, 64], prompts=[8, 32], trials=3, warmup=1)


@dataclass
class EnginePlan:
    preset: str
    device: str = "cuda"
    styles: list[str] = field(default_factory=lambda: list(DEFAULT_STYLES))
    batches: list[int] = field(default_factory=lambda: list(BATCHES))
    contexts: list[int] = field(default_factory=lambda: list(CONTEXTS))
    prompts: list[int] = field(default_factory=lambda: list(PROMPTS))
    trials: int = 20
    warmup: int = 3
    max_seconds: float | None = None
    layers: int | None = None        # decoder layers to build (default: up to the second MoE layer)
    tiny: bool = False
    dtype: str | None = None
    kv_budget_bytes: int | None = None
    seed: int = 0
    in_situ: bool = False            # also time whole decode steps of the full model (engine_step)


class NullExperts(torch.nn.Module):
    """Stands in for a block's routed experts: no work, zeros of the right shape."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return torch.zeros_like(hidden_states)


def _levels(n: int) -> list[int]:
    """Refinement level of each of n grid indices: 0 the ends and every 4th, 1 every 2nd, 2 the rest."""
    return [0 if i in (0, n - 1) or i % 4 == 0 else 1 if i % 2 == 0 else 2 for i in range(n)]


def coarse_to_fine(n: int) -> list[int]:
    """Indices 0..n-1, coarse levels first (a prefix of any length spans the whole range)."""
    lv = _levels(n)
    return sorted(range(n), key=lambda i: (lv[i], i))


def grid_order(nb: int, nc: int) -> list[tuple[int, int]]:
    """(batch, context) index pairs, coarse to fine over both axes."""
    lb, lc = _levels(nb), _levels(nc)
    return sorted(((b, c) for b in range(nb) for c in range(nc)), key=lambda q: (max(lb[q[0]], lc[q[1]]), q))


def point_stats(ms: list[float], host_ms: list[float]) -> dict:
    a = np.asarray(ms)
    med = float(np.median(a))
    return {"ms": med, "p10": float(np.percentile(a, 10)), "p90": float(np.percentile(a, 90)),
            "spread": float((np.percentile(a, 90) - np.percentile(a, 10)) / med) if med > 0 else 0.0,
            "host_ms": float(np.median(host_ms)), "trials": len(a)}


class Budget:
    """Deadlines per table: each gets its share of the time left; unused time rolls on."""

    def __init__(self, max_seconds: float | None, tables: list[str]):
        self.end = None if max_seconds is None else time.perf_counter() + max_seconds
        self.left = [t for t in tables]
        self.deadline = math.inf

    def start(self, table: str) -> None:
        if self.end is None:
            return
        shares = {t: SHARES[t] for t in self.left}
        now = time.perf_counter()
        self.deadline = now + max(0.0, self.end - now) * shares[table] / sum(shares.values())
        self.left.remove(table)

    def spent(self) -> bool:
        return time.perf_counter() > self.deadline


class EngineMeasurer:
    """Runs an :class:`EnginePlan` on a built model."""

    def __init__(self, plan: EnginePlan, built: BuiltModel):
        self.plan, self.b = plan, built
        self.device = torch.device(plan.device)
        self.timer = Timer(self.device)
        self.dtype = next(built.model.parameters()).dtype
        self.gen = torch.Generator(device=self.device).manual_seed(plan.seed)
        self.skipped: list[dict] = []
        self.layer_idx = built.moe_layers[0]
        self.rotary = built.model.model.rotary_emb
        self.kv_budget = plan.kv_budget_bytes if plan.kv_budget_bytes is not None else default_kv_budget(self.device)

    # --- helpers ---------------------------------------------------------------------------
    def _randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device, dtype=self.dtype)

    def _time(self, fn, deadline_left: float | None = None, gpu_only: bool = False, block_ms: float = 0.0) -> dict:
        s = self.timer.time(lambda i: fn(), self.plan.trials, self.plan.warmup, budget_s=deadline_left,
                            gpu_only=gpu_only, block_ms=block_ms)
        return point_stats(s.ms, s.host_ms)

    def _layer_call(self, layer_idx: int, batch: int, new: int, context: int, cache):
        layer = self.b.decoder_layers[layer_idx]
        h = self._randn(batch, new, self.b.spec.hidden)
        pos = torch.arange(context, context + new, device=self.device).expand(batch, new)
        pe = self.rotary(h, pos)
        kept = contiguous_kv(cache, layer_idx) if context > 0 else None

        def call():
            extra = 0 if cache is None else cache.get_seq_length(layer_idx) - context
            if extra > 0:  # back to ``context`` tokens: every trial appends one
                restore_kv(cache, layer_idx, kept, extra)
            with torch.no_grad():
                return layer(h, attention_mask=None, position_ids=pos, past_key_values=cache,
                             use_cache=cache is not None, position_embeddings=pe)
        return call

    def kv_shapes(self, layer_idx: int) -> tuple[tuple, tuple]:
        """(keys, values) shapes of one cached token of one sequence in this layer."""
        from transformers import DynamicCache
        cache = DynamicCache()
        self._layer_call(layer_idx, 1, 1, 0, cache)()
        lay = cache.layers[layer_idx]
        return tuple(lay.keys.shape), tuple(lay.values.shape)

    def filled_cache(self, layer_idx: int, batch: int, context: int, shapes):
        from transformers import DynamicCache
        cache = DynamicCache()
        (k, v) = shapes
        for i in range(layer_idx + 1):  # earlier layers hold empty entries (never read)
            kk = self._randn(batch, k[1], context if i == layer_idx else 0, k[3])
            vv = self._randn(batch, v[1], context if i == layer_idx else 0, v[3])
            cache.update(kk, vv, i)
        return cache

    def _skip(self, table: str, why: str, **point) -> None:
        self.skipped.append({"table": table, **point, "why": why})

    # --- tables ----------------------------------------------------------------------------
    def graphed_layer_call(self, layer_idx: int, batch: int, context: int, shapes):
        """The layer's decode piece as the graphed styles replay it (:mod:`calibrate.executors.graphs`):
        the residual add of the layer before, then the layer over a static cache of
        ``context + 1`` tokens (``context`` of them random keys and values) at position
        ``context``; captured on CUDA (replayed per trial), run eagerly on the CPU.
        Returns ``(call, cache)``."""
        from calibrate.executors.graphs import LayerRunner, graphed, static_cache
        cache = static_cache(self.b, context + 1)
        (k, v) = shapes
        lay = cache.layers[layer_idx]
        lay.lazy_initialization(self._randn(batch, k[1], 1, k[3]), self._randn(batch, v[1], 1, v[3]))
        lay.keys.normal_(generator=self.gen)
        lay.values.normal_(generator=self.gen)
        run = LayerRunner(self.b, cache, context + 1)
        run.pos.fill_(context)
        prev, routed = self._randn(batch, 1, self.b.spec.hidden), self._randn(batch, 1, self.b.spec.hidden)
        run.step_tables(prev)   # once per step in the executor's first piece: not in a layer's
        return graphed(lambda: run.layer(layer_idx, prev + routed), self.device, max(1, self.plan.warmup)), cache

    def decode(self, budget: Budget, layer_idx: int, table: str, graphs: bool = False) -> dict:
        """The decode grid of one layer: eager over a DynamicCache, or (``graphs``) the graphed
        piece over a static cache."""
        p = self.plan
        shapes = self.kv_shapes(layer_idx)
        per_token = sum(math.prod(s[1:]) for s in shapes) * self.dtype.itemsize
        copies = 1 if graphs else KV_COPIES   # a static cache is written in place
        need_per_token = copies * per_token + attention_work_bytes(self.b.arch, self.dtype.itemsize)
        grid: list[list[dict | None]] = [[None] * len(p.contexts) for _ in p.batches]
        for bi, ci in grid_order(len(p.batches), len(p.contexts)):
            B, C = p.batches[bi], p.contexts[ci]
            if C >= self.b.arch.max_positions:
                self._skip(table, f"context past the model's {self.b.arch.max_positions} positions", batch=B, context=C)
                continue
            if B * (C + 1) * need_per_token > self.kv_budget:
                self._skip(table, f"KV cache and attention {B * (C + 1) * need_per_token / 1e9:.1f} GB over the "
                                  f"{self.kv_budget / 1e9:.1f} GB budget", batch=B, context=C)
                continue
            if budget.spent():
                self._skip(table, "time budget", batch=B, context=C)
                continue
            try:
                if graphs:
                    call, _ = self.graphed_layer_call(layer_idx, B, C, shapes)
                else:
                    call = self._layer_call(layer_idx, B, 1, C, self.filled_cache(layer_idx, B, C, shapes))
                grid[bi][ci] = pt = self._time(call, self._left(budget))
                if not graphs and self.device.type == "cuda":
                    # the layer's GPU work alone, queued behind a sleep that outlasts its issue:
                    # what a step whose GPU is behind (waiting on copies) meets of it
                    pt["gpu_ms"] = self._time(call, self._left(budget), gpu_only=True,
                                              block_ms=3 * pt["host_ms"])["ms"]
            except torch.OutOfMemoryError:
                self._skip(table, "out of memory", batch=B, context=C)
            except RuntimeError as e:   # a capture torch refuses: kept, the other tables still measured
                if not graphs:
                    raise
                self._skip(table, f"CUDA graph capture failed: {str(e).splitlines()[0][:200]}", batch=B, context=C)
            call = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return {"layer": layer_idx, "batch": p.batches, "context": p.contexts, "kv_bytes_per_token": per_token,
                "points": grid}

    def prefill(self, budget: Budget) -> dict:
        pts = []
        for t in [self.plan.prompts[i] for i in coarse_to_fine(len(self.plan.prompts))]:
            if budget.spent():
                self._skip("prefill", "time budget", tokens=t)
                continue
            from transformers import DynamicCache
            call = self._layer_call(self.layer_idx, 1, t, 0, DynamicCache())
            pts.append({"tokens": t, **self._time(call, self._left(budget))})
        return {"layer": self.layer_idx, "points": sorted(pts, key=lambda r: r["tokens"])}

    def head(self, budget: Budget) -> dict:
        m = self.b.model
        pts = []
        for B in [self.plan.batches[i] for i in coarse_to_fine(len(self.plan.batches))]:
            if budget.spent():
                self._skip("head", "time budget", batch=B)
                continue
            ids = torch.randint(0, self.b.arch.vocab, (B, 1), generator=self.gen, device=self.device)
            pos = torch.zeros(B, 1, dtype=torch.long, device=self.device)

            def call():
                with torch.no_grad():
                    h = m.model.embed_tokens(ids)
                    self.rotary(h, pos)
                    return m.lm_head(m.model.norm(h))
            pts.append({"batch": B, **self._time(call, self._left(budget))})
        return {"points": sorted(pts, key=lambda r: r["batch"])}

    def experts(self, budget: Budget) -> dict:
        """One MoE layer's routed-expert call per style and batch; every style gets the same
        activations and the router's same choice."""
        block = self.b.decoder_layers[self.layer_idx].mlp
        order = [self.plan.batches[i] for i in coarse_to_fine(len(self.plan.batches))]
        inputs = {}
        for B in order:
            h = self._randn(B, self.b.spec.hidden)
            with torch.no_grad():
                _, w, idx = block.gate(h)
            inputs[B] = (h, idx, w, int(torch.unique(idx).numel()))
        out = {}
        styles = sorted(self.plan.styles, key=lambda s: s in EXECUTOR_STYLES)  # the executor's replace the modules
        host = act_fn = None
        for style in styles:
            dispatch = EXECUTOR_STYLES.get(style)
            if dispatch:
                if host is None:
                    host = host_experts(self.b, pinned=self.device.type == "cuda")  # into the slots per executor
                    act_fn = block.experts.act_fn

                def make(h, idx, w, loaded=False, dispatch=dispatch):
                    return self._offload_call(host, act_fn, h, idx, w, loaded=loaded, dispatch=dispatch)
            else:
                self.b.config._experts_implementation = EXPERTS_IMPLEMENTATION[style]
                make = lambda h, idx, w: (lambda: block.experts(h, idx, w))  # noqa: E731
            pts = self._expert_points(style, order, inputs, make, budget, gpu_too=bool(dispatch))
            out[style] = {"points": pts, "fit": fit_per_expert(pts), "host_fit": fit_per_expert(pts, "host_ms")}
            if dispatch and all("gpu_ms" in p for p in pts):
                out[style]["gpu_fit"] = fit_per_expert(pts, "gpu_ms")
            if dispatch:  # the same layer, every active expert copied in first (dedup, no cache)
                loaded = self._expert_points(f"{style}-loaded", order, inputs,
                                             lambda h, idx, w: make(h, idx, w, loaded=True), budget)
                out[style]["loaded"] = {"points": loaded, "host_fit": fit_per_expert(loaded, "host_ms")}
                out[style]["host_per_load_ms"] = per_load_ms(pts, loaded)
        return out

    def _expert_points(self, style: str, order, inputs, make, budget: Budget, gpu_too: bool = False) -> list[dict]:
        """Per batch, the call's wall time (CUDA events from an idle GPU: the host's issue gaps
        included) and its host time; ``gpu_too`` (the executor's styles) also its GPU work
        alone (``gpu_ms``): the same call queued behind a sleep kernel, the router's choice
        already on the host so that nothing in it waits for the GPU. In a step the host issues
        a layer's grouped call while its copies are still in flight, so what follows the last
        copy is this GPU time, not the host's."""
        pts = []
        for B in order:
            if budget.spent():
                self._skip("experts", "time budget", style=style, batch=B)
                continue
            h, idx, w, active = inputs[B]
            fn = make(h, idx, w)

            def call(fn=fn):
                with torch.no_grad():
                    return fn()
            pt = {"batch": B, "active": active, **self._time(call, self._left(budget))}
            if gpu_too:
                fn = make(h, idx.to("cpu"), w)
                pt["gpu_ms"] = self._time(lambda fn=fn: _no_grad(fn), self._left(budget), gpu_only=True,
                                          block_ms=3 * pt["host_ms"])["ms"]   # the sleep outlasts the issue
            pts.append(pt)
            fn = None
        return sorted(pts, key=lambda r: r["batch"])

    def _offload_call(self, host, act_fn, h, idx, w, loaded: bool = False, dispatch: str = "loop"):
        """One MoE layer of :class:`ModelExecutor` on this routing, its first step planned:
        every expert resident (the ``resident`` policy: a cache of them all, preloaded), or,
        ``loaded``, every active expert copied from pinned host memory first (dedup, no cache),
        which prices the executor's host time per copy it issues."""
        from calibrate.executors.model import ModelExecutor
        from calibrate.validation.model_rows import decode_trace, resident_policy
        from simulator.scenario import PolicySpec

        spec, L = self.b.spec, len(self.b.moe_layers)
        routes = idx.to("cpu").numpy().astype(np.int16)
        tr = decode_trace(np.repeat(routes[:, None, :], L, axis=1), len(routes), spec.num_experts)
        pol = (PolicySpec(name="dedup", load="dedup", memory="pinned") if loaded
               else resident_policy(spec.num_experts, L))
        ex = ModelExecutor(self.b, pol, tr, device=str(self.device), host=host, dispatch=dispatch)
        ex.prepare_step(0)
        return lambda: ex._run_layer(0, h, idx, w, act_fn)

    def _left(self, budget: Budget) -> float | None:
        return None if budget.deadline == math.inf else max(0.0, budget.deadline - time.perf_counter())


def contiguous_kv(cache, layer_idx: int):
    """The cached keys and values of ``layer_idx`` as filled (contiguous tensors), to put back
    before each trial (:func:`restore_kv`); None without a filled layer."""
    if cache is None or len(cache.layers) <= layer_idx:
        return None
    lay = cache.layers[layer_idx]
    keys, values = getattr(lay, "keys", None), getattr(lay, "values", None)
    if keys is None or values is None:
        return None
    return keys.contiguous(), values.contiguous()


def restore_kv(cache, layer_idx: int, kept, extra: int) -> None:
    """Back to the filled ``context`` tokens after a trial appended ``extra``: the kept
    tensors put back (no copy), else (an empty cache: the prefill table) a crop. A crop leaves a strided view of the longer tensor, and the
    next trial's append (``torch.cat``) then takes the GPU's element-wise path: on the H200
    that cat was 1.59 of the 1.85 ms of OLMoE's decode layer at B=16 and 4,032 tokens, while
    in a running model each step's cat reads the contiguous tensor the last one wrote, and the
    whole 16-layer resident step took 32.5 ms (bench/probe_decode_attention.py)."""
    lay = cache.layers[layer_idx]
    if kept is None:
        lay.crop(-extra)
    else:
        lay.keys, lay.values = kept


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def fit_per_expert(points: list[dict], key: str = "ms") -> dict | None:
    """Least-squares ``key = base_ms + per_expert_ms x active`` with each point's relative error."""
    if len(points) < 2 or len({p["active"] for p in points}) < 2:
        return None
    x = np.array([p["active"] for p in points], float)
    y = np.array([p[key] for p in points], float)
    if not (y > 0).all():
        return None
    slope, base = np.polyfit(x, y, 1)
    err = ((base + slope * x) - y) / y
    return {"base_ms": float(base), "per_expert_ms": float(slope),
            "errors": [float(e) for e in err], "max_abs_error": float(np.abs(err).max())}


def per_load_ms(resident: list[dict], loaded: list[dict]) -> float | None:
    """Host ms per copy the executor issues: the least-squares slope through 0 of (host time
    with every active expert copied in - host time with all resident) against the copies
    (one per active expert), over the batches both measured."""
    res = {p["batch"]: p for p in resident}
    pairs = [(p["active"], p["host_ms"] - res[p["batch"]]["host_ms"]) for p in loaded if p["batch"] in res]
    if not pairs:
        return None
    x = np.array([a for a, _ in pairs], float)
    y = np.array([d for _, d in pairs], float)
    return max(0.0, float((x * y).sum() / (x * x).sum()))


def attention_work_bytes(arch, dtype_bytes: int) -> int:
    """Bytes per cached token the attention materialises besides the cache: transformers'
    MLA expands the latent into every head's keys and values each step."""
    if arch.attention == "mla":
        return arch.heads * (arch.head_dim + arch.v_head_dim) * dtype_bytes
    return 0


def default_kv_budget(device: torch.device) -> int:
    """KV-cache bytes one measured point may hold: 70% of the GPU's free memory; 1 GiB on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.7)
    return 1 << 30


EDGE_MARGIN = 64  # decode steps a run may take past the last measured context


def edge_contexts(contexts: list[int], max_positions: int) -> list[int]:
    """The contexts to measure: those inside the model's positions, and, where the grid
    steps past them, one more at ``max_positions - EDGE_MARGIN`` (OLMoE: 4032 of 4096), so a
    run near the model's limit is priced from a measured point, not clamped to the one before."""
    inside = [c for c in contexts if c < max_positions]
    edge = max_positions - EDGE_MARGIN
    if len(inside) < len(contexts) and edge > (inside[-1] if inside else 0):
        inside.append(edge)
    return inside


def default_layers(built_arch_total: int, dense_layers: tuple[int, ...]) -> int:
    """Decoder layers to build for measuring: up to and including the first MoE layer after
    the leading dense ones (the tables are per layer)."""
    n = 0
    while n in dense_layers:
        n += 1
    return min(built_arch_total, n + 1)


def measure_engine(plan: EnginePlan, progress=None) -> dict:
    """Build the model, measure every table (within the budget) and return the JSON document."""
    from simulator.models import get_preset

    t0 = time.perf_counter()
    spec = get_preset(plan.preset)
    for s in plan.styles:
        if s not in STYLES:
            raise ValueError(f"engine style {s!r} cannot be measured yet; measurable: {', '.join(STYLES)}")
    arch = spec.arch
    if arch is None:
        raise ValueError(f"model {plan.preset!r} has no architecture (arch) to build")
    layers = plan.layers or default_layers(2 if plan.tiny else arch.total_layers, arch.dense_layers)
    built = build_model(spec, layers=layers, tiny=plan.tiny, dtype=plan.dtype, device=plan.device, seed=plan.seed)
    build_s = time.perf_counter() - t0
    asked = list(plan.contexts)
    plan.contexts = edge_contexts(asked, built.arch.max_positions)
    m = EngineMeasurer(plan, built)
    for c in asked:
        if c not in plan.contexts:
            m._skip("decode", f"context past the model's {built.arch.max_positions} positions"
                              + (f" (measured at {plan.contexts[-1]} instead)" if plan.contexts[-1] not in asked else ""),
                    context=c)
    from calibrate.measurements.host_speed import host_probe
    probes = [host_probe(plan.device)]
    decodes = (["dense_decode"] if built.arch.dense_layers else []) + ["decode"]
    if any(s in GRAPHED_STYLES for s in plan.styles):   # the same grids, replayed from CUDA graphs
        decodes += [f"{t}_graphs" for t in decodes]
    tables = ["head", "experts", "prefill"] + decodes
    budget = Budget(None if plan.max_seconds is None else max(0.0, plan.max_seconds - build_s), tables)
    doc: dict = {}
    stage_s: dict = {"build": build_s}
    for t in tables:
        budget.start(t)
        s0 = time.perf_counter()
        if progress:
            progress(t)
        if t == "experts":
            doc[t] = m.experts(budget)
            _null_experts(built)  # from here on the layers run without their routed experts
        elif t == "head":
            doc[t] = m.head(budget)
        elif t == "prefill":
            doc[t] = m.prefill(budget)
        else:
            layer = built.arch.dense_layers[0] if t.startswith("dense_decode") else m.layer_idx
            doc[t] = m.decode(budget, layer, t, graphs=t.endswith("_graphs"))
        stage_s[t] = time.perf_counter() - s0
    if plan.in_situ:   # the whole model, every layer, beside the small one (freed of its experts)
        from calibrate.measurements.engine_step import measure_in_situ
        if plan.device.startswith("cuda"):
            torch.cuda.empty_cache()
        s0 = time.perf_counter()
        if progress and not plan.tiny:   # the whole model's build is the long part: say so first
            n_all = arch.total_layers
            est = build_s * n_all / max(1, len(built.decoder_layers))
            progress(f"in situ: the whole model ({n_all} decoder layers) next; its build alone about "
                     f"{est:.0f} s (this {len(built.decoder_layers)}-layer one took {build_s:.0f} s), then its steps")
        dispatches = {s: EXECUTOR_STYLES[s] for s in plan.styles if EXECUTOR_STYLES.get(s, "loop") != "loop"}
        doc["in_situ"] = measure_in_situ(plan.preset, device=plan.device, tiny=plan.tiny, seed=plan.seed,
                                         progress=progress, styles=dispatches, **({"batches": plan.batches[:3], "contexts": plan.contexts[:1]}
                                                               if plan.tiny else {}))
        stage_s["in_situ"] = time.perf_counter() - s0
    probes.append(host_probe(plan.device))
    return {
        "format": ENGINE_FORMAT, "version": ENGINE_VERSION, "model": plan.preset, "tiny": plan.tiny,
        "built": {"layers": layers, "moe_layers": built.moe_layers, "hidden": built.spec.hidden,
                  "ffn": built.spec.ffn, "num_experts": built.spec.num_experts, "top_k": built.spec.top_k,
                  "dtype": str(m.dtype).removeprefix("torch."), "attention": built.arch.attention},
        "provenance": _provenance(plan),
        "trials": plan.trials, "warmup": plan.warmup, "max_seconds": plan.max_seconds,
        "tables": doc, "skipped": m.skipped, "stage_seconds": stage_s, "host_probe": probes,
        "elapsed_s": time.perf_counter() - t0,
    }


def _null_experts(built: BuiltModel) -> None:
    """Replace every MoE block's routed experts (their weights are freed)."""
    for blk in built.moe_blocks():
        blk.experts = NullExperts()


def _provenance(plan: EnginePlan) -> dict:
    import platform

    import transformers

    from calibrate.measurements.provenance import host_cpu
    dev = torch.device(plan.device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none"
    return {"device": plan.device, "gpu": gpu, "host_cpu": host_cpu(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": torch.get_num_threads(),
            "cpus": len(os.sched_getaffinity(0))}
