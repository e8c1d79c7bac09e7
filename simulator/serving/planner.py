"""The planner of a serving run: the simulator's :class:`~simulator.planner.Planner` over a
trace that grows one scheduled step at a time, with the phase-aware policies applied.

:class:`StepTrace` holds the steps the scheduler has built so far (routing rows, the sequence
and the kind of each token: prefill or decode); :class:`ServingPlanner` plans each of them as
the plain planner does, with three hooks (no change to the planner's own loop):

- the step's prefetch policy: ``serving.prefill_prefetch`` in steps with prefill tokens, the
  policy's ``prefetch`` otherwise;
- ``_insert_demand``: a missed expert that no decode token of the layer-step routes to goes
  where the prefill policy says: into the cache, or into the next staging slot (a ring after
  the cache's slots; the engine's slot rule makes a load wait for the last compute that read
  its slot, so reuse is safe);
- ``serving.upload_budget``: an :class:`~simulator.serving.phase.UploadBudget` miss policy,
  and the step's prefetches capped at what the budget has left; with ``budget_over: defer``,
  :meth:`ServingPlanner.fit_prefill` tells the driver how many of a step's prompt tokens fit
  the budget (the rest wait for later steps) and every miss is copied.
"""
from __future__ import annotations

import numpy as np

from ..planner import Planner
from ..policies import PREFETCH_POLICIES, PrefetchPolicy
from ..traces.trace import expert_dtype
from .phase import PREFILL_POLICIES, UploadBudget

PREFILL, DECODE = 1, 0
#: policies that need the whole run's request stream ahead (unknown while serving)
NEEDS_FUTURE = {"cache": ("belady", "static-hot"), "prefetch": ("history", "affinity")}


class StepTrace:
    """The routing of the steps scheduled so far (a :class:`~simulator.traces.Trace`'s reading
    side: ``step``, ``phase``, shape). ``max_step_tokens`` is the scheduler's token budget.
    A step's rows are dropped once the planner has planned the next (``keep=False``)."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, token_budget: int, keep: bool = False):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.max_step_tokens = token_budget
        self.keep = keep
        self.dtype = expert_dtype(num_experts)
        self.rows: list[np.ndarray | None] = []
        self.kinds: list[np.ndarray | None] = []
        self.seqs: list[np.ndarray | None] = []
        self.phase: list[int] = []           # 1 when the step has prefill tokens
        self.meta: dict = {"generator": "serving"}

    @property
    def num_steps(self) -> int:
        return len(self.rows)

    def append(self, rows: np.ndarray, kinds: np.ndarray, seqs: np.ndarray) -> int:
        self.rows.append(rows.astype(self.dtype, copy=False))
        self.kinds.append(kinds)
        self.seqs.append(seqs)
        self.phase.append(int(kinds.any()))
        return len(self.rows) - 1

    def step(self, s: int) -> np.ndarray:
        return self.rows[s]

    def done(self, s: int) -> None:
        """Step ``s`` is planned: drop the step before it (a live executor still reads ``s``)."""
        if not self.keep and s > 0:
            self.rows[s - 1] = self.kinds[s - 1] = self.seqs[s - 1] = None


class ServingPlanner(Planner):
    """A planner for a :class:`StepTrace`, with the policy's ``serving`` knobs applied."""

    def __init__(self, model, policy, trace: StepTrace, seed: int = 0):
        for what, names in NEEDS_FUTURE.items():
            kind = getattr(policy, what).kind
            if kind in names:
                raise ValueError(f"{what} {kind!r} needs the run's whole request stream ahead, which a "
                                 "serving run does not know (requests arrive as it runs)")
        super().__init__(model, policy, trace, seed=seed)
        self.staged = False   # Planner's bulk path for a cache that keeps nothing knows no serving knob
        ph = policy.serving
        self.placement = PREFILL_POLICIES[ph.prefill](keep_top=ph.keep_top)
        self.staging = (ph.staging or model.num_experts) if self.placement.stages else 0
        self.staging_base = super().total_slots
        self._ring = 0
        self.staged_loads = 0                         # prefill misses streamed through staging
        pf = ph.prefill_prefetch
        decode_pf = (self.prefetch, self.prefetch_on, self.observes)
        if pf is None:
            self._prefetch_of = {DECODE: decode_pf, PREFILL: decode_pf}
        else:
            obj = PREFETCH_POLICIES[pf.kind](budget=pf.budget, accuracy=pf.accuracy, **pf.options)
            from ..planner import LazyPlanContext, RequestStream
            obj.prepare(LazyPlanContext(trace, model, trace.max_step_tokens, seed + 1,
                                        RequestStream(trace, model, self.load)))
            self._prefetch_of = {DECODE: decode_pf,
                                 PREFILL: (obj, pf.kind != "none", type(obj).observe is not PrefetchPolicy.observe)}
        self.budget = None
        self.defers = ph.upload_budget is not None and ph.budget_over == "defer"
        self.deferred = 0                             # prompt tokens moved to a later step (defer)
        if ph.upload_budget is not None:
            self.budget = UploadBudget(None if self.miss_copies else self.miss, ph.upload_budget, self.defers)
            self.budget_all = ph.budget_phase == "all"
            self.miss, self.miss_copies = self.budget, False
        self._stage_of: list[dict[int, bool]] | None = None

    @property
    def total_slots(self) -> int:
        return super().total_slots + self.staging

    def plan_step(self, s: int):
        kinds = self.trace.kinds[s]
        prefill = bool(kinds.any())
        self.prefetch, self.prefetch_on, self.observes = self._prefetch_of[PREFILL if prefill else DECODE]
        if self.budget is not None:
            self.budget.start_step(prefill or self.budget_all)
        self._stage_of = self._placements(s, kinds) if prefill and self.staging else None
        out = super().plan_step(s)
        self.trace.done(s)
        return out

    def _placements(self, s: int, kinds: np.ndarray) -> list[dict[int, bool]]:
        """Per layer: {key: admit?} for the experts only prefill tokens route to."""
        rows = self.trace.step(s)
        E = self.E
        out = []
        pre, dec = rows[kinds == PREFILL], rows[kinds == DECODE]
        for l in range(self.L):
            ids, counts = np.unique(pre[:, l, :], return_counts=True)
            order = np.lexsort((ids, -counts))
            decoded = set(np.unique(dec[:, l, :]).tolist()) if len(dec) else set()
            place = {}
            rank = 0
            for i in order.tolist():
                e = int(ids[i])
                if e in decoded:
                    continue
                place[l * E + e] = self.placement.admit(l * E + e, rank)
                rank += 1
            out.append(place)
        return out

    def _insert_demand(self, cache, key, s, l, keys, d):
        if self._stage_of is not None and self._stage_of[l].get(key) is False:
            slot = self.staging_base + self._ring
            self._ring = (self._ring + 1) % self.staging
            self.staged_loads += 1
            return slot
        return super()._insert_demand(cache, key, s, l, keys, d)

    def _plan_prefetch(self, s, l, step, d):
        b = self.budget
        if b is None or b.left is None:
            return super()._plan_prefetch(s, l, step, d)
        if b.left <= 0:
            return []
        saved = self.prefetch.budget
        self.prefetch.budget = b.left if saved is None else min(saved, b.left)
        try:
            ops = super()._plan_prefetch(s, l, step, d)
        finally:
            self.prefetch.budget = saved
        b.take(sum(len(op[2]) for op in ops))
        return ops

    def fit_prefill(self, rows: np.ndarray, kinds: np.ndarray) -> int:
        """``budget_over: defer``: how many of a coming step's prompt tokens (in the step's
        order) keep its expert uploads within ``upload_budget``. The uploads are counted from
        the cache as it is before the step: the distinct experts the decode tokens miss (never
        deferred) and, token by token, those each prompt token misses first. A step without
        decode tokens keeps at least one prompt token (every prompt progresses). The count
        is an estimate: an expert evicted within the step by an earlier layer's load is a miss
        it did not count (copied anyway; ``UploadBudget.over`` counts such copies)."""
        E = self.E
        keys = rows.astype(np.int64) + (np.arange(self.L, dtype=np.int64) * E)[None, :, None]
        resident = np.zeros(self.L * E, bool)
        for c in self.caches:
            resident[list(c.slot_of)] = True
        dec = keys[kinds == DECODE].ravel()
        dec_miss = np.unique(dec[~resident[dec]])
        pre = keys[kinds == PREFILL].reshape(int((kinds == PREFILL).sum()), -1)
        flat = pre.ravel()
        tok = np.repeat(np.arange(len(pre)), pre.shape[1])
        miss = ~resident[flat] & ~np.isin(flat, dec_miss)
        _, first = np.unique(flat[miss], return_index=True)
        new = np.bincount(tok[miss][first], minlength=len(pre))
        n = int(np.searchsorted(np.cumsum(new), self.budget.budget - len(dec_miss), side="right"))
        if n == 0 and not len(dec):
            n = 1
        self.deferred += len(pre) - n
        return n
