"""Piecewise CUDA graphs for the non-expert part of a decode step (engine styles ``graphs``
and ``offload-graphs``), as vLLM's piecewise graphs run it.

A decode step of a built model (:func:`calibrate.models.build.build_model`) is cut at its
routed experts into pieces:

- piece 0: the embedding of the step's tokens, the rotary table and the attention mask (once
  per step), then every decoder layer up to the first MoE layer's experts;
- piece j (j >= 1): the residual add of MoE layer j-1 (its partial output plus its routed
  experts' output), then the decoder layers up to MoE layer j's experts;
- the last piece: the last residual add, the final norm and the LM head.

A MoE layer's part before its experts (input norm, attention over a static KV cache, residual,
post-attention norm, router and top-k, shared experts) is the decoder layer's own forward
with its routed experts replaced by :class:`CaptureExperts` (it keeps the experts' inputs and
returns zeros), so the piece holds everything but the routed experts, in transformers' own
code (no fork). Between the pieces the routed experts run eagerly (they depend on data: the
offloading decisions and copies), and their output is copied into the next piece's input.

Shapes are static: transformers' ``StaticCache`` (``max_len`` tokens per sequence) holds the
keys and values (MLA, DeepSeek-V2: the compressed latent, expanded each step as transformers
does); the step's position is one device tensor (``pos``) updated in place before a step,
from which each piece sets the cache layers' write index and the mask (keys past ``pos``
masked). So the attention reads the whole static cache every step (``max_len`` keys, the
later ones masked), as transformers' static cache does, not ``pos`` keys as a paged kernel
would.

On CUDA each piece is captured once per batch size (:meth:`GraphedLayers.capture`) and
replayed; on the CPU (no CUDA) the same pieces run eagerly, the same static-shape code, so
the CPU tests cover everything but ``torch.cuda.graph`` capture and replay itself. All four
families build (OLMoE, Qwen3-MoE, Mixtral, DeepSeek-V2 with MLA): their attention, norms and
routers have no host sync and no data-dependent shape in a decode step.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from calibrate.models.build import BuiltModel

WARMUP = 2   # eager runs on a side stream before a capture (cuBLAS and allocator warm-up)


class CaptureExperts(torch.nn.Module):
    """Stands in for a block's routed experts inside a piece: keeps their inputs
    ``(hidden, top_k_index, top_k_weights)`` (a captured graph's static outputs) and
    returns zeros, so the block's output is its shared experts' alone (if any)."""

    inputs: tuple | None = None

    def forward(self, hidden_states, top_k_index, top_k_weights):
        self.inputs = (hidden_states, top_k_index, top_k_weights)
        return torch.zeros_like(hidden_states)


def graphed(fn: Callable[[], object], device: torch.device, warmup: int = WARMUP, pool=None) -> Callable[[], None]:
    """``fn`` captured as a CUDA graph (warmed up on a side stream first) and returned as its
    replay; on the CPU ``fn`` itself (the same code, run eagerly). ``pool``: a memory pool
    the graph shares with graphs captured before it (``torch.cuda.graph_pool_handle()``),
    safe when they replay in the order they were captured, one at a time, as the pieces of
    a step do: one piece's intermediates then reuse another's memory."""
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g, pool=pool):
        fn()
    fn.graph = g  # noqa: B010 (kept alive with the callable)
    return g.replay


def static_cache(built: BuiltModel, max_len: int):
    """transformers' ``StaticCache`` for ``built`` (layers allocated at their first update)."""
    from transformers import StaticCache
    return StaticCache(config=built.config, max_cache_len=max_len)


def attention_mask(pos: torch.Tensor, max_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask over a static cache of ``max_len`` keys: 0 up to ``pos``, the dtype's
    minimum past it (shape ``(1, 1, 1, max_len)``; read by sdpa and eager attention alike)."""
    valid = torch.arange(max_len, device=pos.device) <= pos
    zero = torch.zeros((), dtype=dtype, device=pos.device)
    return torch.where(valid, zero, torch.finfo(dtype).min).view(1, 1, 1, max_len)


class LayerRunner:
    """One decoder layer's decode call over a static cache at the position ``pos`` (a 0-d
    device tensor): sets the cache layer's write index from ``pos``, then runs the layer."""

    def __init__(self, built: BuiltModel, cache, max_len: int):
        self.b, self.cache, self.max_len = built, cache, max_len
        self.device = next(built.model.parameters()).device
        self.dtype = next(built.model.parameters()).dtype
        self.pos = torch.zeros((), dtype=torch.long, device=self.device)
        self.pos_ids = self.pos.view(1, 1)
        self.pe = self.mask = None

    def step_tables(self, h: torch.Tensor) -> None:
        """The rotary table and the mask at ``pos`` (once per step)."""
        self.pe = self.b.model.model.rotary_emb(h, self.pos_ids)
        self.mask = attention_mask(self.pos, self.max_len, self.dtype)

    def layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        lay = self.cache.layers[i]
        if getattr(lay, "is_initialized", False):
            lay.cumulative_length.copy_(self.pos)    # the write index: the step's position
        else:   # first (eager) call: the layer allocates its buffers at this update
            lay.cumulative_length = self.pos.detach().clone()
        return self.b.decoder_layers[i](h, attention_mask=self.mask, position_ids=self.pos_ids,
                                        past_key_values=self.cache, use_cache=True, position_embeddings=self.pe)


class GraphedLayers:
    """A built model's decode step as pieces around its routed experts (module docstring).

    ``routed``: the callable of MoE layer ``j``'s routed experts, ``routed(j, hidden,
    top_k_index, top_k_weights)``; default: the block's ``experts`` module as it is when this
    object is made (the model's own, or the offload executor's :class:`OffloadedExperts`).
    """

    def __init__(self, built: BuiltModel, routed: Callable | None = None):
        self.b = built
        self.device = next(built.model.parameters()).device
        blocks = built.moe_blocks()
        modules = [blk.experts for blk in blocks]
        self.routed = routed or (lambda j, x, idx, w: modules[j](x, idx, w))
        self.captures = [CaptureExperts() for _ in blocks]
        moe, n = built.moe_layers, len(built.decoder_layers)
        bounds = [-1] + list(moe)
        self.ranges = [range(bounds[j] + 1, bounds[j + 1] + 1) for j in range(len(moe))] + [range(moe[-1] + 1, n)]
        self.batch = None
        self.runs: list[Callable] = []

    def capture(self, batch: int, max_len: int, cache=None, position: int = 0) -> None:
        """Static buffers for ``batch`` sequences over a cache of ``max_len`` tokens (``cache``:
        one the caller prefilled, else a new static cache), and on CUDA the captured pieces;
        ``position``: the next step's (the warm-up runs before a capture write their keys and
        values there, where that step then writes its own)."""
        self.batch, self.max_len = batch, max_len
        self.cache = cache if cache is not None else static_cache(self.b, max_len)
        self.runner = LayerRunner(self.b, self.cache, max_len)
        self.runner.pos.fill_(position)
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        self.partial: list[torch.Tensor | None] = [None] * len(self.captures)
        self.routed_out = [torch.zeros((batch, self.b.spec.hidden), dtype=self.runner.dtype, device=self.device)
                           for _ in self.captures]
        self.logits = None
        self.runs = []
        pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        with self._experts_captured():
            for j in range(len(self.ranges)):
                self.runs.append(graphed(lambda j=j: self._piece(j), self.device, pool=pool))

    def _piece(self, j: int) -> None:
        r, m = self.runner, self.b.model
        if j == 0:
            h = m.model.embed_tokens(self.ids)
            r.step_tables(h)
        else:
            prev = self.partial[j - 1]
            h = prev + self.routed_out[j - 1].view_as(prev)
        for i in self.ranges[j]:
            h = r.layer(i, h)
        if j < len(self.captures):
            self.partial[j] = h
        else:
            self.logits = m.lm_head(m.model.norm(h))

    def _experts_captured(self):
        """The MoE blocks' experts swapped for the capture modules (restored after)."""
        @contextlib.contextmanager
        def swap():
            blocks = self.b.moe_blocks()
            saved = [blk.experts for blk in blocks]
            for blk, cap in zip(blocks, self.captures):
                blk.experts = cap
            try:
                yield
            finally:
                for blk, mod in zip(blocks, saved):
                    blk.experts = mod
        return swap()

    def run(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """One decode step of the ``batch`` tokens ``ids`` (batch x 1) at ``position`` (tokens
        already cached): the pieces replayed (CUDA) or run (CPU), the routed experts eagerly
        between them; returns the logits (the static buffer: copy it to keep it)."""
        if ids.shape != self.ids.shape:
            raise ValueError(f"captured for {tuple(self.ids.shape)} token ids, got {tuple(ids.shape)}")
        if not 0 <= position < self.max_len:
            raise ValueError(f"position {position} outside the static cache of {self.max_len} tokens")
        self.ids.copy_(ids)
        self.runner.pos.fill_(position)
        eager = self.device.type != "cuda"
        with torch.no_grad(), (self._experts_captured() if eager else contextlib.nullcontext()):
            for j, run in enumerate(self.runs):
                run()
                if j < len(self.captures):
                    x, idx, w = self.captures[j].inputs
                    self.routed_out[j].copy_(self.routed(j, x, idx, w).view_as(self.routed_out[j]))
        return self.logits
