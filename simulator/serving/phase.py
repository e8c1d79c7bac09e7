"""Phase-aware policies of serving: small classes behind registries, picked by name.

- Prefill placement (``serving.prefill``, :data:`PREFILL_POLICIES`): decides, for an expert
  that a step's prefill tokens miss, whether it enters the cache (``admit``) or streams through
  a staging slot and leaves the cache as it was. An expert that a decode token of the same
  layer-step also routes to always enters the cache (the decode working set).
- :class:`UploadBudget`: a miss policy around the scenario's own that caps the expert copies of
  one step; the misses past the cap run on the CPU, or (``defer``) the cap is kept by the
  step's admission of prompt tokens (:meth:`~simulator.serving.planner.ServingPlanner.fit_prefill`)
  and every miss is copied (a step cannot skip an expert its tokens route to).

The planner side that applies them is :class:`simulator.serving.planner.ServingPlanner`.
"""
from __future__ import annotations

from typing import ClassVar

PREFILL_POLICIES: dict[str, type["PrefillPolicy"]] = {}


def register_prefill(name: str):
    def deco(cls):
        cls.name = name
        PREFILL_POLICIES[name] = cls
        return cls
    return deco


class PrefillPolicy:
    """Whether a missed expert that only prefill tokens route to enters the cache."""

    name: ClassVar[str]
    #: False: every prefill miss enters the cache (no staging slots needed)
    stages: ClassVar[bool] = True

    def __init__(self, keep_top: int = 4):
        self.keep_top = keep_top

    def admit(self, key: int, rank: int) -> bool:
        """``rank``: the expert's place among its layer's prefill experts, most routed first."""
        raise NotImplementedError


@register_prefill("cache")
class ThroughCache(PrefillPolicy):
    """Prefill misses enter the cache like decode misses (plain LRU serving)."""

    stages = False

    def admit(self, key, rank):
        return True


@register_prefill("bypass")
class Bypass(PrefillPolicy):
    """Prefill misses stream through staging slots: the decode working set is never evicted."""

    def admit(self, key, rank):
        return False


@register_prefill("warm")
class WarmBypass(PrefillPolicy):
    """Bypass, except each layer's ``keep_top`` most-routed prefill experts, which enter the
    cache: the prompt's hottest experts are the likeliest of its decode, so the cache is warm
    when the request starts decoding."""

    def admit(self, key, rank):
        return rank < self.keep_top


class UploadBudget:
    """A miss policy capping one step's expert copies at ``budget`` (demand and prefetch).
    ``inner`` is the scenario's miss policy (``None`` for ``copy``); a miss it sends to the CPU
    costs no budget. ``start_step(on)`` resets the count; off, the step is not capped.
    ``defer``: nothing goes to the CPU; a copy past the budget (the admission's estimate
    missed it: an expert evicted within the step) is still made, and counted in ``over``."""

    def __init__(self, inner, budget: int, defer: bool = False):
        self.inner, self.budget, self.defer = inner, budget, defer
        self.left: int | None = None
        self.over = 0                  # misses past the cap (whole run): sent to the CPU, or copied (defer)

    def start_step(self, on: bool) -> None:
        self.left = self.budget if on else None

    def take(self, n: int) -> None:
        if self.left is not None:
            self.left -= n

    @property
    def needs_queue(self) -> bool:
        return self.inner is not None and self.inner.needs_queue

    def route(self, expert, tokens, read, queue) -> str:
        """The inner policy's choice; a copy past the step's budget runs on the CPU instead."""
        how = self.inner.route(expert, tokens, read, queue) if self.inner is not None else "copy"
        if how != "copy":
            return how
        return "cpu" if self._over_budget() else "copy"

    def on_cpu(self, expert, tokens) -> bool:
        if self.inner is not None and self.inner.on_cpu(expert, tokens):
            return True
        return self._over_budget()

    def _over_budget(self) -> bool:
        """Counts one copy against the budget; True when none is left."""
        if self.left is None:
            return False
        if self.left <= 0:
            self.over += 1
            if not self.defer:
                return True
        self.left -= 1
        return False
