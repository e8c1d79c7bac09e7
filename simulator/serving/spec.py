"""The ``workload:`` section of a serving scenario and the per-policy ``serving:`` knobs.

A scenario with a ``workload:`` section is a serving run (docs/serving.md): requests arrive
(``arrivals``), each with a prompt and an output length (``prompt``, ``output``), and a
continuous-batching scheduler (``scheduler``) builds every engine step from them. Routing per
request comes from the scenario's ``trace:`` (a synthetic generator, or one recorded sequence
per request); each ``batch_sizes`` entry is the scheduler's maximum batch (sequences in flight).

Every key is checked here (pydantic); :func:`check_workload` adds the bounds that depend on
two sections (a prompt that fits no step, a KV cache that holds no request).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

#: bounds beyond which a workload is a typo
MAX_REQUESTS = 1_000_000
MAX_TOKENS = 1 << 20            # prompt or output tokens of one request
MAX_RATE = 1e6                  # requests per second
MAX_SECONDS = 1e9
MAX_EMPIRICAL = 10_000          # values of an empirical length table


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ArrivalSpec(_Strict):
    """When requests arrive: ``poisson`` at ``rate`` (requests/s); ``burst``: Poisson at
    ``rate`` during ``on_s`` seconds, none during ``off_s``, in turn; ``gamma``: gamma
    inter-arrival times of mean 1/rate and coefficient of variation ``cv`` (cv > 1 bursty);
    ``file``: arrival time, prompt and output length per request from a CSV or JSONL file."""

    kind: Literal["poisson", "burst", "gamma", "file"] = "poisson"
    rate: float | None = Field(None, gt=0, le=MAX_RATE, description="requests per second")
    on_s: float | None = Field(None, gt=0, le=MAX_SECONDS, description="burst: seconds on")
    off_s: float | None = Field(None, ge=0, le=MAX_SECONDS, description="burst: seconds off")
    cv: float | None = Field(None, gt=0, le=100, description="gamma: coefficient of variation of the gaps")
    path: str | None = Field(None, max_length=4096, description="file: CSV or JSONL with arrival_s, "
                                                               "prompt_tokens, output_tokens")

    @model_validator(mode="after")
    def _keys_of_kind(self):
        need = {"poisson": ("rate",), "burst": ("rate", "on_s", "off_s"), "gamma": ("rate", "cv"),
                "file": ("path",)}[self.kind]
        for k in need:
            if getattr(self, k) is None:
                raise ValueError(f"arrivals kind {self.kind!r} needs {k}")
        extra = [k for k in ("rate", "on_s", "off_s", "cv", "path") if k not in need and getattr(self, k) is not None]
        if extra:
            raise ValueError(f"arrivals kind {self.kind!r} takes no {extra[0]}")
        return self


class LengthSpec(_Strict):
    """A token-length distribution: ``fixed`` (``value``), ``uniform`` (``min``..``max``
    inclusive), ``lognormal`` (``mean`` tokens and ``sigma`` of the log, clipped to
    ``min``..``max``) or ``empirical`` (``values`` drawn with ``weights``)."""

    kind: Literal["fixed", "uniform", "lognormal", "empirical"] = "fixed"
    value: StrictInt | None = Field(None, ge=1, le=MAX_TOKENS)
    min: StrictInt = Field(1, ge=1, le=MAX_TOKENS)
    max: StrictInt | None = Field(None, ge=1, le=MAX_TOKENS)
    mean: float | None = Field(None, ge=1, le=MAX_TOKENS)
    sigma: float | None = Field(None, ge=0, le=10)
    values: list[StrictInt] | None = Field(None, min_length=1, max_length=MAX_EMPIRICAL)
    weights: list[float] | None = Field(None, min_length=1, max_length=MAX_EMPIRICAL)

    @field_validator("values")
    @classmethod
    def _values(cls, v):
        if v is not None and any(not 1 <= x <= MAX_TOKENS for x in v):
            raise ValueError(f"every value must be 1..{MAX_TOKENS:,} tokens")
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v):
        if v is not None and (any(w < 0 for w in v) or sum(v) <= 0):
            raise ValueError("weights must be non-negative with a positive sum")
        return v

    @model_validator(mode="after")
    def _keys_of_kind(self):
        need = {"fixed": ("value",), "uniform": ("max",), "lognormal": ("mean", "sigma"),
                "empirical": ("values",)}[self.kind]
        for k in need:
            if getattr(self, k) is None:
                raise ValueError(f"length kind {self.kind!r} needs {k}")
        if self.kind != "empirical" and (self.values is not None or self.weights is not None):
            raise ValueError(f"length kind {self.kind!r} takes no values/weights")
        if self.weights is not None and len(self.weights) != len(self.values or []):
            raise ValueError("weights must have one entry per value")
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self

    @property
    def upper(self) -> int:
        """The largest length this distribution can draw."""
        if self.kind == "fixed":
            return int(self.value)
        if self.kind == "empirical":
            return max(self.values)
        return int(self.max) if self.max is not None else MAX_TOKENS


class SchedulerSpec(_Strict):
    """Continuous batching: every step decodes one token of each running request, then fills
    the rest of ``token_budget`` with prompt tokens (FCFS; whole prompts, or ``chunk``-token
    pieces with chunked prefill). ``gpu_memory``: bytes for expert slots and KV cache together
    (the KV cache gets what the expert slots leave); none: the KV cache is not limited."""

    token_budget: StrictInt = Field(2048, ge=1, le=1 << 24, description="tokens per step")
    chunk: StrictInt | None = Field(None, ge=1, le=1 << 24, description="chunked prefill: prompt tokens per "
                                                                       "request and step (none: whole prompts)")
    gpu_memory: str | StrictInt | None = Field(None, description="bytes for expert slots + KV cache ('40 GiB')")
    kv_bytes_per_token: StrictInt | None = Field(None, ge=1, le=1 << 30,
                                                 description="KV bytes per token, all layers (default: from the "
                                                             "model's architecture)")

    @field_validator("gpu_memory")
    @classmethod
    def _mem(cls, v):
        if isinstance(v, str):
            from ..scenario import parse_bytes
            v = parse_bytes(v)
        if v is not None and not 0 < v <= 1 << 44:
            raise ValueError("must be a positive size no larger than 16 TiB")
        return v


class SloSpec(_Strict):
    """The latency target: a request meets it when its TTFT and its TPOT are both within."""

    ttft_ms: float = Field(2000.0, gt=0, le=1e9)
    tpot_ms: float = Field(100.0, gt=0, le=1e9)
    attainment: float = Field(0.9, gt=0, le=1, description="share of requests that must meet it "
                                                           "(the rate search's pass mark)")


class WorkloadSpec(_Strict):
    requests: StrictInt = Field(100, ge=1, le=MAX_REQUESTS, description="requests per run (file: at most)")
    arrivals: ArrivalSpec = Field(default_factory=lambda: ArrivalSpec(rate=1.0))
    prompt: LengthSpec = Field(default_factory=lambda: LengthSpec(value=128))
    output: LengthSpec = Field(default_factory=lambda: LengthSpec(value=64))
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    slo: SloSpec = Field(default_factory=SloSpec)
    rates: list[float] | None = Field(None, min_length=1, max_length=1000,
                                      description="arrival rates (requests/s) of simmoe serve-sweep")

    @field_validator("rates")
    @classmethod
    def _rates(cls, v):
        if v is not None and any(not 0 < r <= MAX_RATE for r in v):
            raise ValueError(f"every rate must be in (0, {MAX_RATE:g}] requests/s")
        return v


class PhaseSpec(_Strict):
    """Phase-aware knobs of one policy in serving (docs/serving.md):

    - ``prefill``: how prefill tokens' missed experts are placed: ``cache`` (through the cache,
      as decode), ``bypass`` (streamed through ``staging`` slots, never inserted: the decode
      working set stays), ``warm`` (bypass, but each layer's ``keep_top`` most-routed prefill
      experts enter the cache, warming it for the request's decode);
    - ``upload_budget``: at most this many expert copies per step (demand and prefetch), in
      steps with prefill tokens (``budget_phase: prefill``) or every step (``all``); missed
      experts past it run on the CPU (``budget_over: cpu``), or the step holds only the prompt
      tokens whose missed experts fit it and the rest of the prompt waits for later steps
      (``budget_over: defer``; decode tokens are never deferred);
    - ``prefill_prefetch``: the prefetch policy of steps with prefill tokens (default: the
      policy's ``prefetch``, which then serves decode-only steps).
    """

    prefill: str = "cache"
    staging: StrictInt | None = Field(None, ge=1, le=1 << 20, description="staging slots (default: a layer's experts)")
    keep_top: StrictInt = Field(4, ge=1, le=1 << 20, description="warm: prefill experts per layer admitted")
    upload_budget: StrictInt | None = Field(None, ge=0, le=1 << 30, description="expert copies per step")
    budget_phase: Literal["prefill", "all"] = "prefill"
    budget_over: Literal["cpu", "defer"] = Field("cpu", description="misses past upload_budget: run on the CPU, "
                                                                    "or defer the prompt tokens behind them")
    # prefill_prefetch (a PrefetchSpec) is added by simulator.scenario.ServingPolicySpec

    @model_validator(mode="after")
    def _defer_needs_a_budget(self):
        if self.budget_over == "defer" and self.upload_budget is None:
            raise ValueError("budget_over: defer needs an upload_budget to defer prompt tokens past")
        return self

    @field_validator("prefill")
    @classmethod
    def _prefill(cls, v):
        from .phase import PREFILL_POLICIES
        if v not in PREFILL_POLICIES:
            raise ValueError(f"unknown prefill policy {v!r}; known: {', '.join(PREFILL_POLICIES)}")
        return v


def check_workload(sc, source: str) -> None:
    """Bounds across sections: every max batch decodes within the token budget, every prompt
    fits a step unless prefill is chunked, no serving knob a policy cannot use."""
    from ..errors import InputError

    w = sc.workload
    if w is None:
        for i, p in enumerate(sc.policies):
            if p.serving != type(p.serving)():
                raise InputError(source, f"policies[{i}].serving", "serving knobs need a workload: section")
        return
    budget = w.scheduler.token_budget
    for b in sc.batch_sizes:
        if b > budget:
            raise InputError(source, "batch_sizes", f"max batch {b} exceeds workload.scheduler.token_budget "
                                                    f"{budget}: a step could not decode every running request")
    if w.scheduler.chunk is None and w.arrivals.kind != "file" and w.prompt.upper > budget:
        raise InputError(source, "workload.scheduler.chunk",
                         f"prompts of up to {w.prompt.upper:,} tokens exceed the token budget {budget:,}: "
                         "give chunk (chunked prefill), a larger token_budget or a smaller prompt.max")
    for i, p in enumerate(sc.policies):
        pf = p.serving.prefill_prefetch
        if pf is not None and pf.kind != "none" and p.cache.kind == "none":
            raise InputError(source, f"policies[{i}].serving.prefill_prefetch",
                             "prefetch needs a cache to hold what it fetches (cache.kind is 'none')")
        if pf is not None and pf.budget is not None and pf.budget > sc.model.num_experts:
            raise InputError(source, f"policies[{i}].serving.prefill_prefetch.budget",
                             f"{pf.budget} is more than the {sc.model.num_experts} experts of a layer")
