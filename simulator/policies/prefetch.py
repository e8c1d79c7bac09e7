"""Prefetch policies: none, oracle next-layer, predicted (gate speculation with a given
accuracy), popularity. Learned predictors register here too."""
from __future__ import annotations

import numpy as np

from .base import PlanContext, PrefetchPolicy, register_prefetch


@register_prefetch("none")
class NoPrefetch(PrefetchPolicy):
    plain_picks = True

    def predict(self, req):
        return ()


@register_prefetch("oracle")
class OracleNextLayer(PrefetchPolicy):
    """Prefetch exactly what the next layer will need (the bound for next-layer prefetch)."""

    plain_picks = True

    def predict(self, req):
        return req.future


@register_prefetch("predicted")
class PredictedNextLayer(PrefetchPolicy):
    """Gate speculation with a given accuracy: each expert the next layer needs is predicted
    with probability ``accuracy``, otherwise a wrong expert is predicted in its place."""

    plain_picks = True      # the right ones, and wrong ones drawn without replacement from the rest

    def __init__(self, budget=None, accuracy: float = 0.8, **options):
        super().__init__(budget)
        self.accuracy = accuracy

    def prepare(self, ctx: PlanContext):
        self.rng = np.random.Generator(np.random.PCG64([ctx.seed, 0x9E37]))
        self.num_experts = ctx.model.num_experts

    def predict(self, req):
        future = req.future
        hit = self.rng.random(len(future)) < self.accuracy
        n_wrong = len(future) - int(np.count_nonzero(hit))
        if not n_wrong:                     # (a draw of no wrong expert draws nothing)
            return list(future)
        others = np.ones(self.num_experts, dtype=bool)
        others[future] = False
        wrong_pool = np.flatnonzero(others)         # the experts not needed, ascending
        wrong = self.rng.choice(wrong_pool, size=min(n_wrong, len(wrong_pool)), replace=False).tolist()
        out, w = [], iter(wrong)
        for e, ok in zip(future, hit.tolist()):
            if ok:
                out.append(e)
            else:
                nxt = next(w, None)
                if nxt is not None:
                    out.append(int(nxt))
        return out


@register_prefetch("popularity")
class Popularity(PrefetchPolicy):
    """Prefetch the next layer's historically most routed experts (online counts); as many as
    the layer needed on average so far, unless a budget says fewer."""

    plain_picks = True

    def prepare(self, ctx: PlanContext):
        self.counts = np.zeros((ctx.model.num_layers, ctx.model.num_experts), dtype=np.int64)
        self.unique_sum = np.zeros(ctx.model.num_layers)
        self.seen = np.zeros(ctx.model.num_layers, dtype=np.int64)

    def observe(self, step, layer, routing):
        ids = routing.ravel()
        self.counts[layer] += np.bincount(ids, minlength=self.counts.shape[1])
        self.unique_sum[layer] += len(np.unique(ids))
        self.seen[layer] += 1

    def predict(self, req):
        l = req.target_layer
        if self.seen[l] == 0:
            return ()
        n = max(1, int(round(self.unique_sum[l] / self.seen[l])))
        c = self.counts[l]
        order = np.lexsort((np.arange(len(c)), -c))
        return [int(e) for e in order[:n] if c[e] > 0]
