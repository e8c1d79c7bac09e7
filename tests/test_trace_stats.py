"""Routing statistics on small hand-made traces with known answers, the LRU curve against the
simulator's own LRU cache, and the ``trace stats`` command."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from simulator.models import ModelSpec
from simulator.planner import Planner
from simulator.scenario import PolicySpec
from simulator.traces import expected_unique_uniform, generate
from simulator.traces.real import SequenceSet, batch_set, open_sequences, sequences_from_trace
from simulator.traces.stats import (
    batch_dedup, cross_layer, lru_curve, reuse_distance, routing_counts, skew, split_sets, stack_distance_histogram,
    temporal_reuse,
)

REPO = Path(__file__).resolve().parent.parent
SHARED_TRACE = REPO.parent / "shared" / "traces" / "deepseek-v2-lite-puffin"


def make_set(sequences: list[list[list[list[int]]]], num_experts: int) -> SequenceSet:
    """Sequences given as nested lists ``[token][layer][k]``."""
    arrays = [np.array(s, dtype=np.int16) for s in sequences]
    lengths = [len(a) for a in arrays]
    return SequenceSet(experts=np.concatenate(arrays), offsets=np.concatenate([[0], np.cumsum(lengths)]),
                       num_experts=num_experts, names=np.array([str(i) for i in range(len(arrays))]),
                       prompt_lengths=np.zeros(len(arrays), np.int64))


def test_skew_of_a_layer_that_uses_two_experts_only():
    # layer 0 always {0, 1}; layer 1 cycles over all four experts evenly
    ss = make_set([[[[0, 1], [0, 1]], [[0, 1], [2, 3]]] * 2], num_experts=4)
    sk = skew(routing_counts(ss))
    l0, l1 = sk["per_layer"]
    assert l0["top1_share"] == 0.5 and l0["entropy_bits"] == 1.0 and l0["entropy_norm"] == 0.5
    assert l1["top1_share"] == 0.25 and l1["entropy_bits"] == 2.0 and l1["entropy_norm"] == 1.0
    assert sk["uniform"]["top1_share"] == 0.25


def test_temporal_reuse_counts_consecutive_tokens_inside_sequences_only():
    # within each sequence consecutive tokens share one of their two experts; across the
    # boundary the tokens are identical, which must not count
    a = [[[0, 1]], [[1, 2]], [[2, 3]]]
    b = [[[2, 3]], [[3, 0]]]
    ss = make_set([a, b], num_experts=4)
    tp = temporal_reuse(routing_counts(ss))
    assert tp["pairs"] == 3
    assert tp["mean"] == pytest.approx(0.5)
    assert tp["uniform"] == 0.5


def test_reuse_distance_histogram():
    # expert 5: used at tokens 0, 1, 4 -> gaps 1, 3; expert 6: tokens 0, 2 -> gap 2; the rest first uses
    seq = [[[5, 6]], [[5, 1]], [[6, 2]], [[3, 4]], [[5, 7]]]
    rd = reuse_distance(make_set([seq, seq[:1]], num_experts=8))
    frac = dict(zip(rd["bins"], rd["fraction"]))
    assert rd["requests"] == 12
    assert frac["1"] == pytest.approx(1 / 12) and frac["2"] == pytest.approx(1 / 12)
    assert frac["3-4"] == pytest.approx(1 / 12)
    assert frac["first"] == pytest.approx(9 / 12)    # the second sequence starts afresh


def test_cross_layer_precision_is_one_for_a_deterministic_layer_map():
    tr = generate(num_layers=3, num_experts=16, top_k=2, batch_size=10, steps=40, seed=3, generator="cross_layer",
                  cross_layer=1.0)
    ss = sequences_from_trace(tr)
    train, test, in_sample = split_sets(ss)
    assert not in_sample and train.num_sequences == 8 and test.num_sequences == 2
    xl = cross_layer(routing_counts(train), test)
    assert xl["precision"] == 1.0
    assert xl["popularity_precision"] < 0.5
    assert xl["uniform"] == 2 / 16


def test_cross_layer_on_independent_layers_is_near_popularity():
    tr = generate(num_layers=3, num_experts=16, top_k=2, batch_size=10, steps=200, seed=4, generator="uniform")
    train, test, _ = split_sets(sequences_from_trace(tr))
    xl = cross_layer(routing_counts(train), test)
    assert abs(xl["precision"] - 2 / 16) < 0.04


def test_batch_dedup_against_the_formulas():
    # identical routing in every sequence: any batch needs only k experts per layer-step
    same = make_set([[[[1, 2], [3, 4]]] * 6] * 5, num_experts=8)
    rows = batch_dedup(same, routing_counts(same), batch_sizes=(1, 4))
    assert [r["unique"] for r in rows] == [2.0, 2.0]
    assert rows[1]["uniform_formula"] == pytest.approx(expected_unique_uniform(8, 2, 4))
    assert rows[1]["independent_formula"] == pytest.approx(2.0)     # skew alone explains it
    # uniform random routing: measured follows the uniform formula
    tr = generate(num_layers=2, num_experts=32, top_k=4, batch_size=16, steps=200, seed=5, generator="uniform")
    uni = sequences_from_trace(tr)
    r8 = batch_dedup(uni, routing_counts(uni), batch_sizes=(8,))[0]
    assert r8["unique"] == pytest.approx(r8["uniform_formula"], rel=0.02)


@pytest.mark.parametrize("batch", [1, 3])
def test_lru_curve_matches_the_simulators_lru_cache(batch):
    tr = generate(num_layers=4, num_experts=16, top_k=2, batch_size=6, steps=30, seed=6, generator="mixed",
                  zipf=0.8, temporal=0.4)
    ss = sequences_from_trace(tr)
    curve = lru_curve(ss, batch_size=batch)
    model = ModelSpec(name="m", num_layers=4, num_experts=16, top_k=2, hidden=8, ffn=8)
    batched = batch_set(ss, np.arange(ss.num_sequences), batch_size=batch, steps=ss.num_tokens // batch, seed=0)
    for row in curve["table"]:
        planner = Planner(model, PolicySpec(name="lru", cache={"kind": "lru", "capacity": row["capacity"]}), batched)
        hits = sum(planner.plan_step(s)[1].hits for s in range(batched.num_steps))
        assert row["hit_rate"] == pytest.approx(hits / curve["requests"], abs=1e-12), row


def test_stack_distances_by_hand():
    # one layer, top-1, B=1: requests a b a c b -> first, first, 1, first, 2
    tr = batch_set(make_set([[[[0]], [[1]], [[0]], [[2]], [[1]]]], num_experts=3), np.arange(1),
                   batch_size=1, steps=5, seed=0)
    hist, first = stack_distance_histogram(tr)
    assert hist.tolist() == [0, 1, 1] and first == 3


def test_stats_cli_writes_json_and_plots(tmp_path):
    from simmoe.cli import main

    tr = generate(num_layers=3, num_experts=16, top_k=2, batch_size=8, steps=20, seed=2, generator="mixed",
                  zipf=0.5, temporal=0.3)
    tr.save(tmp_path / "t.npz")
    res = CliRunner().invoke(main, ["trace", "stats", str(tmp_path / "t.npz"), "-b", "1,4", "--per-layer",
                                    "--json", str(tmp_path / "s.json"), "--plots", str(tmp_path / "plots")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["sequences"] == 8 and doc["tokens"] == 160
    assert [r["batch_size"] for r in doc["batch_dedup"]] == [1, 4]
    assert doc["temporal"]["mean"] > doc["temporal"]["uniform"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "cross_layer.png", "dedup.png", "lru.png", "reuse.png", "skew.png"]
    assert "re-use, consecutive tokens" in res.output


@pytest.mark.skipif(not SHARED_TRACE.exists(), reason="shared DeepSeek-V2-Lite trace not present")
def test_shared_trace_is_less_local_than_folklore():
    ss = open_sequences(SHARED_TRACE, "layer-csv")
    counts = routing_counts(ss)
    assert 0.2 < temporal_reuse(counts)["mean"] < 0.33                 # "about a quarter"
    assert skew(counts)["mean"]["entropy_norm"] > 0.97                 # mild skew
    train, test, _ = split_sets(ss)
    xl = cross_layer(routing_counts(train), test)
    assert xl["precision"] > 2 * xl["popularity_precision"] > 2 * xl["uniform"]
    dd = batch_dedup(ss, counts, batch_sizes=(16,))[0]
    assert abs(dd["unique"] - dd["independent_formula"]) < 0.02 * dd["unique"]
