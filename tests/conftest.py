"""Shared fixtures: small scenarios and the shared-material location."""
from __future__ import annotations

from pathlib import Path

import pytest

from simulator.scenario import parse_scenario

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def scenario_dict(**over) -> dict:
    d = {
        "name": "t", "model": {"preset": "published-study", "num_layers": 4, "num_experts": 16},
        "seed": 1, "replications": 2, "batch_sizes": [1, 4],
        "trace": {"generator": "mixed", "steps": 6, "zipf": 0.5, "batch_locality": 0.5},
        "policies": [{"name": "dedup", "load": "dedup"}],
    }
    d.update(over)
    return d


@pytest.fixture
def small_scenario():
    return parse_scenario(scenario_dict())
