"""What a job will cost before it runs: peak memory and CPU time, from its sizes alone.

:func:`estimate_scenario` (``simmoe run``), :func:`estimate_sweep` (``simmoe sweep``),
:func:`estimate_generate`, :func:`estimate_stats`, :func:`estimate_fit` and
:func:`estimate_import` (``simmoe trace gen / stats / fit / import``) add up the work a job
does (routed and served requests, token-layer draws of the generator, steps, cache slots,
per-step rows) and price it with :data:`COSTS`, one table of measured per-unit costs.
:func:`check` refuses, with one :class:`~simulator.errors.InputError` naming the field that
makes the job big and giving the estimate, a job that needs more memory than is available or
more time than the limit (``SIMMOE_MAX_SECONDS``, default 1 hour; ``SIMMOE_MAX_MEMORY``,
default the machine's available memory). ``--force`` skips the check.
:class:`Tracker` turns a runner's ``(done, total, what)`` callbacks into a time left.

The estimate is arithmetic on the scenario: it runs in microseconds and allocates nothing,
whatever the sizes (Python integers do not overflow).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .traces.synthetic import CHUNK, GENERATOR_VERSION, GUMBEL_RATIO, row_keys
from .units import fmt_bytes  # noqa: F401  (re-exported: the one byte formatter)

#: Per-unit costs, measured by ``python bench/bench_estimate.py --fit`` (which prints a fresh
#: table to paste here) on the project's shared 2-vCPU VM (Python 3.11.7), 2026-12-01. A cost
#: of 0 is one the training runs could not tell apart from the others (gen_s_per_draw: small
#: E in training; huge-E jobs are still caught by bytes_per_draw, measured directly).
#: Seconds are CPU seconds of one process; bytes are peak bytes allocated above the
#: process's resident memory before the job (tracemalloc for Python and NumPy objects).
#: Times were fitted by non-negative least squares on relative error over a grid of small
#: runs (batch, steps, layers, experts, top-k and load mode varied one at a time); memory
#: constants from tracemalloc peaks of the same runs. After an engine change, rerun --fit.
#: Refitted 2026-12-01 on the fast engine (bench/bench_estimate.py --fit --repeats 2), and
#: again after the engine's second pass and sampler version 3 (2026-12-01, 23:50 UTC): the
#: sampler's costs from generating traces alone, the first-run cost in fresh processes,
#: bytes_per_future measured directly (the stream ahead and Belady's positions).
COSTS: dict[str, float] = {
    # simulation (planner + engine), per policy and trace
    "run_s_base": 0.0581,                       # a run's fixed cost (profile, summary, writing the files)
    "run_s_first": 0.0565,                        # once per process: first use of the run's code paths
    "sim_s_per_served.per-item": 1.02e-06,   # one served expert request, by load mode
    "sim_s_per_served.dedup": 1.04e-06,
    "sim_s_per_served.coalesced": 2.16e-06,
    "sim_s_per_routed": 0,             # one routed (token, layer, expert) pair
    "sim_s_per_layer_step": 0,         # one layer of one step
    "sim_s_per_step": 5.45e-05,               # one step (records, sync)
    "sim_s_per_run": 0.00362,                # one policy over one trace (planner, engine, frame)
    "sim_s_extra_per_served.prefetch": 2.48e-06,   # prefetch on
    "sim_s_extra_per_served.future": 1.8e-06,     # belady / static-hot: the request stream ahead
    "sim_s_extra_per_served.pageable": 3.51e-07,   # pageable copies block the host
    "sim_s_per_slot": 4.33e-08,               # building a cache's slot list
    # synthetic generator
    "gen_s_per_draw": 1.22e-08,               # one (token, layer, expert) Gumbel key (E <= 8 k, or version 2)
    "gen_s_per_pick": 3.95e-07,                # one (token, layer, choice) of the top-k
    "gen_s_per_wave": 0.000197,                # one group of cells drawn together
    "gen_s_per_cell_expert": 6.12e-08,         # one expert of one (step, layer) cell (hot sets, rankings)
    "gen_s_per_layer_step": 0,
    "real_s_per_routed": 5.0e-09,            # batching recorded sequences
    # memory
    "bytes_base": 2.51e+06,                     # a job's fixed allocations (first-use caches, tables)
    "bytes_per_draw": 16.6,                  # live bytes per (token, expert) key of one layer draw
    "bytes_per_routed": 0,                 # trace arrays while built (int16, two copies)
    "bytes_per_token": 8.0,                  # seq ids while built
    "bytes_per_op": 177,                   # one step's operations (plan tuples, engine ops, events)
    "bytes_per_slot": 40.2,                  # one cache slot (free list entry, slot map)
    "bytes_per_future": 32.0,                # one request of the stream ahead (belady / static-hot)
    "bytes_per_row": 1.21e+03,                 # one per-step row: records, frames, concat, summary
    # sweeps
    "sweep_s_per_point": 4.0e-04,            # expanding, validating and storing one point
    "sweep_bytes_per_point": 20000.0,        # one expanded point held in memory
    # trace statistics (simmoe trace stats / fit)
    "stats_s_per_routed": 3.36e-07,           # counts, re-use distance, batching, per routed id
    "stats_s_per_pair": 9.96e-08,             # (L-1) x E x E affinity counts and scores
    "stats_s_per_lru_step": 1.4e-05,         # one step of the LRU stack-distance pass
    "stats_s_per_lru_key": 0,          # one key of the LRU pass (incl. its sort of L x E)
    "stats_bytes_per_routed": 30.0,          # batched copies, sorts and index arrays
    "stats_bytes_per_pair": 24.0,            # affinity count arrays (int64, three live)
    "fit_traces": 90.0,                      # synthetic traces one fit generates and measures
    # import (streaming)
    "import_s_per_byte": 2.0e-07,
}

DEFAULT_MAX_SECONDS = 3600.0
EXACT_BATCH_SIZES = 256   # a longer batch-size list is estimated from a sample of it
RUN_BASE_S = 0.05   # fixed cost of a trace job (imports aside)


@dataclass(frozen=True)
class Estimate:
    """A job's expected CPU seconds and peak extra bytes, and what makes it big."""

    seconds: float
    bytes: float
    size: str = ""               # "10^9 steps x batch 64 x 3 replications x 2 policies"
    units: tuple = field(default=(), repr=False)   # per progress unit, in run order: seconds

    def text(self) -> str:
        return f"{approx_seconds(self.seconds, 'about ')}, {fmt_bytes(self.bytes)}"


def _c(key: str) -> float:
    return COSTS[key]


# ------------------------------------------------------------------------- formatting
# fmt_bytes: simulator.units (the one byte formatter), imported at the top


def fmt_seconds(s: float) -> str:
    if s < 1:
        return "under 1 s"
    for limit, div, unit in ((120, 1, "s"), (7200, 60, "min"), (172800, 3600, "h"), (2 * 365 * 86400, 86400, "days")):
        if s < limit:
            return f"{s / div:.0f} {unit}"
    years = s / (365 * 86400)
    return f"{years:.0f} years" if years < 1e6 else f"{fmt_count(years)} years"


def approx_seconds(s: float, prefix: str = "~") -> str:
    t = fmt_seconds(s)
    return t if t.startswith("under") else prefix + t


def fmt_count(n: float) -> str:
    """1000000000 -> '10^9'; 64 -> '64'; 2500000 -> '2.5 x 10^6'."""
    n = int(n) if float(n).is_integer() else n
    if abs(n) < 10000:
        return str(n)
    e = int(math.floor(math.log10(abs(n))))
    m = n / 10 ** e
    return f"10^{e}" if abs(m - 1) < 1e-9 else f"{m:.3g} x 10^{e}"


# ----------------------------------------------------------------------- scenario parts
def expected_unique(num_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts of one layer-step under uniform routing (an upper estimate: locality
    only lowers it); exact arithmetic for any size."""
    E, k, n = num_experts, top_k, tokens
    if n * k <= 1:
        return float(n * k)
    # E (1 - (1 - k/E)^n) without underflow for huge n: exp(n log1p(-k/E))
    frac = 1.0 if k >= E else -math.expm1(n * math.log1p(-k / E))
    return min(float(n * k), E * frac)


def _policy_keys(policy) -> tuple[str, list[str]]:
    extras = []
    if policy.prefetch.kind != "none":
        extras.append("prefetch")
    if policy.cache.kind in ("belady", "static-hot"):
        extras.append("future")
    if policy.memory == "pageable":
        extras.append("pageable")
    return policy.load, extras


def _slots(sc, policy, max_tokens: int) -> int:
    """GPU slots the planner builds for ``policy`` (as :meth:`Planner._build_caches`)."""
    m, spec = sc.model, policy.cache
    slots = spec.slots(m.expert_bytes)
    if slots is None:
        per = max_tokens * m.top_k
        return per if policy.load == "per-item" else min(per, m.num_experts)
    return slots * (m.num_layers if spec.scope == "per-layer" and spec.kind != "none" else 1)


@dataclass(frozen=True)
class _Shape:
    """Sizes of one trace: a batch size's decode steps and its prefill step."""

    L: int
    E: int
    k: int
    B: int
    steps: int
    prefill: int          # tokens per sequence in the prefill step (0: none)
    temporal: bool = True     # the sampler's dependencies: which decode cells it draws together
    cross: bool = True
    version: int = GENERATOR_VERSION

    @property
    def gumbel_keys(self) -> int:
        """Gumbel keys a generated row draws: every expert's, unless version 3 draws it
        without (E > GUMBEL_RATIO k)."""
        return self.E if self.version != 3 or self.E <= GUMBEL_RATIO * self.k else 0

    @property
    def row_keys(self) -> int:
        """Keys the sampler holds per row while it draws (its memory, in CHUNK-key chunks)."""
        return row_keys(self.version, self.E, self.k)

    @property
    def waves(self) -> float:
        """Groups of cells the sampler draws in turn (each costs a fixed set of numpy calls):
        the decode waves of its dependencies, and the prefill step layer by layer. (A wave
        larger than CHUNK keys is drawn in several calls; there the keys' cost dominates.)"""
        return self.steps * self.L / self.wave_cells + (self.L if self.prefill else 0)

    @property
    def wave_cells(self) -> int:
        """Decode cells the sampler draws together (simulator/traces/synthetic.py)."""
        if self.temporal and self.cross:
            return min(self.steps, self.L)
        if self.temporal:
            return self.L
        if self.cross:
            return self.steps
        return self.steps * self.L

    @property
    def tokens(self) -> int:
        return self.B * (self.steps + self.prefill)

    @property
    def n_steps(self) -> int:
        return self.steps + (1 if self.prefill else 0)

    @property
    def max_step_tokens(self) -> int:
        return self.B * max(1, self.prefill)

    @property
    def routed(self) -> int:
        return self.tokens * self.L * self.k

    def served(self, load: str) -> float:
        if load == "per-item":
            return float(self.routed)
        if load == "layer":                     # every expert of every layer, each step
            return float(self.L * self.E * (self.steps + (1 if self.prefill else 0)))
        u = self.steps * expected_unique(self.E, self.k, self.B)
        if self.prefill:
            u += expected_unique(self.E, self.k, self.B * self.prefill)
        return self.L * u

    def step_ops(self, load: str) -> float:
        """Operations of the largest step (all layers): about two per served request."""
        n = self.max_step_tokens
        if load == "layer":
            per_layer = self.E
        else:
            per_layer = n * self.k if load == "per-item" else expected_unique(self.E, self.k, n)
        return 2.0 * self.L * per_layer + self.L


def _trace_cost(sh: _Shape, synthetic: bool) -> tuple[float, float]:
    """Seconds and peak bytes of building one trace."""
    mem = sh.routed * _c("bytes_per_routed") + sh.tokens * _c("bytes_per_token")
    if not synthetic:
        return sh.routed * _c("real_s_per_routed"), mem
    rows = sh.tokens * sh.L
    secs = (rows * (sh.gumbel_keys * _c("gen_s_per_draw") + sh.k * _c("gen_s_per_pick"))
            + sh.waves * _c("gen_s_per_wave") + sh.n_steps * sh.L * (_c("gen_s_per_layer_step")
                                                                     + sh.E * _c("gen_s_per_cell_expert")))
    # the sampler draws independent cells together, up to CHUNK keys at once (one cell at least)
    W = sh.row_keys
    decode_cells = sh.wave_cells * sh.B * W
    prefill = min(sh.max_step_tokens * W, max(W, CHUNK)) if sh.prefill else 0
    draws = max(prefill, min(decode_cells, max(sh.B * W, CHUNK)))
    return secs, mem + draws * _c("bytes_per_draw")


def _policy_signature(sc, policy, sh: _Shape) -> tuple[str, tuple, int]:
    """What a policy's cost depends on: load mode, cost extras, slots."""
    load, extras = _policy_keys(policy)
    return load, tuple(extras), _slots(sc, policy, sh.max_step_tokens)


def _policy_cost_of(load: str, extras: tuple, slots: int, sh: _Shape) -> tuple[float, float]:
    """Seconds and peak transient bytes of simulating one policy over one trace."""
    served = sh.served(load)
    priced_as = "coalesced" if load == "layer" else load   # layer: coalesced copies of every expert
    secs = (served * (_c(f"sim_s_per_served.{priced_as}") + sum(_c(f"sim_s_extra_per_served.{x}") for x in extras))
            + sh.routed * _c("sim_s_per_routed") + sh.n_steps * sh.L * _c("sim_s_per_layer_step")
            + sh.n_steps * _c("sim_s_per_step") + slots * _c("sim_s_per_slot") + _c("sim_s_per_run"))
    mem = sh.step_ops(load) * _c("bytes_per_op") + slots * _c("bytes_per_slot")
    if "future" in extras:
        mem += served * _c("bytes_per_future")
    return secs, mem


def _shape(sc, B: int) -> _Shape:
    m, t = sc.model, sc.trace
    prefill = t.prefill_tokens
    if t.sequences is not None and t.sequences.prefill:
        prefill = max(prefill, 1)   # recorded prompts: their length is in the file; one prompt step
    return _Shape(L=m.num_layers, E=m.num_experts, k=m.top_k, B=B, steps=t.steps, prefill=prefill,
                  temporal=t.temporal > 0, cross=t.cross_layer > 0, version=t.generator_version)


def _size_text(sc) -> str:
    bs = sc.batch_sizes
    batch = f"batch {fmt_count(bs[0])}" if len(bs) == 1 else f"{fmt_count(len(bs))} batch sizes up to {fmt_count(max(bs))}"
    parts = [f"{fmt_count(sc.trace.steps)} steps", batch]
    if sc.trace.prefill_tokens:
        parts.append(f"{fmt_count(sc.trace.prefill_tokens)} prefill tokens")
    m = sc.model
    parts.append(f"{fmt_count(m.num_layers)} layers x top-{fmt_count(m.top_k)} of {fmt_count(m.num_experts)} experts")
    parts.append(f"{fmt_count(sc.replications)} replications x {fmt_count(len(sc.policies))} policies")
    return " x ".join(parts)


def _policy_groups(sc) -> list[tuple[object, list[int]]]:
    """Policies that cost the same (load mode, extras, cache size and scope), each once, with
    their positions in the scenario."""
    groups: dict[tuple, tuple[object, list[int]]] = {}
    for i, p in enumerate(sc.policies):
        key = (p.load, tuple(_policy_keys(p)[1]), p.cache.kind, p.cache.capacity, p.cache.scope)
        groups.setdefault(key, (p, []))[1].append(i)
    return list(groups.values())


def estimate_scenario(sc) -> Estimate:
    """Peak memory and CPU time of ``run_scenario(sc)`` (and writing its results)."""
    synthetic = sc.trace.generator is not None
    groups = _policy_groups(sc)
    n_pol = len(sc.policies)
    units: list[float] = []
    peak = 0.0
    rows = 0.0
    bs = sc.batch_sizes
    if len(bs) > EXACT_BATCH_SIZES:    # a long list: price an even sample (and the largest), scaled
        srt = sorted(bs)
        bs = sorted(set(srt[::len(srt) // EXACT_BATCH_SIZES]) | {srt[-1]})
    weight = len(sc.batch_sizes) / len(bs)
    for B in bs:
        sh = _shape(sc, B)
        t_secs, t_mem = _trace_cost(sh, synthetic)
        per_pol = [0.0] * n_pol
        mem = 0.0
        for p, where in groups:
            secs, m = _policy_cost_of(*_policy_signature(sc, p, sh), sh)
            mem = max(mem, m)
            for i in where:
                per_pol[i] = secs
        per_pol[0] += t_secs                # the trace is built before the first policy runs
        units.extend(per_pol * sc.replications)
        peak = max(peak, t_mem + mem)
        rows += sh.n_steps * sc.replications * n_pol * weight
    mem = _c("bytes_base") + peak + rows * _c("bytes_per_row")
    return Estimate(seconds=sum(units) * weight + _c("run_s_base") + _c("run_s_first"), bytes=mem, size=_size_text(sc),
                    units=tuple(units) if weight == 1 else ())


# --------------------------------------------------------------------------- blame
def _scenario_variants(sc) -> dict[str, object]:
    """The scenario with one size field made small, per field that can make a run big."""
    t, m = sc.trace, sc.model
    out = {}
    for i, p in enumerate(sc.policies):            # the specific fields first: they win ties
        if p.cache.capacity is not None:
            small = p.model_copy(update={"cache": p.cache.model_copy(update={"capacity": 1})})
            pols = list(sc.policies)
            pols[i] = small
            out[f"policies[{i}].cache.capacity"] = sc.model_copy(update={"policies": pols})
    if t.prefill_tokens:
        out["trace.prefill_tokens"] = sc.model_copy(update={"trace": t.model_copy(update={"prefill_tokens": 0})})
    out.update({
        "trace.steps": sc.model_copy(update={"trace": t.model_copy(update={"steps": 1})}),
        "batch_sizes": sc.model_copy(update={"batch_sizes": [1]}),
        "replications": sc.model_copy(update={"replications": 1}),
        "model.top_k": sc.model_copy(update={"model": m.model_copy(update={"top_k": 1})}),
        "model.num_experts": sc.model_copy(update={"model": m.model_copy(update={"num_experts": m.top_k})}),
        "model.num_layers": sc.model_copy(update={"model": m.model_copy(update={"num_layers": 1})}),
        "policies": sc.model_copy(update={"policies": sc.policies[:1]}),
    })
    return out


def pick_blame(est: Estimate, variants: dict[str, Estimate], over: str, default: str) -> str:
    """The field whose variant (that field made small) shrinks ``over`` ('seconds' or
    'bytes') of ``est`` the most."""
    base = getattr(est, over)
    ratios = {f: base / max(1e-12, getattr(small, over)) for f, small in variants.items()}
    top = max(ratios.values(), default=1.0)
    if top <= 1.0001:
        return default
    # the first (variants list the specific fields first) within 2x of the largest lever
    return next(f for f, r in ratios.items() if r >= top / 2)


def blame_scenario(sc, est: Estimate, over: str) -> str:
    """The scenario field that makes ``est`` big."""
    variants = {f: estimate_scenario(v) for f, v in _scenario_variants(sc).items()}
    return pick_blame(est, variants, over, "batch_sizes")


def blame_call(fn: Callable[..., Estimate], kwargs: dict, small: dict[str, dict], over: str, default: str) -> str:
    """As :func:`blame_scenario` for a job estimated by ``fn(**kwargs)``: ``small`` maps each
    field (a flag) to the keyword values that make it small."""
    est = fn(**kwargs)
    return pick_blame(est, {f: fn(**{**kwargs, **upd}) for f, upd in small.items()}, over, default)


# ------------------------------------------------------------------------------ limits
@dataclass(frozen=True)
class Limits:
    seconds: float
    bytes: float


def available_memory() -> int:
    """Bytes the system can still give (MemAvailable), or physical memory where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 34


def limits() -> Limits:
    """The limits a job is checked against: SIMMOE_MAX_SECONDS (default 1 hour) and
    SIMMOE_MAX_MEMORY (bytes or a size like '4 GiB'; default the available memory)."""
    from .errors import InputError
    from .scenario import parse_bytes

    secs = os.environ.get("SIMMOE_MAX_SECONDS")
    mem = os.environ.get("SIMMOE_MAX_MEMORY")
    try:
        s = float(secs) if secs else DEFAULT_MAX_SECONDS
        if not s > 0 or math.isinf(s):
            raise ValueError
    except ValueError:
        raise InputError("environment", "SIMMOE_MAX_SECONDS", f"{secs!r} is not a positive number of seconds") from None
    try:
        b = float(parse_bytes(mem) if not mem.strip().isdigit() else int(mem)) if mem else float(available_memory())
        if not b > 0:
            raise ValueError
    except ValueError:
        raise InputError("environment", "SIMMOE_MAX_MEMORY", f"{mem!r} is not a size (e.g. 4 GiB)") from None
    return Limits(seconds=s, bytes=b)


def check(est: Estimate, source: str, blame: Callable[[str], str], force: bool = False,
          lim: Limits | None = None) -> None:
    """Raise InputError when ``est`` exceeds the limits (unless ``force``). ``blame(over)``
    names the field, for over = 'bytes' or 'seconds'."""
    from .errors import InputError

    if force:
        return
    lim = lim or limits()
    over_mem, over_time = est.bytes > lim.bytes, est.seconds > lim.seconds
    if not (over_mem or over_time):
        return
    why = []
    if over_mem:
        why.append(f"{fmt_bytes(lim.bytes)} of memory available")
    if over_time:
        why.append(f"time limit {fmt_seconds(lim.seconds) if lim.seconds >= 1 else f'{lim.seconds:g} s'} "
                   "(SIMMOE_MAX_SECONDS)")
    size = f"{est.size} needs" if est.size else "needs"
    raise InputError(source, blame("bytes" if over_mem else "seconds"),
                     f"{size} ~{fmt_bytes(est.bytes)} and {approx_seconds(est.seconds)} "
                     f"({' and '.join(why)}); --force to run anyway")


def check_scenario(sc, source: str, force: bool = False) -> Estimate:
    est = estimate_scenario(sc)
    check(est, source, lambda over: blame_scenario(sc, est, over), force)
    return est


def check_call(fn: Callable[..., Estimate], kwargs: dict, small: dict[str, dict], default: str,
               source: str = "command line", force: bool = False) -> Estimate:
    """Estimate ``fn(**kwargs)`` and :func:`check` it, blaming the flag of ``small`` that makes it big."""
    est = fn(**kwargs)
    check(est, source, lambda over: blame_call(fn, kwargs, small, over, default), force)
    return est


# ------------------------------------------------------------------------------ sweeps
SWEEP_SAMPLE = 64


def sweep_groups(doc: dict, source: str):
    from .sweep import _groups

    return _groups(doc, source)


def count_points(doc: dict, source: str) -> int:
    """Points of a sweep document (product of its zip groups and grid axes), without expanding."""
    return math.prod(len(g[0].values) for g in sweep_groups(doc, source))


def _sample_doc(doc: dict, source: str) -> dict:
    """The sweep with each axis cut to a few evenly spread values (at most SWEEP_SAMPLE points)."""
    groups = sweep_groups(doc, source)
    budget = SWEEP_SAMPLE
    keep: list[list[int]] = []
    for g in groups:
        n = len(g[0].values)
        m = max(1, min(n, 3, budget))
        budget //= m
        keep.append(sorted({round(i * (n - 1) / max(1, m - 1)) for i in range(m)}) if m > 1 else [n // 2])
    out = dict(doc)
    zips = []
    gi = 0
    for grp in doc.get("zip") or []:
        zips.append({p: [v[i] for i in keep[gi]] for p, v in grp.items()})
        gi += 1
    grid = {}
    for p, v in (doc.get("grid") or {}).items():
        grid[p] = [v[i] for i in keep[gi]]
        gi += 1
    if zips:
        out["zip"] = zips
    if grid:
        out["grid"] = grid
    return out


def estimate_sweep(doc: dict, source: str, folder: Path | None, workers: int) -> tuple[Estimate, Callable[[str], str]]:
    """A sweep's CPU seconds (all points, over ``workers`` processes) and peak memory, from a
    sample of its points; and the blame function for :func:`check`."""
    from .sweep import expand

    if not isinstance(doc, dict):
        expand(doc, source, folder)           # raises its one-line error
    n = count_points(doc, source)
    sample = expand(_sample_doc(doc, source), source, folder).points
    ests = [estimate_scenario(p.scenario) for p in sample]
    par = max(1, min(workers, n, os.cpu_count() or 1))
    mean_s = sum(e.seconds for e in ests) / len(ests) - _c("run_s_first")      # paid once per worker
    secs = n * (mean_s / par + _c("sweep_s_per_point")) + _c("run_s_first")
    rows = n * sum(len(p.scenario.policies) * len(p.scenario.batch_sizes) for p in sample) / len(sample)
    mem = par * max(e.bytes for e in ests) + n * _c("sweep_bytes_per_point") + rows * _c("bytes_per_row")
    worst = max(range(len(ests)), key=lambda i: ests[i].seconds)
    size = f"{fmt_count(n)} points (each like {ests[worst].size}) on {par} worker(s)"
    groups = sweep_groups(doc, source)
    axes = [a for g in groups for a in g]

    def blame(over: str) -> str:
        lim = getattr(limits(), over)
        e = ests[worst]
        if n == 1 or getattr(e, over) * (par if over == "bytes" else 1) > lim:
            fld = blame_scenario(sample[worst].scenario, e, over)
            for path in [a.path for a in axes] + [f"set.{p}" for p in (doc.get("set") or {})]:
                bare = path.removeprefix("set.")
                if fld == bare or fld.startswith(bare + ".") or bare.startswith(fld + "."):
                    return next((a.field for a in axes if a.path == path), path)
            return "base"
        return max(axes, key=lambda a: len(a.values)).field   # too many points

    return Estimate(seconds=secs, bytes=mem, size=size), blame


# --------------------------------------------------------------------------- trace jobs
def estimate_generate(*, num_layers: int, num_experts: int, top_k: int, batch_size: int, steps: int,
                      prefill_tokens: int = 0) -> Estimate:
    sh = _Shape(L=num_layers, E=num_experts, k=top_k, B=batch_size, steps=steps, prefill=prefill_tokens)
    secs, mem = _trace_cost(sh, synthetic=True)
    mem += sh.routed * _c("bytes_per_routed")          # the compressed write holds a copy
    size = (f"{fmt_count(steps)} steps x batch {fmt_count(batch_size)} x {fmt_count(num_layers)} layers x "
            f"{fmt_count(num_experts)} experts" + (f" x {fmt_count(prefill_tokens)} prefill tokens" if prefill_tokens else ""))
    return Estimate(seconds=secs + RUN_BASE_S, bytes=mem, size=size)


def _stats_batched(tokens: int, L: int, E: int, k: int, B: int, seqs: int) -> tuple[float, float]:
    """Seconds and bytes of batching a corpus at batch B and measuring its distinct experts."""
    rows = max(tokens, B)
    routed = rows * L * k
    return (routed * _c("stats_s_per_routed") + seqs * 2e-6,
            routed * _c("stats_bytes_per_routed"))


def _stats_lru(tokens: int, L: int, E: int, k: int, B: int) -> tuple[float, float]:
    steps = max(1, tokens // B)
    keys = L * expected_unique(E, k, B)
    M = L * E
    secs = steps * (_c("stats_s_per_lru_step") + (keys + M) * _c("stats_s_per_lru_key") + keys * keys * 1e-9)
    mem = max(tokens, B) * L * k * _c("stats_bytes_per_routed") + 3 * M * 8 + keys * keys
    return secs, mem


def _stats_common(tokens: int, L: int, E: int, k: int) -> tuple[float, float]:
    pairs = max(0, L - 1) * E * E
    return (tokens * L * k * _c("stats_s_per_routed") * 3 + pairs * _c("stats_s_per_pair"),
            pairs * _c("stats_bytes_per_pair") + min(tokens, 1 << 18) * L * k * 40)


def estimate_stats(*, tokens: int, sequences: int, num_layers: int, num_experts: int, top_k: int,
                   batch_sizes: list[int], lru_batch: int) -> Estimate:
    L, E, k = num_layers, num_experts, top_k
    s0, m0 = _stats_common(tokens, L, E, k)
    parts = [_stats_batched(tokens, L, E, k, B, sequences) for B in batch_sizes] + [_stats_lru(tokens, L, E, k, lru_batch)]
    secs = s0 + sum(s for s, _ in parts)
    mem = m0 + max(m for _, m in parts)
    size = (f"{fmt_count(tokens)} tokens x {fmt_count(L)} layers x top-{fmt_count(k)} of {fmt_count(E)} experts, "
            f"batch sizes up to {fmt_count(max(batch_sizes + [lru_batch]))}")
    return Estimate(seconds=secs + RUN_BASE_S, bytes=mem, size=size)


def estimate_fit(*, tokens: int, sequences: int, num_layers: int, num_experts: int, top_k: int,
                 batch_size: int, steps: int, seeds: int) -> Estimate:
    L, E, k, B = num_layers, num_experts, top_k, batch_size
    gen = estimate_generate(num_layers=L, num_experts=E, top_k=k, batch_size=B, steps=steps)
    g_tokens = B * steps
    s_g, m_g = _stats_common(g_tokens, L, E, k)
    b_g, bm_g = _stats_batched(g_tokens, L, E, k, B, B)
    per_trace = gen.seconds + s_g + b_g
    n_traces = 2 + _c("fit_traces") * seeds / 2
    s_t, m_t = _stats_common(tokens, L, E, k)
    b_t, bm_t = _stats_batched(tokens, L, E, k, B, sequences)
    secs = n_traces * per_trace + s_t + b_t
    mem = max(gen.bytes + m_g + bm_g, m_t + bm_t)
    size = (f"{fmt_count(n_traces)} synthetic traces of {fmt_count(steps)} steps x batch {fmt_count(B)} x "
            f"{fmt_count(L)} layers x {fmt_count(E)} experts")
    return Estimate(seconds=secs + RUN_BASE_S, bytes=mem, size=size)


def estimate_import(src: str | Path) -> Estimate:
    """Import streams (memory holds one sequence); its time follows the bytes to parse."""
    p = Path(src)
    try:
        if p.is_dir():
            total = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        else:
            total = p.stat().st_size if p.is_file() else 0
    except OSError:
        total = 0
    return Estimate(seconds=total * _c("import_s_per_byte") + RUN_BASE_S, bytes=min(total, 1 << 26) * 4.0,
                    size=f"{fmt_bytes(total)} of routing to parse")


# ----------------------------------------------------------------------------- progress
class Tracker:
    """Turns ``(done, total, what)`` progress calls into ``on_update(done, total, what,
    seconds_left)``. With per-unit estimates (:attr:`Estimate.units`, in run order), the time
    left is the estimate of the units left, scaled by how fast the finished ones actually
    went; without them it is elapsed x left / done (the estimate before the first unit)."""

    def __init__(self, est: Estimate, on_update: Callable[[int, int, str, float], None],
                 clock: Callable[[], float] = time.perf_counter):
        self.est, self.on_update, self.clock = est, on_update, clock
        self.t0 = clock()
        self.cum = [0.0]
        for u in est.units:
            self.cum.append(self.cum[-1] + u)

    def seconds_left(self, done: int, total: int) -> float:
        elapsed = self.clock() - self.t0
        if len(self.cum) == total + 1:
            planned_done, planned_all = self.cum[done], self.cum[-1]
        else:
            planned_done, planned_all = self.est.seconds * done / max(1, total), self.est.seconds
        left = planned_all - planned_done
        if planned_done > 0 and elapsed > 0:
            left *= elapsed / planned_done
        return max(0.0, left)

    def __call__(self, done: int, total: int, what: str = "") -> None:
        self.on_update(done, total, what, self.seconds_left(done, total))
