"""The policy interfaces. Policies decide *what* (load, keep, evict, prefetch, where a miss
runs); they never decide *when*: the engine (SimPy) or the live GPU executor does that.

Four families, each a small base class with a registry keyed by the name a scenario uses:

- :class:`LoadMode`: turns one layer-step's routing into the ordered list of expert requests.
- :class:`EvictionPolicy`: which resident expert leaves the GPU cache when a slot is needed.
- :class:`PrefetchPolicy`: which experts of the next layer to copy ahead of time.
- :class:`MissPolicy`: whether a missed expert is copied to the GPU or run on the host CPU.

Keys are ints ``layer * num_experts + expert``; ``t`` is the index of the current request in
the run's request stream (a logical clock, not time).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, ClassVar, Iterable, Mapping, Sequence

import numpy as np

from ..models import ModelSpec
from ..traces import Trace


def _registry(kind: str):
    table: dict[str, type] = {}

    def register(name: str) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            if name in table:
                raise ValueError(f"{kind} policy {name!r} registered twice")
            cls.name = name
            table[name] = cls
            return cls
        return deco
    return table, register


LOAD_MODES, register_load_mode = _registry("load")
EVICTION_POLICIES, register_eviction = _registry("cache")
PREFETCH_POLICIES, register_prefetch = _registry("prefetch")
MISS_POLICIES, register_miss = _registry("miss")


@dataclass(frozen=True)
class PlanContext:
    """What policies may look at before the run starts (popularity, the future)."""

    trace: Trace
    model: ModelSpec
    batch_size: int
    seed: int
    request_keys: np.ndarray  # int64: the run's whole request stream, in order (oracle use only)


class LoadMode(ABC):
    """How a step's routing becomes expert requests, layer by layer.

    Both methods take a :class:`~simulator.planner.StepRouting` (the step's routing with its
    cache keys ``layer * E + expert``, distinct keys and counts, computed once per step)."""

    name: ClassVar[str]
    #: all misses of a layer go in one copy
    coalesce: ClassVar[bool] = False
    #: a layer's requests name distinct experts (per-item loads repeat them): the planner may
    #: take its fast path for LRU/FIFO caches
    distinct: ClassVar[bool] = False

    @abstractmethod
    def requests(self, step) -> list[tuple[list[int], list[int]]]:
        """Per layer, ``(keys, tokens)``: the requested keys in the order they are served and
        the tokens each one carries."""

    @abstractmethod
    def request_keys(self, step) -> np.ndarray:
        """The step's requested keys, all layers in order (the request stream a cache sees)."""


class NoVictim(Exception):
    """Every resident is held (protected): there is nothing to evict."""


class EvictionPolicy(ABC):
    """Bookkeeping for one cache's residents; picks victims. Never sees time.

    A resident may be *held* (in the ``protected`` set passed to :meth:`victim`) for a coming
    layer-step; :meth:`on_release` says when a hold ends, so a policy may set held residents
    aside instead of walking past them at every victim search.
    """

    name: ClassVar[str]

    def __init__(self, capacity: int, **options) -> None:
        self.capacity = capacity

    def prepare(self, ctx: PlanContext, layers: Sequence[int]) -> None:
        """Called once before the run with the layers this cache serves."""

    def preload(self) -> list[int]:
        """Keys resident before the first step (static-hot); default none."""
        return []

    @abstractmethod
    def on_hit(self, key: int, t: int) -> None: ...

    @abstractmethod
    def on_insert(self, key: int, t: int) -> None: ...

    @abstractmethod
    def on_remove(self, key: int) -> None: ...

    #: held residents this policy has set aside; ``on_release`` is needed only for these (a
    #: policy that parks overrides this with its own, live, mapping)
    parked: Mapping[int, object] = MappingProxyType({})

    def on_release(self, key: int) -> None:
        """The hold on resident ``key`` has ended (it may be a victim again). Called for the
        keys in :attr:`parked`."""

    @abstractmethod
    def victim(self, protected, t: int) -> int:
        """A resident key not in ``protected``; raises :class:`NoVictim` if there is none."""

    def replace(self, key: int, t: int, protected) -> int:
        """The cache is full: evict a victim (:meth:`victim`, then :meth:`on_remove`), insert
        ``key`` (:meth:`on_insert`) and return the victim. One call where the cache would make
        three; a policy may override it with a faster path that does the same."""
        v = self.victim(protected, t)
        self.on_remove(v)
        self.on_insert(key, t)
        return v


@dataclass(slots=True)
class PrefetchRequest:
    """What a prefetch policy knows when the current layer's demand has been issued."""

    step: int
    layer: int
    target_step: int
    target_layer: int
    current: np.ndarray  # (tokens, top_k) routing of the current layer-step
    #: the target layer-step's true experts, most-routed first. ORACLE KNOWLEDGE: only the
    #: oracle and accuracy-controlled predictors may read it.
    future: list[int]


class PrefetchPolicy(ABC):
    name: ClassVar[str]
    #: :meth:`predict` returns distinct Python ints (the planner then checks neither)
    plain_picks: ClassVar[bool] = False
    #: the keys of ``prefetch.options`` this policy takes (a scenario naming any other is refused)
    OPTIONS: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, budget: int | None = None, **options) -> None:
        self.budget = budget

    @classmethod
    def check_options(cls, options: dict) -> None:
        """Refuse (ValueError) unknown option keys and bad values; subclasses check values."""
        unknown = sorted(set(options) - cls.OPTIONS)
        if unknown:
            known = ", ".join(sorted(cls.OPTIONS)) or "none"
            raise ValueError(f"prefetch {cls.name!r}: unknown option {unknown[0]!r} (known: {known})")

    def prepare(self, ctx: PlanContext) -> None:
        """Called once before the run (training data, seeds)."""

    def observe(self, step: int, layer: int, routing: np.ndarray) -> None:
        """The routing ``(tokens, top_k)`` of a layer-step once it has been served."""

    @abstractmethod
    def predict(self, req: PrefetchRequest) -> Iterable[int]:
        """Experts of the target layer to prefetch, most wanted first."""


class MissPolicy(ABC):
    name: ClassVar[str]
    #: the policy reads the planner's predicted stream times (:class:`~simulator.tiers.QueueModel`)
    needs_queue: ClassVar[bool] = False

    def __init__(self, **options) -> None:
        pass

    @abstractmethod
    def on_cpu(self, expert: int, tokens: int) -> bool:
        """True: run this missed expert on the host CPU; False: copy it to the GPU."""

    def route(self, expert: int, tokens: int, read: bool, queue) -> str:
        """Where a missed expert runs: ``copy`` (to a GPU slot), ``cpu`` (on the host) or
        ``direct`` (on the GPU from mapped host memory). ``read``: it must come from disk
        first; ``queue``: the planner's :class:`~simulator.tiers.QueueModel` (None unless
        :attr:`needs_queue`). Returns the choice; a policy that needs the queue also commits
        the chosen option to it."""
        return "cpu" if self.on_cpu(expert, tokens) else "copy"
