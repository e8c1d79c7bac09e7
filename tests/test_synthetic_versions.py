"""The vectorised sampler (generator version 2) draws the same distributions as version 1, one
cell at a time; version 1 still reproduces simmoe 0.1's traces; both are deterministic."""
from __future__ import annotations

import numpy as np
import pytest

from simulator.scenario import parse_scenario
from simulator.traces import generate

from conftest import scenario_dict

L, E, K, B, S = 6, 24, 3, 8, 120


def stats(tr) -> dict[str, np.ndarray]:
    """Per-seed statistics of a trace's decode steps."""
    off = tr.step_offsets
    first = 1 if tr.phase[0] == 1 else 0
    dec = tr.experts[off[first]:].reshape(-1, B, L, K).astype(int)
    onehot = np.zeros(dec.shape[:3] + (E,), bool)
    np.put_along_axis(onehot, dec, True, axis=3)
    unique = onehot.any(axis=1).sum(axis=2).mean()                       # per layer-step
    keep = (onehot[1:] & onehot[:-1]).sum(axis=3).mean() / K             # temporal reuse
    popularity = np.sort(onehot.sum(axis=(0, 1)), axis=1)[:, ::-1].mean(axis=0) / onehot.sum() * L
    return {"unique": unique, "keep": keep, "top_share": popularity[:3].sum()}


KNOBS = [
    dict(zipf=0.6, temporal=0.4),
    dict(zipf=0.9, batch_locality=0.6, batch_pool=4),
    dict(zipf=0.3, cross_layer=0.7),
    dict(zipf=0.8, temporal=0.3, batch_locality=0.4, batch_pool=5, cross_layer=0.3),
]


@pytest.mark.parametrize("knobs", KNOBS)
def test_versions_draw_the_same_distributions(knobs):
    per = {1: [], 2: []}
    for v in per:
        for seed in range(6):
            tr = generate(num_layers=L, num_experts=E, top_k=K, batch_size=B, steps=S, seed=seed,
                          generator="mixed", prefill_tokens=2, version=v, **knobs)
            tr.validate()
            per[v].append(stats(tr))
    for name in per[1][0]:
        a = np.array([x[name] for x in per[1]])
        b = np.array([x[name] for x in per[2]])
        se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
        assert abs(a.mean() - b.mean()) <= 4 * se + 0.01 * abs(a.mean()), (name, a.mean(), b.mean())


def test_version_2_is_deterministic_and_differs_from_version_1():
    kw = dict(num_layers=L, num_experts=E, top_k=K, batch_size=B, steps=20, seed=3, generator="mixed",
              zipf=0.5, temporal=0.5, cross_layer=0.5)
    a, b = generate(**kw), generate(**kw)
    assert np.array_equal(a.experts, b.experts) and a.meta["generator_version"] == 2
    assert not np.array_equal(a.experts, generate(**kw, version=1).experts)


def test_scenario_names_the_version_and_version_1_reproduces_it():
    sc = parse_scenario(scenario_dict())
    assert sc.effective()["trace"]["generator_version"] == 2
    old = parse_scenario(scenario_dict(trace={"generator": "mixed", "steps": 6, "zipf": 0.5, "generator_version": 1}))
    assert old.trace.generator_version == 1
    from simulator.errors import InputError

    with pytest.raises(InputError, match="generator_version"):
        parse_scenario(scenario_dict(trace={"generator": "mixed", "steps": 6, "generator_version": 7}))


def test_version_1_reproduces_simmoe_0_1_bit_for_bit():
    """The digest was computed with simmoe 0.1's own generator (commit 25d15fe)."""
    import hashlib

    tr = generate(num_layers=6, num_experts=24, top_k=3, batch_size=8, steps=20, seed=3, generator="mixed",
                  zipf=0.5, temporal=0.5, cross_layer=0.5, batch_locality=0.3, batch_pool=5, prefill_tokens=2,
                  version=1)
    assert hashlib.sha256(tr.experts.tobytes()).hexdigest() == (
        "fd11a414e883b6930947f10f5fdf507756d159f8f15918bb55ed2a4939fedf41")
