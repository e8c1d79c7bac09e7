"""Learned prefetch policies: predictors counted on recorded routing (a train split of real
sequences) and applied to other sequences (the scenario's test split).

- ``history``: a frequency/history predictor. Per layer, how often each expert is routed
  (popularity) and how often a sequence's next token re-uses an expert it just used
  (stickiness). A token whose sequence used expert e at the target layer on its previous
  token needs e again with P(e | e before); otherwise with P(e | not before).
- ``affinity``: a cross-layer predictor, P(e' at l+1 | e at l) counted on the train split.
  A token's k experts at l are correlated evidence, so they are averaged, not multiplied:
  P(token skips e') = geometric mean over its experts e of (1 - P(e' | e)) (one certain
  cause still makes e' certain). The next step's layer 0 (no previous layer in the step)
  falls back to the history predictor.

Both rank the target layer's experts by the probability that at least one token of the step
needs them (tokens independent) and prefetch as many as they expect the layer to need (the
sum of those probabilities), or ``top_n``; never more than ``budget``. They never read ``PrefetchRequest.future``;
they read the trace's ``seq`` ids (which sequence sits in which batch row, known to a server)
but not its routing. Training counts are cached per process.

Options (``prefetch.options`` in a scenario):

- ``train``: where to count: a path (an imported .npz, a trace folder or file, a simmoe trace)
  or ``{path, format, split, max_sequences}``; the split defaults to ``train``. Default: the
  scenario's own ``trace.sequences`` source, train split. Relative paths are taken from the
  working directory.
- ``top_n``: experts to prefetch per layer-step (default: the expected number needed).
- ``smoothing``: pseudo-count pulling the counted probabilities towards popularity (1.0).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..traces import Trace
from ..traces.real import detect_format, open_sequences, split_indices
from ..traces.stats import RoutingCounts, routing_counts
from .base import PlanContext, PrefetchPolicy, PrefetchRequest, register_prefetch

_TRAINED: dict[tuple, RoutingCounts] = {}


def training_source(train, trace: Trace) -> dict:
    """The training spec ``{path, format, split, max_sequences}`` from the ``train`` option,
    or from the trace's own real source."""
    if train is None:
        meta = trace.meta
        if meta.get("generator") != "real" or "source" not in meta:
            raise ValueError("needs options.train (a recorded trace to learn from): this scenario's trace "
                             "is not real recorded sequences")
        return {"path": meta["source"], "format": meta.get("format", "auto"), "split": "train",
                "max_sequences": None}
    if isinstance(train, (str, Path)):
        train = {"path": str(train)}
    if not isinstance(train, dict) or "path" not in train:
        raise ValueError("options.train must be a path or a mapping with a 'path'")
    unknown = set(train) - {"path", "format", "split", "max_sequences"}
    if unknown:
        raise ValueError(f"options.train: unknown key {sorted(unknown)[0]!r}")
    return {"path": str(train["path"]), "format": train.get("format", "auto"),
            "split": train.get("split", "train"), "max_sequences": train.get("max_sequences")}


def training_counts(spec: dict) -> RoutingCounts:
    """Routing counts of a training spec (cached by path, modification time and split)."""
    p = Path(spec["path"]).expanduser()
    fmt = detect_format(p) if spec["format"] == "auto" else spec["format"]
    key = (str(p.resolve()), fmt, spec["split"], spec["max_sequences"], p.stat().st_mtime_ns if p.exists() else 0)
    if key not in _TRAINED:
        ss = open_sequences(p, fmt)
        idx = split_indices(ss.num_sequences, spec["split"], spec["max_sequences"])
        if len(idx) == 0:
            raise ValueError(f"options.train: split {spec['split']!r} of {p} holds no sequences")
        if len(_TRAINED) >= 8:
            _TRAINED.pop(next(iter(_TRAINED)))
        _TRAINED[key] = routing_counts(ss.subset(idx))
    return _TRAINED[key]


#: the largest smoothing pseudo-count (beyond it every probability is the popularity)
MAX_SMOOTHING = 1e6


class LearnedPrefetch(PrefetchPolicy):
    """Shared machinery: training, per-sequence history, ranking and how many to prefetch."""

    OPTIONS = frozenset({"train", "top_n", "smoothing"})

    def __init__(self, budget=None, train=None, top_n=None, smoothing=1.0, **options):
        super().__init__(budget)
        options.pop("accuracy", None)   # the planner passes every PrefetchSpec field
        self.check_options({"train": train, "top_n": top_n, "smoothing": smoothing, **options})
        self.train, self.top_n, self.smoothing = train, top_n, float(smoothing)

    @classmethod
    def check_options(cls, options: dict) -> None:
        super().check_options(options)
        top_n, smoothing = options.get("top_n"), options.get("smoothing", 1.0)
        if top_n is not None and (type(top_n) is not int or not 1 <= top_n <= 1 << 20):
            raise ValueError(f"prefetch {cls.name!r}: options.top_n must be a positive integer")
        if (type(smoothing) not in (int, float) or not math.isfinite(smoothing)
                or not 0 < smoothing <= MAX_SMOOTHING):
            raise ValueError(f"prefetch {cls.name!r}: options.smoothing must be a number in (0, {MAX_SMOOTHING:g}] "
                             "(0 leaves unseen experts with 0/0 probabilities)")
        train = options.get("train")
        if train is not None:
            if not isinstance(train, (str, dict)) or (isinstance(train, dict) and "path" not in train):
                raise ValueError(f"prefetch {cls.name!r}: options.train must be a path or a mapping with a 'path'")
            if isinstance(train, dict):
                unknown = set(train) - {"path", "format", "split", "max_sequences"}
                if unknown:
                    raise ValueError(f"prefetch {cls.name!r}: options.train: unknown key {sorted(unknown)[0]!r}")

    def prepare(self, ctx: PlanContext) -> None:
        counts = training_counts(training_source(self.train, ctx.trace))
        L, E = counts.single.shape
        if (L, E) != (ctx.model.num_layers, ctx.model.num_experts):
            raise ValueError(f"prefetch {self.name!r}: training trace has {L} layers and {E} experts, "
                             f"model {ctx.model.name} has {ctx.model.num_layers} and {ctx.model.num_experts}")
        a = self.smoothing
        self.E = E
        self.log1m_pop = np.log1p(-np.minimum(counts.popularity(a), 1 - 1e-9))
        stick, fresh = counts.stickiness(a)
        self.log1m_stick = np.log1p(-np.minimum(stick, 1 - 1e-9))
        self.log1m_fresh = np.log1p(-np.minimum(fresh, 1 - 1e-9))
        self.log1m_cond = np.log1p(-np.minimum(counts.conditional(a), 1 - 1e-9))
        self.trace = ctx.trace
        self.last: dict[int, np.ndarray] = {}   # sequence id -> (L, k) experts of its latest token

    def _seqs(self, step: int) -> np.ndarray:
        off = self.trace.step_offsets
        return self.trace.seq[off[step]:off[step + 1]]

    def observe(self, step, layer, routing):
        L, k = self.log1m_pop.shape[0], routing.shape[1]
        for row, sq in enumerate(self._seqs(step).tolist()):
            mine = self.last.get(sq)
            if mine is None:
                mine = self.last[sq] = np.full((L, k), -1, dtype=np.int64)
            mine[layer] = routing[row]

    def history_log1m(self, step: int, layer: int) -> np.ndarray:
        """log P(no token of ``step`` uses e at ``layer``) from each sequence's previous token."""
        seqs = self._seqs(step).tolist()
        prev = [h[layer] for h in (self.last.get(sq) for sq in seqs) if h is not None and h[layer, 0] >= 0]
        used = np.bincount(np.concatenate(prev), minlength=self.E) if prev else np.zeros(self.E)
        fresh_rows = len(prev) - used
        return (used * self.log1m_stick[layer] + fresh_rows * self.log1m_fresh[layer]
                + (len(seqs) - len(prev)) * self.log1m_pop[layer])

    def select(self, log1m_none: np.ndarray) -> list[int]:
        """The likeliest experts (lowest log P(unused)), as many as the model expects to be
        needed (the sum of their probabilities), or ``top_n``."""
        n = self.top_n or max(1, int(round(float((-np.expm1(log1m_none)).sum()))))
        order = np.lexsort((np.arange(self.E), log1m_none))
        return [int(e) for e in order[:n]]

    def score(self, req: PrefetchRequest) -> np.ndarray:
        """log P(no token needs e) for every expert of the target layer."""
        return self.history_log1m(req.target_step, req.target_layer)

    def predict(self, req):
        return self.select(self.score(req))


@register_prefetch("history")
class HistoryPrefetch(LearnedPrefetch):
    """Frequency/history predictor (popularity + per-sequence re-use), trained on a split."""


@register_prefetch("affinity")
class AffinityPrefetch(LearnedPrefetch):
    """Cross-layer predictor P(e' at l+1 | experts at l), trained on a split."""

    def score(self, req):
        if req.target_step == req.step and req.target_layer == req.layer + 1:
            used = np.bincount(req.current.ravel(), minlength=self.E)
            return used @ self.log1m_cond[req.layer] / req.current.shape[1]
        return super().score(req)


# ------------------------------------------------------------------------------ evaluation
def prefetch_quality(policy: PrefetchPolicy, trace: Trace, model, seed: int = 0) -> dict:
    """Precision and recall of a prefetch policy's predictions over a trace, replayed in the
    planner's order (after each layer-step's demand, predict the next layer-step; then observe
    the current one). Counted per target layer-step against its distinct experts, before any
    cache filtering; ``next_layer`` targets are layer l+1 of the same step, ``next_step`` the
    next step's layer 0."""
    ctx = PlanContext(trace=trace, model=model, batch_size=int(trace.max_step_tokens), seed=seed,
                      request_keys=np.zeros(0, np.int64))
    policy.prepare(ctx)
    L = trace.num_layers
    tally = {kind: {"hits": 0, "predicted": 0, "needed": 0} for kind in ("next_layer", "next_step")}
    for s in range(trace.num_steps):
        routing = trace.step(s)
        for l in range(L):
            cur = routing[:, l, :]
            ts, tl = (s, l + 1) if l + 1 < L else (s + 1, 0)
            if ts < trace.num_steps:
                ids, counts = np.unique(trace.step(ts)[:, tl, :], return_counts=True)
                future = [int(x) for x in ids[np.lexsort((ids, -counts))]]
                req = PrefetchRequest(step=s, layer=l, target_step=ts, target_layer=tl, current=cur, future=future)
                pred = list(dict.fromkeys(int(e) for e in policy.predict(req)))
                if policy.budget is not None:
                    pred = pred[:policy.budget]
                t = tally["next_layer" if ts == s else "next_step"]
                t["hits"] += len(set(pred) & set(future))
                t["predicted"] += len(pred)
                t["needed"] += len(future)
            policy.observe(s, l, cur)
    out = {}
    for kind, t in [*tally.items(), ("all", {k: sum(v[k] for v in tally.values()) for k in ("hits", "predicted", "needed")})]:
        out[kind] = {**t, "precision": t["hits"] / t["predicted"] if t["predicted"] else 0.0,
                     "recall": t["hits"] / t["needed"] if t["needed"] else 0.0}
    return out
