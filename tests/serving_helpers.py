"""Small serving scenarios for the serving tests (a 4-layer, 16-expert model on the default profile)."""
from __future__ import annotations

from simulator.scenario import parse_scenario


def serving_dict(**over) -> dict:
    d = {
        "name": "serve", "model": {"preset": "published-study", "num_layers": 4, "num_experts": 16},
        "seed": 3, "replications": 1, "batch_sizes": [4],
        "trace": {"generator": "mixed", "zipf": 0.8, "temporal": 0.6},
        "workload": {"requests": 12, "arrivals": {"kind": "poisson", "rate": 20.0},
                     "prompt": {"kind": "uniform", "min": 4, "max": 24}, "output": {"kind": "uniform", "min": 1, "max": 8},
                     "scheduler": {"token_budget": 32, "chunk": 16}, "slo": {"ttft_ms": 500, "tpot_ms": 100}},
        "policies": [{"name": "lru", "cache": {"kind": "lru", "capacity": 24}}],
    }
    for k, v in over.items():
        if k == "workload":
            d["workload"] = {**d["workload"], **v}
        else:
            d[k] = v
    return d


def serving_scenario(**over):
    return parse_scenario(serving_dict(**over))
