"""Continuous batching: which tokens of which requests each engine step runs.

The scheduler knows nothing of the engine: :meth:`Scheduler.build` makes the next step at a
time ``now`` (ms) and :meth:`Scheduler.finish` is told when it ended. Rules (vLLM-style, no
preemption):

- **Admission, FCFS**: a request that has arrived by ``now`` joins the running set when fewer
  than ``max_batch`` requests run and the KV cache has room for its whole life
  (``prompt + output - 1`` tokens, reserved at admission and freed when it finishes, so a
  running request never runs out of KV). The queue's head blocks everyone behind it.
- **A step**: one decode token for every running request past its prefill (in admission
  order), then prompt tokens of the requests still prefilling, in admission order, until the
  step holds ``token_budget`` tokens: the whole remaining prompt (no chunking: a prompt that
  does not fit waits for a step where it does), or pieces of at most ``chunk`` tokens.
- **Tokens**: the step that ends a request's prompt produces its first output token (TTFT);
  each decode step one more; a request finishes with its ``output``-th token.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .workload import Request

PREFILL, DECODE = 1, 0


@dataclass
class Running:
    req: Request
    admit_ms: float
    prefilled: int = 0        # prompt tokens done
    produced: int = 0         # output tokens produced
    first_ms: float | None = None


@dataclass
class Item:
    """One request's share of a step: ``count`` tokens of ``kind`` from row ``row0`` of its
    routing (prompt rows first, then one row per decode step)."""

    rid: int
    kind: int
    row0: int
    count: int


@dataclass
class StepPlan:
    index: int
    start_ms: float
    items: list[Item]

    @property
    def tokens(self) -> int:
        return sum(i.count for i in self.items)

    @property
    def prefill_tokens(self) -> int:
        return sum(i.count for i in self.items if i.kind == PREFILL)

    @property
    def decode_tokens(self) -> int:
        return sum(i.count for i in self.items if i.kind == DECODE)


@dataclass
class Finished:
    req: Request
    admit_ms: float
    first_ms: float
    finish_ms: float


@dataclass
class Scheduler:
    requests: list[Request]
    max_batch: int
    token_budget: int
    chunk: int | None = None
    kv_tokens: int | None = None             # KV capacity in tokens (None: unlimited)
    waiting: deque = field(init=False)
    running: list[Running] = field(init=False, default_factory=list)
    done: list[Finished] = field(init=False, default_factory=list)
    kv_used: int = field(init=False, default=0)
    steps: int = field(init=False, default=0)
    peak_kv: int = field(init=False, default=0)
    peak_batch: int = field(init=False, default=0)

    def __post_init__(self):
        if self.max_batch > self.token_budget:
            raise ValueError(f"max batch {self.max_batch} exceeds the token budget {self.token_budget}: "
                             "a step could not decode every running request")
        for r in self.requests:
            if self.kv_tokens is not None and r.kv_tokens > self.kv_tokens:
                raise ValueError(f"request {r.rid} needs {r.kv_tokens:,} KV tokens; the KV cache holds "
                                 f"{self.kv_tokens:,}: nothing fits")
            if self.chunk is None and r.prompt > self.token_budget:
                raise ValueError(f"request {r.rid}'s prompt of {r.prompt:,} tokens exceeds the token budget "
                                 f"{self.token_budget:,}: give scheduler.chunk (chunked prefill) or a larger budget")
        self.waiting = deque(sorted(self.requests, key=lambda r: (r.arrival_ms, r.rid)))

    @property
    def finished(self) -> bool:
        return not self.waiting and not self.running

    def next_arrival(self) -> float:
        return self.waiting[0].arrival_ms

    def _admit(self, now: float) -> None:
        w = self.waiting
        while w and w[0].arrival_ms <= now and len(self.running) < self.max_batch:
            need = w[0].kv_tokens
            if self.kv_tokens is not None and self.kv_used + need > self.kv_tokens:
                break
            self.kv_used += need
            self.running.append(Running(w.popleft(), now))
        self.peak_kv = max(self.peak_kv, self.kv_used)
        self.peak_batch = max(self.peak_batch, len(self.running))

    def build(self, now: float) -> StepPlan | None:
        """The step starting at ``now``, or None when nothing can run before the next arrival."""
        self._admit(now)
        items: list[Item] = []
        left = self.token_budget
        for r in self.running:
            if r.prefilled == r.req.prompt:
                items.append(Item(r.req.rid, DECODE, r.req.prompt + r.produced - 1, 1))
                left -= 1
        for r in self.running:
            rest = r.req.prompt - r.prefilled
            if rest == 0:
                continue
            n = min(rest, left, self.chunk) if self.chunk is not None else (rest if rest <= left else 0)
            if n <= 0:
                break                  # FCFS: nobody behind an unserved prompt goes first
            items.append(Item(r.req.rid, PREFILL, r.prefilled, n))
            left -= n
        if not items:
            return None
        plan = StepPlan(self.steps, now, items)
        self.steps += 1
        return plan

    def finish(self, plan: StepPlan, end_ms: float) -> None:
        by_id = {r.req.rid: r for r in self.running}
        for it in plan.items:
            r = by_id[it.rid]
            if it.kind == PREFILL:
                r.prefilled += it.count
                if r.prefilled == r.req.prompt:
                    r.produced, r.first_ms = 1, end_ms
            else:
                r.produced += 1
        keep = []
        for r in self.running:
            if r.produced == r.req.output:
                self.kv_used -= r.req.kv_tokens
                self.done.append(Finished(r.req, r.admit_ms, r.first_ms, end_ms))
            else:
                keep.append(r)
        self.running = keep
