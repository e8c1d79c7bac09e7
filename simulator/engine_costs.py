"""What the engine around the experts costs: the dense (non-expert) op of each layer-step and
the per-step extra, from a profile's ``engine`` tables (``simmoe calibrate engine``).

- Decode: non-expert ms per MoE layer over (batch, context), interpolated log-log bilinearly
  (``log ms`` bilinear in ``log batch``, ``log context``) on a grid first made non-decreasing
  along both axes, so the cost never falls as batch or context grows. Outside the grid the
  query is clamped to its edge, and a note says so (``DenseCost.notes``).
- Prefill: non-expert ms per MoE layer over prompt tokens (all sequences of the step),
  log-log interpolated; past the last point, linear in tokens.
- Per step: embedding + LM head by batch, plus every dense decoder layer (DeepSeek-V2-Lite's
  first) from the ``dense_decode`` grid.
- Per engine style, one layer's routed-expert call with every expert resident,
  ``base_ms + per_expert_ms x active`` (:meth:`DenseCost.expert_call_ms`): ``hf-eager``
  (transformers' per-expert loop), ``grouped`` (grouped_mm), ``offload`` (simmoe's own
  real-model executor's dispatch: gather, FFN from a slot, scatter-add).
- The graphed styles (``graphs``, ``offload-graphs``: the non-expert part replayed from
  piecewise CUDA graphs, :mod:`calibrate.executors.graphs`) price the dense op from their own
  decode tables (``styles.<style>.decode`` and ``dense_decode``, measured from the replays)
  in place of the eager ones, with no in situ factor on them (that factor is measured on eager
  whole steps); prefill stays eager (decode steps only are graphed).

The context grows with each decode step: step ``s`` attends over ``start + (decode steps
before s)`` tokens, ``start`` being ``trace.prompt_tokens`` (default: ``trace.prefill_tokens``)
or, for a recorded trace, the mean prompt length of the batch's sequences.

``engine.style: twin`` (the default) keeps simmoe's twin executor's constant
``dense_ms_per_layer`` and no per-step extra; ``engine.dense_ms_per_layer``, when given,
overrides the decode and prefill tables in any style.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from .errors import InputError
from .profile import EngineGrid, ModelEngine, Profile

STYLES = ("twin", "hf-eager", "grouped", "graphs", "offload", "offload-grouped", "offload-graphs")
PHASE_PREFILL = 1


def isotonic(y) -> np.ndarray:
    """The non-decreasing sequence nearest ``y`` in least squares (pool adjacent violators):
    a point that dips below its predecessor is averaged with it, so one noisy high point
    is pooled with its neighbours instead of raising every later one (as a running max does)."""
    blocks: list[list[float]] = []          # [mean, count]
    for v in np.asarray(y, float):
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, n2 = blocks.pop()
            m1, n1 = blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return np.concatenate([np.full(int(n), m) for m, n in blocks]) if blocks else np.zeros(0)


def monotone_grid(ms: np.ndarray) -> np.ndarray:
    """Non-decreasing in batch and in context: each row, then each column, made isotonic
    (:func:`isotonic`); a running maximum along both axes then removes what the second pass
    may have undone in the first."""
    g = np.apply_along_axis(isotonic, 1, np.asarray(ms, float))
    g = np.apply_along_axis(isotonic, 0, g)
    return np.maximum.accumulate(np.maximum.accumulate(g, axis=0), axis=1)


@dataclass
class GridCost:
    """Log-log bilinear interpolation over one (batch, context) grid, clamped at its edges."""

    grid: EngineGrid
    notes: set = field(default_factory=set)

    def __post_init__(self):
        self.lb = np.log(np.asarray(self.grid.batch, float))
        self.lc = np.log(np.asarray(self.grid.context, float))
        self.lm = np.log(monotone_grid(np.asarray(self.grid.ms, float)))

    def _pos(self, axis: np.ndarray, x: float, what: str, lo: int, hi: int) -> tuple[int, float]:
        if x < lo or x > hi:
            side = "below" if x < lo else "above"
            self.notes.add(f"{what} {side} the engine table's {lo}..{hi}: clamped to its edge")
        lx = math.log(min(max(x, lo), hi))
        if len(axis) == 1:
            return 0, 0.0
        i = int(np.clip(np.searchsorted(axis, lx, side="right") - 1, 0, len(axis) - 2))
        return i, float((lx - axis[i]) / (axis[i + 1] - axis[i]))

    def ms(self, batch: float, context: float) -> float:
        g = self.grid
        i, u = self._pos(self.lb, batch, "batch", g.batch[0], g.batch[-1])
        j, v = self._pos(self.lc, context, "context", g.context[0], g.context[-1])
        m = self.lm
        i1 = min(i + 1, m.shape[0] - 1)
        j1 = min(j + 1, m.shape[1] - 1)
        val = (m[i, j] * (1 - u) * (1 - v) + m[i1, j] * u * (1 - v) + m[i, j1] * (1 - u) * v + m[i1, j1] * u * v)
        return float(math.exp(val))


def curve_ms(points: list[tuple[int, float]], x: float) -> float:
    """Log-log interpolation over ``[x, ms]`` points made non-decreasing; below the first
    point its value, past the last linear in ``x``."""
    xs = np.asarray([p[0] for p in points], float)
    ys = np.maximum.accumulate(np.asarray([p[1] for p in points], float))
    if x <= xs[0]:
        return float(ys[0])
    if x >= xs[-1]:
        return float(ys[-1] * x / xs[-1])
    return float(math.exp(np.interp(math.log(x), np.log(xs), np.log(ys))))


def engine_tables(profile: Profile, model: str, source: str = "") -> ModelEngine:
    t = profile.engine.get(model)
    if t is None:
        raise InputError(source or f"profile {profile.name}", f"engine.{model}",
                         f"no engine tables for model {model!r} (profile has: "
                         f"{', '.join(sorted(profile.engine)) or 'none'}); measure them with "
                         f"simmoe calibrate engine --model {model} and merge them into the profile")
    return t


def require_style(profile: Profile, model: str, style: str, source: str = "") -> ModelEngine:
    """The model's engine tables, which must hold the style's measured expert call (a style
    the profile lacks would otherwise be priced with the twin's launch cost)."""
    from .engine_styles import GRAPHED_STYLES
    t = engine_tables(profile, model, source)
    how = (f"measure it with simmoe calibrate engine --model {model} --style {style} and merge it "
           f"with simmoe calibrate engine-merge")
    if style not in t.styles:
        raise InputError(source or f"profile {profile.name}", f"engine.{model}.styles.{style}",
                         f"engine style {style!r} not measured (profile has: {', '.join(sorted(t.styles)) or 'none'}); "
                         + how)
    if style in GRAPHED_STYLES and t.styles[style].decode is None:
        raise InputError(source or f"profile {profile.name}", f"engine.{model}.styles.{style}.decode",
                         f"engine style {style!r} has no decode table replayed from CUDA graphs; " + how)
    return t


def decode_grids(tables: ModelEngine, style: str):
    """``(decode, dense_decode, graphed)``: the grids that price a style's dense op (a graphed
    style's own, measured from its replays; else the model's eager ones)."""
    from .engine_styles import GRAPHED_STYLES
    st = tables.styles.get(style)
    if style in GRAPHED_STYLES and st is not None and st.decode is not None:
        return st.decode, st.dense_decode or tables.dense_decode, True
    return tables.decode, tables.dense_decode, False


@dataclass
class SituDecode:
    """The eager decode layer as a whole step meets it: the isolated table's wall with the in
    situ factor ``k`` on its host part only.

    A measured point's wall is about the larger of its host part (the issue of its kernels,
    ``decode_host``: 0.86-1.05 ms for OLMoE on the H200 at every batch and context below
    B=256 x 4k) and its GPU work (``decode_gpu``: 0.17 ms at B=1, 1.92 ms at B=16 and 4k
    tokens), plus a rest. ``k`` was measured where the host part is the wall (context 256),
    and it scales the host: in a step the layer takes max(k x host, GPU) + rest. Without a
    host grid (an older profile) the whole wall is scaled, as before."""

    wall: "GridCost"
    host: "GridCost | None"
    gpu: "GridCost | None"
    k: float

    def ms(self, batch: float, context: float) -> float:
        wall = self.wall.ms(batch, context)
        if self.host is None or self.k == 1.0:
            return wall * self.k
        host = min(self.host.ms(batch, context), wall)
        gpu = min(self.gpu.ms(batch, context), wall) if self.gpu is not None else 0.0
        rest = wall - max(host, gpu)
        return max(self.k * host, gpu) + rest


def situ_decode(tables: ModelEngine, decode: "GridCost", graphed: bool, k: float, notes: set) -> SituDecode:
    """:class:`SituDecode` of a style's decode grid: the host part scaled when the profile has
    ``decode_host`` (the eager grid's; a graphed style's grid has no in situ factor)."""
    eager = not graphed and tables.decode_host is not None
    return SituDecode(decode, GridCost(tables.decode_host, notes) if eager else None,
                      GridCost(tables.decode_gpu, notes) if eager and tables.decode_gpu else None, k)


def situ_factor(situ, key: str, batch: float | None = None) -> float:
    """How a whole step met the isolated tables (``calibrate engine --in-situ``): the median of
    the measured points (what the engine uses: on the H200 the points scatter with the host's
    speed, 0.87-1.87 for OLMoE, more than they vary with batch), or, given ``batch``, the
    points' factors interpolated in log batch (clamped at the ends; a batch's points over
    several contexts averaged); 1 without a measurement."""
    if situ is None:
        return 1.0
    if batch is None:
        v = getattr(situ, key)
        return float(v) if v else 1.0
    by_b: dict[int, list[float]] = {}
    for p in situ.points:
        v = p.get(key)
        if isinstance(v, (int, float)) and v > 0 and p.get("batch", 0) > 0:
            by_b.setdefault(int(p["batch"]), []).append(float(v))
    if not by_b:
        v = getattr(situ, key)
        return float(v) if v else 1.0
    bs = sorted(by_b)
    vals = [sum(by_b[b]) / len(by_b[b]) for b in bs]
    return float(np.interp(math.log(max(batch, 1)), [math.log(b) for b in bs], vals))


def style_situ_factor(situ, style: str) -> float:
    """The in situ factor on ``style``'s expert host terms: its own (its resident steps, a
    grouped style measured in situ), else the per-expert loop's (``experts``), else 1."""
    if situ is not None and style in situ.styles:
        return float(situ.styles[style])
    return situ_factor(situ, "experts")


def step_contexts(phases: np.ndarray, start: int) -> np.ndarray:
    """Context (cached tokens) each step attends over: ``start`` plus the decode steps before it."""
    decode = (np.asarray(phases) != PHASE_PREFILL).astype(np.int64)
    return start + np.concatenate([[0], np.cumsum(decode)[:-1]]) if len(decode) else np.zeros(0, np.int64)


class StyleCost:
    """What an engine style's expert work costs the host and the GPU, from the profile's
    ``engine.<model>.styles`` and ``in_situ`` (shared by :class:`DenseCost` and
    :class:`MixedStepCost`). ``style``, ``tables`` and ``k_experts`` (the in situ factor on
    the style's host terms) are set by the subclass."""

    style: str
    tables: ModelEngine | None
    k_experts: float = 1.0

    def gpu_per_step(self) -> list[float] | None:
        """The dense op's GPU work alone per step (``decode_gpu``), None without that grid."""
        return None

    def expert_host_ms(self, default_launch_ms: float) -> tuple[float, float]:
        """``(per layer, per expert)`` host time of the style's routed-expert call, as the
        engine prices it: the twin keeps the profile's launch cost and nothing per layer; a
        style whose host time was measured (``offload``: the executor's own call) pays its
        host fit; another measured style its fitted ``base_ms`` once per MoE layer and
        ``per_expert_ms`` per expert it computes (the per-expert loop is host-bound in eager
        transformers)."""
        st = self.tables.styles.get(self.style) if self.tables else None
        if st is None:
            return 0.0, default_launch_ms
        k = self.k_experts
        if st.host_base_ms is not None and st.host_per_expert_ms is not None:
            return st.host_base_ms * k, st.host_per_expert_ms * k
        return st.base_ms * k, st.per_expert_ms * k

    @property
    def grouped(self) -> bool:
        """Whether the style issues a layer's ready experts in one call (:mod:`simulator.engine_styles`)."""
        from .engine_styles import GROUPED_STYLES
        return self.style in GROUPED_STYLES

    def group_ms(self, active: int) -> tuple[float, float, bool]:
        """``(host, GPU, overlapped)`` ms of one grouped call over ``active`` experts: the host
        its measured host time (else the whole call); the GPU its measured GPU work with the
        host ahead (``gpu_*``, calibrations since 2026-12-02: ``overlapped``, the GPU runs the
        call's kernels while the host still issues the later ones, so the call ends at the
        later of its GPU work and its last launch), else what the measured call took beyond
        the host's time (near zero for a host-bound call), run after the host's issue, so
        that the two add up to the measured call."""
        st = self.tables.styles[self.style]
        wall = st.base_ms + st.per_expert_ms * active
        if st.host_base_ms is not None and st.host_per_expert_ms is not None:
            host = (st.host_base_ms + st.host_per_expert_ms * active) * self.k_experts
        else:
            host = wall * self.k_experts
        if st.gpu_base_ms is not None and st.gpu_per_expert_ms is not None:
            return host, st.gpu_base_ms + st.gpu_per_expert_ms * active, True
        return host, max(0.0, wall - host), False

    def load_host_ms(self, default_launch_ms: float) -> float:
        """Host time per copy issued: the style's measured one (``offload``), else the profile's."""
        st = self.tables.styles.get(self.style) if self.tables else None
        return default_launch_ms if st is None or st.host_per_load_ms is None else st.host_per_load_ms * self.k_experts

    def copy_pricer(self, cost, memory: str, host_ms: float):
        """``nbytes -> ms`` of one copy operation on the copy stream for this run's expert
        copies: the profile's curve, except in an executor style (``offload*``, simmoe's
        real-model executor) whose in situ calibration timed the executor's own pool of that
        memory kind (``in_situ.pageable_copy``, ``in_situ.pinned_copy``). That pool is one tensor per expert, copied one by one (a
        coalesced copy of m experts is m copies back to back), and each of its copies is
        slower than the one buffer that ``calibrate`` times (pageable: 6.1-7.0 against 7.9
        GB/s for OLMoE on the H200). Its ms is the wall per copy of a layer's copies back to
        back: an operation of m whole experts costs m of them; a pageable one less
        ``host_ms``, the host terms the engine adds to each blocking operation (its launch,
        and the tail after it), which that wall holds (a pinned copy's launch overlaps the
        copies before it); other sizes: the curve scaled by the measured ms over the curve's
        at the expert's bytes. transformers' own styles (``hf-eager``, ``grouped``: accelerate's
        offload copies a layer's fused expert tensors, two copies) keep the curve."""
        from .engine_styles import EXECUTOR_DISPATCH
        situ = self.tables.in_situ if self.tables is not None else None
        pc = None if situ is None else {"pageable": situ.pageable_copy, "pinned": situ.pinned_copy}.get(memory)
        if self.style not in EXECUTOR_DISPATCH or pc is None:   # the pool is simmoe's executor's
            return partial(cost.copy_ms, memory=memory)
        k = pc.ms / cost.copy_ms(pc.bytes, memory)
        blocking = memory == "pageable"

        def price(nbytes: int) -> float:
            m, rest = divmod(nbytes, pc.bytes)
            if m and not rest:
                whole = m * pc.ms
                return whole - host_ms if blocking and whole > 2 * host_ms else whole
            return cost.copy_ms(nbytes, memory) * k
        return price

    @property
    def route_wait(self) -> float:
        """How much of the copy queue issued before a layer's router read the read waits for
        (the engine's host clock goes that far towards the copy stream's free time): the in
        situ measurement where there is one (``in_situ.route_wait``; 0.7% on the H200), else
        0. The twin is 0 too (its timing since before the rule). Until 2026-12-06 an
        unmeasured read waited for the whole queue: a live timeline had found it behind the
        next layer's prefetch at every second layer boundary. That hold was the grouped call's
        index upload, overtaken by the prefetch copies queued after it (docs/validation.md,
        ninth session), which the executor no longer issues behind its wait; the read itself
        does not wait (``calibrate engine --in-situ``'s ``route_wait``)."""
        if self.style == "twin":
            return 0.0
        situ = self.tables.in_situ if self.tables is not None else None
        return 0.0 if situ is None or situ.route_wait is None else float(situ.route_wait)

    def cpu_pricer(self, cost):
        """``tokens -> ms`` of one CPU expert for this run: for a real model's style whose in
        situ calibration timed the executor's own CPU path (``in_situ.cpu_path``), that curve;
        else the profile's (``CostModel.cpu_path_ms``, the twin's path)."""
        situ = self.tables.in_situ if self.tables is not None else None
        if self.style == "twin" or situ is None or not situ.cpu_path:
            return cost.cpu_path_ms
        pts = situ.cpu_path
        return lambda tokens: curve_ms(pts, tokens)

    def expert_call_ms(self, active: int) -> float | None:
        """One layer's routed-expert call with every expert resident, in this style (None:
        not measured for the style, or the twin)."""
        st = self.tables.styles.get(self.style) if self.tables else None
        return None if st is None else st.base_ms + st.per_expert_ms * active


class DenseCost(StyleCost):
    """The dense-op duration of each (step, layer) and the per-step extra, for one run
    (one batch size over one trace).

    ``phases``: the trace's per-step phase (0 decode, 1 prefill); ``tokens``: tokens per step
    (decode: the batch; prefill: every prompt token of the step); ``start_context``: context
    of the first decode step. Everything is precomputed per step: queries are array lookups.
    """

    def __init__(self, *, style: str, batch: int, phases, tokens, start_context: int = 0,
                 tables: ModelEngine | None = None, override_ms: float | None = None,
                 twin_dense_ms: float = 0.0):
        if style not in STYLES:
            raise ValueError(f"unknown engine style {style!r}; known: {', '.join(STYLES)}")
        self.style, self.batch, self.tables = style, batch, tables
        phases = np.asarray(phases)
        tokens = np.asarray(tokens)
        n = len(phases)
        self.contexts = step_contexts(phases, start_context)
        self.notes: set[str] = set()
        self.k_experts = 1.0
        self._gpu = None
        if style == "twin" or tables is None:
            if style != "twin":
                raise ValueError(f"engine style {style!r} needs the profile's engine tables")
            const = twin_dense_ms if override_ms is None else override_ms
            self._dense = np.full(n, const)
            self._extra = np.zeros(n)
            return
        decode_t, dense_t, graphed = decode_grids(tables, style)
        k_dense = 1.0 if graphed else situ_factor(tables.in_situ, "dense")   # how a whole step meets the tables
        self.k_experts = style_situ_factor(tables.in_situ, style)
        decode = GridCost(decode_t, self.notes)
        dense_grid = GridCost(dense_t, self.notes) if dense_t else None
        gpu = GridCost(tables.decode_gpu, self.notes) if tables.decode_gpu and not graphed \
            and override_ms is None else None
        in_step = situ_decode(tables, decode, graphed, k_dense, self.notes)
        self._dense = np.empty(n)
        self._extra = np.empty(n)
        self._gpu = np.empty(n) if gpu is not None else None
        for s in range(n):
            c = int(self.contexts[s])
            if phases[s] == PHASE_PREFILL:
                t = int(tokens[s])
                layer = curve_ms(tables.prefill, t) if tables.prefill else decode.ms(batch, c)
                dense_layer = layer  # a dense layer's prefill: priced as a MoE layer's non-expert part
            else:
                layer = in_step.ms(batch, c)
                dense_layer = (dense_grid.ms(batch, c) if dense_grid else 0.0) * k_dense
            self._dense[s] = layer if override_ms is None else override_ms
            if gpu is not None:   # a prefill step's layer is GPU-bound: its whole time
                self._gpu[s] = layer if phases[s] == PHASE_PREFILL else min(gpu.ms(batch, c), layer)
            head = curve_ms(tables.head, batch) if tables.head else 0.0
            self._extra[s] = head + tables.dense_layers * dense_layer

    @classmethod
    def from_scenario(cls, scenario, profile: Profile, *, batch: int, phases, tokens,
                      prompt_lengths=None, source: str = "scenario") -> "DenseCost":
        """Built from a scenario's ``engine`` and ``trace`` keys and the profile's tables.
        ``prompt_lengths``: a recorded trace's per-sequence prompt lengths (0 = unknown)."""
        eng, model = scenario.engine, scenario.model
        # a style the profile lacks would otherwise be priced with the twin's launch cost
        tables = None if eng.style == "twin" else require_style(profile, model.name, eng.style, source)
        return cls(style=eng.style, batch=batch, phases=phases, tokens=tokens, tables=tables,
                   start_context=start_context(scenario, prompt_lengths),
                   override_ms=eng.dense_ms_per_layer, twin_dense_ms=model.dense_ms_per_layer)

    @classmethod
    def for_trace(cls, scenario, profile: Profile, trace, *, prompt_lengths=None,
                  source: str = "scenario") -> "DenseCost":
        """:meth:`from_scenario` for one trace: phases and tokens per step from the trace, the
        batch its decode steps' token count."""
        tokens = np.diff(trace.step_offsets)
        decode = tokens[trace.phase != PHASE_PREFILL]
        batch = int(decode.max()) if len(decode) else int(tokens.max())
        return cls.from_scenario(scenario, profile, batch=batch, phases=trace.phase, tokens=tokens,
                                 prompt_lengths=prompt_lengths, source=source)

    def per_step(self) -> tuple[list[float], list[float]]:
        """The dense op's duration and the per-step extra of every step, as lists (the engine
        indexes them by step)."""
        return self._dense.tolist(), self._extra.tolist()

    def gpu_per_step(self) -> list[float] | None:
        return None if self._gpu is None else self._gpu.tolist()

    def dense_ms(self, step: int, layer: int) -> float:
        """The dense (non-expert) op of MoE layer ``layer`` at ``step``."""
        return float(self._dense[step])

    def step_extra_ms(self, step: int) -> float:
        """Per step, outside the MoE layers: embedding + LM head and the dense decoder layers."""
        return float(self._extra[step])



def start_context(scenario, prompt_lengths=None) -> int:
    """Context of the first decode step: the mean known prompt length of a recorded batch,
    else ``trace.prompt_tokens``, else ``trace.prefill_tokens``."""
    if prompt_lengths is not None:
        known = [int(x) for x in np.asarray(prompt_lengths).ravel() if x > 0]
        if known:
            return int(round(sum(known) / len(known)))
    tr = scenario.trace
    return tr.prompt_tokens if tr.prompt_tokens is not None else tr.prefill_tokens


class MixedStepCost(StyleCost):
    """The engine's dense-op and per-step prices for steps built one at a time (a serving run):
    a step may mix decode tokens (priced by the decode grid at their batch and mean context)
    with prefill chunks (priced by the prefill curve at their token count, plus a context
    term); the parts add up, per MoE layer and for the dense layers, and the LM head is priced
    by the step's sequences. The twin style keeps its constant. :meth:`add` appends one step;
    :meth:`per_step` returns the growing lists the engine reads.

    The context axis of prefill: a chunk at offset ``c`` of its prompt attends over
    ``c + chunk`` tokens. The profile's prefill curve is measured on one prompt over an empty
    cache (``calibrate engine``: the chunk's attention over itself), so it has no context
    axis; the ``c`` earlier tokens are priced by the decode grid's context slope:
    ``ctx_ms_per_token`` = (ms at the grid's smallest batch, 1 in every shipped profile, and
    its last context - the same at its first) / (the contexts' difference), per MoE layer (and per dense layer from the dense
    grid). A chunk reads its request's cached keys and values once, as one decode sequence
    over ``c`` tokens does; the compute of its queries over them is small beside that read at
    these sizes and is not priced. The step's term is ``ctx_ms_per_token x sum(c)`` over its
    chunks (the term is linear in ``c``, so the sum is all it needs)."""

    def __init__(self, *, style: str, tables: ModelEngine | None, override_ms: float | None, twin_dense_ms: float):
        self.style, self.tables, self.override = style, tables, override_ms
        self.const = twin_dense_ms if override_ms is None else override_ms
        self.notes: set[str] = set()
        self.dense: list[float] = []
        self.extra: list[float] = []
        self.k_experts = 1.0
        self.ctx_ms_per_token = self.dense_ctx_ms_per_token = 0.0
        self.k_dense = 1.0
        self.gpu: list[float] | None = None   # the dense op's GPU work alone per step (decode_gpu)
        self.gpu_grid = None
        if style != "twin":
            decode_t, dense_t, graphed = decode_grids(tables, style)
            if tables.decode_gpu and not graphed and override_ms is None:
                self.gpu, self.gpu_grid = [], GridCost(tables.decode_gpu, self.notes)
            self.decode = GridCost(decode_t, self.notes)
            self.dense_grid = GridCost(dense_t, self.notes) if dense_t else None
            self.k_dense = 1.0 if graphed else situ_factor(tables.in_situ, "dense")   # how a whole step meets the table
            self.in_step = situ_decode(tables, self.decode, graphed, self.k_dense, self.notes)
            self.k_experts = style_situ_factor(tables.in_situ, style)
            self.ctx_ms_per_token = context_slope(self.decode)
            self.dense_ctx_ms_per_token = context_slope(self.dense_grid) if self.dense_grid else 0.0

    @classmethod
    def from_scenario(cls, scenario, profile: Profile, source: str = "scenario") -> "MixedStepCost":
        eng, model = scenario.engine, scenario.model
        tables = None if eng.style == "twin" else require_style(profile, model.name, eng.style, source)
        return cls(style=eng.style, tables=tables, override_ms=eng.dense_ms_per_layer,
                   twin_dense_ms=model.dense_ms_per_layer)

    def price(self, decode_batch: int, context: float, prefill_tokens: int, sequences: int,
              prefill_context: int = 0, longest: int | None = None) -> tuple[float, float]:
        """``(dense op ms per MoE layer, per-step extra ms)`` of one mixed step;
        ``prefill_context``: the sum of its prefill chunks' offsets into their prompts;
        ``longest``: its longest row of new tokens. In a padded style
        (:data:`simulator.engine_styles.PADDED_STYLES`) a step of several rows, one longer than
        a token, runs its non-expert part on ``sequences x longest`` tokens: priced as one
        prefill of that many (which charges the padded rows' attention as one prompt's, an
        upper bound, small beside the layers' linear work at chunks of hundreds of tokens),
        plus the context term of every row (a decode row reads its cache as a chunk does)."""
        if self.style == "twin":
            return self.const, 0.0
        from .engine_styles import PADDED_STYLES
        t = self.tables
        if longest and longest > 1 and sequences > 1 and self.style in PADDED_STYLES:
            padded = sequences * longest
            p = curve_ms(t.prefill, padded) if t.prefill else self.decode.ms(padded, 1)
            read = prefill_context + decode_batch * max(0.0, context)
            layer = p + self.ctx_ms_per_token * read
            dense_layer = p + (self.dense_ctx_ms_per_token if self.dense_grid else self.ctx_ms_per_token) * read
            head = curve_ms(t.head, sequences) if t.head else 0.0
            return (layer if self.override is None else self.override), head + t.dense_layers * dense_layer
        layer = dense_layer = 0.0
        if decode_batch:
            k = self.k_dense
            layer += self.in_step.ms(decode_batch, max(1.0, context))
            dense_layer += (self.dense_grid.ms(decode_batch, max(1.0, context)) if self.dense_grid else 0.0) * k
        if prefill_tokens:
            p = curve_ms(t.prefill, prefill_tokens) if t.prefill else self.decode.ms(prefill_tokens, 1)
            layer += p + self.ctx_ms_per_token * prefill_context
            dense_layer += p + (self.dense_ctx_ms_per_token if self.dense_grid else self.ctx_ms_per_token) * prefill_context
        head = curve_ms(t.head, sequences) if t.head and sequences else 0.0
        return (layer if self.override is None else self.override), head + t.dense_layers * dense_layer

    def add(self, decode_batch: int, context: float, prefill_tokens: int, sequences: int,
            prefill_context: int = 0, longest: int | None = None) -> None:
        d, x = self.price(decode_batch, context, prefill_tokens, sequences, prefill_context, longest)
        self.dense.append(d)
        self.extra.append(x)
        if self.gpu is not None:   # a step with prefill in it: GPU-bound, its whole time
            self.gpu.append(min(self.gpu_grid.ms(decode_batch, max(1.0, context)), d)
                            if decode_batch and not prefill_tokens else d)

    def per_step(self) -> tuple[list[float], list[float]]:
        return self.dense, self.extra

    def gpu_per_step(self) -> list[float] | None:
        return self.gpu


def context_slope(grid: GridCost) -> float:
    """ms per context token of one sequence's decode, from a grid's smallest-batch row (its
    first and last contexts, as the monotone interpolation has them); 0 for a single context."""
    c = grid.grid.context
    if len(c) < 2:
        return 0.0
    b = grid.grid.batch[0]
    return max(0.0, (grid.ms(b, c[-1]) - grid.ms(b, c[0])) / (c[-1] - c[0]))
