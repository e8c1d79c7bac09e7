"""Fit the synthetic generator (``mixed``) to a recorded trace's statistics.

Each knob of :func:`~simulator.traces.synthetic.generate` is fitted to the part of one
statistic (:mod:`simulator.traces.stats`) that popularity skew alone does not explain, so that
the knobs do not fight over the same number. With p_e the layer's measured probability that a
token uses expert e (exact baselines for tokens drawn independently with that popularity):

==================  ==========================================================================
knob                fitted to
==================  ==========================================================================
``zipf``            normalised popularity entropy (mean over layers)
``temporal``        re-use lift: re-use between consecutive tokens minus sum_e p_e^2 / k
``cross_layer``     cross-layer lift: held-out affinity precision minus popularity precision
``batch_locality``  batch lift: distinct experts per layer-step at batch B divided by
                    sum_e 1 - (1 - p_e)^B
==================  ==========================================================================

(``batch_pool`` stays at top_k.) The knobs still interact a little, so the fit is
coordinate-wise: a few rounds, each solving every knob in turn (Brent's method, the others
held) on traces generated with one fixed seed, so that each statistic is a near-smooth
function of its knob. A value the generator cannot reach (beyond the knob's range, e.g. less
skew than uniform) leaves the knob at that end. The fitted knobs are then checked on a trace
of a *different* seed against the raw statistics, with these tolerances (absolute):

=====================================  =========
statistic                              tolerance
=====================================  =========
normalised entropy                     0.01
re-use between consecutive tokens      0.03
cross-layer precision                  0.03
distinct experts at B / uniform        0.03
=====================================  =========

The cross-layer statistics depend on how many tokens the affinity is counted from, so both
sides are measured with the same budget: the synthetic trace's train/test split sizes (the
target's train split truncated to as many tokens, its test split likewise).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.optimize import brentq

from .real import SequenceSet, batch_set, sequences_from_trace
from .stats import cross_layer, routing_counts, skew, split_sets, temporal_reuse, unique_per_layer_step
from .synthetic import expected_unique_uniform, generate

KNOBS = ("zipf", "temporal", "cross_layer", "batch_locality")
STAT_OF = {"zipf": "entropy_norm", "temporal": "reuse_lift", "cross_layer": "cross_layer_lift",
           "batch_locality": "batch_lift"}
RANGES = {"zipf": (0.0, 3.0), "temporal": (0.0, 0.95), "cross_layer": (0.0, 0.95), "batch_locality": (0.0, 0.95)}
#: +1: the statistic rises with the knob; -1: it falls
DIRECTION = {"zipf": -1, "temporal": 1, "cross_layer": 1, "batch_locality": -1}
TOLERANCES = {"entropy_norm": 0.01, "reuse": 0.03, "cross_layer": 0.03, "unique_ratio": 0.03}


def fit_statistics(ss: SequenceSet, batch_size: int, budget: tuple[int, int] | None = None,
                   trace=None, seed: int = 0) -> dict:
    """The raw statistics and the lifts the fit matches.

    ``budget`` = (train tokens, test tokens) for the cross-layer statistics; ``trace``: an
    already batched trace of ``ss`` at ``batch_size`` (else one is built)."""
    counts = routing_counts(ss)
    sk = skew(counts)["mean"]
    p = counts.single / max(1, counts.tokens)                   # (L, E): P(token uses e at l)
    k, B = ss.top_k, batch_size
    train, test, _ = split_sets(ss)
    n_train, n_test = budget or (train.num_tokens, test.num_tokens)
    xl = cross_layer(routing_counts(train, max_tokens=n_train), test, max_tokens=n_test)
    if trace is None:
        trace = batch_set(ss, np.arange(ss.num_sequences), batch_size=B, steps=max(1, ss.num_tokens // B), seed=seed)
    uniq = float(unique_per_layer_step(trace).mean())
    reuse = temporal_reuse(counts)["mean"]
    return {"entropy_norm": sk["entropy_norm"], "top1_share": sk["top1_share"], "top8_share": sk["top8_share"],
            "reuse": reuse, "reuse_lift": reuse - float((p ** 2).sum(1).mean() / k),
            "cross_layer": xl["precision"], "cross_layer_lift": xl["precision"] - xl["popularity_precision"],
            "unique_ratio": uniq / expected_unique_uniform(ss.num_experts, k, B),
            "batch_lift": uniq / float((1 - (1 - p) ** B).sum(1).mean())}


@dataclass
class FitResult:
    """Fitted generator knobs, the target's statistics and the fitted generator's."""

    params: dict
    target: dict
    fitted: dict
    batch_size: int
    steps: int
    tolerances: dict = field(default_factory=lambda: dict(TOLERANCES))

    @property
    def within(self) -> dict:
        """Per fitted statistic: is the fitted generator within tolerance of the target?"""
        return {s: abs(self.fitted[s] - self.target[s]) <= tol for s, tol in self.tolerances.items()}

    def trace_spec(self, steps: int | None = None) -> dict:
        """A scenario ``trace:`` section that generates routing like the target."""
        return {"generator": "mixed", "steps": steps or self.steps, **self.params}

    def as_dict(self) -> dict:
        return {"params": self.params, "target": self.target, "fitted": self.fitted,
                "tolerances": self.tolerances, "within": self.within, "batch_size": self.batch_size,
                "steps": self.steps, "trace": self.trace_spec()}


class _Generator:
    """Generates traces shaped like the target and measures them with the target's budget."""

    def __init__(self, target: SequenceSet, batch_size: int, steps: int):
        self.shape = dict(num_layers=target.num_layers, num_experts=target.num_experts, top_k=target.top_k)
        self.batch_size, self.steps = batch_size, steps
        self.pool = target.top_k
        probe = sequences_from_trace(self.trace({k: 0.0 for k in KNOBS}, seed=0))
        train, test, _ = split_sets(probe)
        self.budget = (train.num_tokens, test.num_tokens)

    def trace(self, params: dict, seed: int):
        return generate(**self.shape, batch_size=self.batch_size, steps=self.steps, seed=seed, generator="mixed",
                        batch_pool=self.pool, **params)

    def measure(self, params: dict, seeds: tuple[int, ...]) -> dict:
        """The statistics of traces generated with ``params``, averaged over ``seeds``."""
        runs = []
        for seed in seeds:
            tr = self.trace(params, seed)
            runs.append(fit_statistics(sequences_from_trace(tr), self.batch_size, self.budget, trace=tr))
        return {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}


def fit_generator(target: SequenceSet, *, batch_size: int = 16, steps: int = 128, seed: int = 0,
                  seeds: int = 2, rounds: int = 2, xtol: float = 0.005) -> FitResult:
    """Find ``mixed`` generator knobs whose traces (``batch_size`` x ``steps``, statistics
    averaged over ``seeds`` seeds) match ``target``'s statistics."""
    fit_seeds = tuple(seed + i for i in range(seeds))
    gen = _Generator(target, batch_size, steps)
    goal = fit_statistics(target, batch_size, gen.budget, seed=seed)
    params = {k: 0.0 for k in KNOBS}
    for _ in range(rounds):
        for knob in KNOBS:
            stat, sign = STAT_OF[knob], DIRECTION[knob]

            @lru_cache(maxsize=None)
            def gap(x: float) -> float:
                return sign * (gen.measure({**params, knob: x}, fit_seeds)[stat] - goal[stat])

            lo, hi = RANGES[knob]
            g_lo, g_hi = gap(lo), gap(hi)
            if g_lo >= 0:
                params[knob] = lo
            elif g_hi <= 0:
                params[knob] = hi
            else:
                params[knob] = float(brentq(gap, lo, hi, xtol=xtol))
    params = {k: round(v, 4) for k, v in params.items()}
    fitted = gen.measure(params, (seed + seeds,))
    return FitResult(params={**params, "batch_pool": gen.pool}, target=goal, fitted=fitted,
                     batch_size=batch_size, steps=steps)
