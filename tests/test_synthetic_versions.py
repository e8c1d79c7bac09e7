"""The vectorised sampler (generator version 2) draws the same distributions as version 1, one
cell at a time; version 3 (no key per expert when E > 8 k) the same as version 2; versions 1
and 2 still reproduce their traces bit for bit; all are deterministic."""
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
    a, b = generate(**kw, version=2), generate(**kw, version=2)
    assert np.array_equal(a.experts, b.experts) and a.meta["generator_version"] == 2
    assert not np.array_equal(a.experts, generate(**kw, version=1).experts)


# ------------------------------------------------------------------ version 3 against 2
V3 = dict(num_layers=3, num_experts=64, top_k=3, batch_size=8)        # E > 8 k: version 3's own draw
BATCHES, BATCH_STEPS = 24, 25
HOT = 8                                 # pairs among each layer's HOT most popular experts


def fine_stats(tr) -> np.ndarray:
    """Per batch of BATCH_STEPS decode steps, one vector: each (layer, expert)'s share of the
    picks, of the first picks (the order of a token's experts) and of the second, and the
    co-occurrence in one token of every pair of each layer's HOT most popular experts."""
    Lq, Eq, Kq, Bq = V3["num_layers"], V3["num_experts"], V3["top_k"], V3["batch_size"]
    dec = tr.experts.reshape(BATCHES, BATCH_STEPS * Bq, Lq, Kq).astype(int)
    onehot = np.zeros(dec.shape[:3] + (Eq,))
    np.put_along_axis(onehot, dec, 1.0, axis=3)
    pick = onehot.mean(axis=1) / Kq                                        # (batches, L, E)
    pos = [np.stack([np.bincount(d.ravel(), minlength=Eq) for d in dec[:, :, l, j]]) / dec.shape[1]
           for j in (0, 1) for l in range(Lq)]
    hot = np.argsort(-pick.mean(axis=0), axis=1)[:, :HOT]                  # (L, HOT)
    sub = np.take_along_axis(onehot, hot[None, None], axis=3)             # (batches, rows, L, HOT)
    co = np.einsum("brli,brlj->blij", sub, sub) / dec.shape[1]
    iu = np.triu_indices(HOT, 1)
    return np.concatenate([pick.reshape(BATCHES, -1), np.concatenate(pos, axis=1), co[:, :, iu[0], iu[1]].reshape(BATCHES, -1)],
                          axis=1)


def same_distribution(a: np.ndarray, b: np.ndarray) -> float:
    """The largest |difference of batch means| / its standard error over every entry."""
    se = np.sqrt(a.var(axis=0, ddof=1) / len(a) + b.var(axis=0, ddof=1) / len(b)) + 1e-4
    return float(np.max(np.abs(a.mean(axis=0) - b.mean(axis=0)) / se))


V3_KNOBS = [
    dict(zipf=0.8),
    dict(zipf=0.6, temporal=0.4),
    dict(zipf=0.9, batch_locality=0.6, batch_pool=4),
    dict(zipf=0.8, temporal=0.3, batch_locality=0.4, batch_pool=5, cross_layer=0.3),
    dict(zipf=12.0, temporal=0.2),      # skew so heavy that most rows end in the Gumbel fallback
]


@pytest.mark.parametrize("knobs", V3_KNOBS)
def test_version_3_draws_the_same_distribution_as_version_2(knobs):
    """Same seed, so the same popularity rankings and affinity maps; the routing drawn by
    each version is an independent sample of the same process: marginals, first and second
    picks and pairwise co-occurrence agree within 6 standard errors (batch means)."""
    kw = dict(**V3, steps=BATCHES * BATCH_STEPS, seed=5, generator="mixed", **knobs)
    a, b = generate(**kw, version=2), generate(**kw, version=3)
    b.validate()
    assert b.meta["generator_version"] == 3 and not np.array_equal(a.experts, b.experts)
    assert same_distribution(fine_stats(a), fine_stats(b)) < 6


def test_the_comparison_sees_a_wrong_distribution():
    """The check above fails on a sampler that differs a little: popularity skew 0.8 vs 0.7,
    or (skew 1.5) the same sets with a token's experts in a random order."""
    kw = dict(**V3, steps=BATCHES * BATCH_STEPS, seed=5, generator="mixed")
    ref = fine_stats(generate(**kw, version=2, zipf=0.8))
    assert same_distribution(ref, fine_stats(generate(**kw, version=3, zipf=0.7))) > 6
    ref = fine_stats(generate(**kw, version=2, zipf=1.5))
    shuffled = generate(**kw, version=3, zipf=1.5)
    assert same_distribution(ref, fine_stats(shuffled)) < 6
    np.random.default_rng(0).permuted(shuffled.experts, axis=2, out=shuffled.experts)
    assert same_distribution(ref, fine_stats(shuffled)) > 6


def test_version_3_is_version_2_for_few_experts_and_deterministic():
    kw = dict(num_layers=L, num_experts=E, top_k=K, batch_size=B, steps=20, seed=3, generator="mixed",
              zipf=0.5, temporal=0.5, cross_layer=0.5, batch_locality=0.3, batch_pool=5, prefill_tokens=2)
    assert E <= 8 * K
    assert np.array_equal(generate(**kw, version=3).experts, generate(**kw, version=2).experts)
    big = dict(kw, num_experts=256)
    a, b = generate(**big), generate(**big)
    assert a.meta["generator_version"] == 3 and np.array_equal(a.experts, b.experts)
    a.validate()


def test_version_2_reproduces_its_traces_bit_for_bit():
    """The digest was computed with version 2 when it was the default (commit 49f2398)."""
    import hashlib

    tr = generate(num_layers=6, num_experts=24, top_k=3, batch_size=8, steps=20, seed=3, generator="mixed",
                  zipf=0.5, temporal=0.5, cross_layer=0.5, batch_locality=0.3, batch_pool=5, prefill_tokens=2,
                  version=2)
    assert hashlib.sha256(tr.experts.tobytes()).hexdigest() == (
        "9adfe13632a15c5bf7fba4ecc59831aec8d01597735685ce8d8b9c63bc04f568")


def test_scenario_names_the_version_and_version_1_reproduces_it():
    sc = parse_scenario(scenario_dict())
    assert sc.effective()["trace"]["generator_version"] == 3
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
