"""Policies, picked by name from the scenario. Importing this package registers them all."""
from . import cache, load, miss, placement, prefetch  # noqa: F401  (registration)
from . import learned  # noqa: F401  (registration: learned prefetch predictors)
from .base import (
    EVICTION_POLICIES, LOAD_MODES, MISS_POLICIES, PREFETCH_POLICIES, EvictionPolicy, LoadMode,
    MissPolicy, NoVictim, PlanContext, PrefetchPolicy, PrefetchRequest, register_eviction,
    register_load_mode, register_miss, register_prefetch,
)

__all__ = [
    "EVICTION_POLICIES", "LOAD_MODES", "MISS_POLICIES", "PREFETCH_POLICIES", "EvictionPolicy",
    "LoadMode", "MissPolicy", "NoVictim", "PlanContext", "PrefetchPolicy", "PrefetchRequest",
    "register_eviction", "register_load_mode", "register_miss", "register_prefetch",
]
