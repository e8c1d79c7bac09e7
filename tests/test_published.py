"""The seed studies regenerated from the simulator (calibrate/validation/published.py, docs/validation.md).

Seed 000 (the RTX 3090 study): its measured rows (computation and memory-transfer columns) and
its dedup table, each within 2%. Seed 004 (dedup savings by batch size under the item-copy
locality model): within 3 points per batch size, the seed's own sampling error (5 seeds whose 16
configurations share draws; see docs/validation.md).
"""
import math

import numpy as np
import pytest

from calibrate.validation.published import (
    SEED000_DEDUP, SEED004, computation_by_batch, dedup_table, seed004_table, study_rows,
)
from calibrate.validation.reference import PUBLISHED_ROWS, STUDY_EXPERT_BYTES, STUDY_TOKENS_PER_ITEM, study_compute_fit
from simulator.profile import load_profile
from simulator.runner import run_scenario
from simulator.scenario import parse_scenario
from simulator.traces.item_copy import generate_item_copy, item_copy_block
from simulator.traces.synthetic import expected_unique_uniform, generate


@pytest.fixture(scope="module")
def rows():
    return study_rows()


def test_profile_says_which_published_figure_each_term_follows():
    p = load_profile("rtx3090-published")
    pageable = p.copy_.h2d.pageable
    # one copy-table point per published row: batch x experts experts in one pageable copy
    assert pageable.table == sorted((b * n * STUDY_EXPERT_BYTES, t) for b, n, _, t in PUBLISHED_ROWS)
    assert pageable.table[0] == (STUDY_EXPERT_BYTES, 3.47)            # an expert-sized copy: batch 1 x 1 expert
    fixed, per_item = study_compute_fit()
    assert p.compute.gpu["768x3072-fp32-gated"] == [(STUDY_TOKENS_PER_ITEM, round(per_item, 4))]
    assert p.measurements["study_layer_fixed_ms"] == round(fixed, 4)
    notes = p.provenance["notes"]
    for phrase in ("transfer column", "batch 1 x 1 expert", "computation column", "512 tokens", "study_layer_fixed_ms"):
        assert phrase in notes


def test_seed000_transfer_column_within_2pct(rows):
    # the copy table holds the published rows, so this checks that the simulator moves each
    # row's bytes the way the study did (one pageable copy of batch x experts experts)
    assert [(r["batch"], r["experts"]) for r in rows] == [(b, n) for b, n, _, _ in PUBLISHED_ROWS]
    for r in rows:
        assert abs(r["transfer_error_pct"]) <= 2.0, r


def test_seed000_computation_column_within_2pct(rows):
    # the study ran the same computation for 1 and 10 experts (one FFN per item): per batch
    # size, the simulated value is within 2% of the two rows' mean ...
    for r in computation_by_batch(rows):
        assert abs(r["error_pct"]) <= 2.0, r
    # ... and it does not depend on the expert count, as the published column does not
    for b in (1, 2, 4):
        assert len({r["simulated_computation_ms"] for r in rows if r["batch"] == b}) == 1
    # the two batch-1 rows are 8.5% apart (4.72 vs 4.35 ms, the same measurement): no model
    # of the column meets 2% on both; every row stays within 5%
    for r in rows:
        assert abs(r["computation_error_pct"]) <= 5.0, r
    # computation grows with the batch, far below the 10-expert rows' transfers
    comp = [r["simulated_computation_ms"] for r in rows]
    assert comp[0] < comp[2] < comp[4]
    assert all(r["simulated_transfer_ms"] > 3 * r["simulated_computation_ms"] for r in rows if r["experts"] == 10)


def test_seed000_dedup_table_within_2pct():
    table = dedup_table(steps=100)
    assert [r["batch"] for r in table] == sorted(SEED000_DEDUP)
    for r in table:
        for side in ("without", "with"):
            assert abs(r[side]["ms_error_pct"]) <= 2.0, (r["batch"], side, r[side])
            assert abs(r[side]["MB_error_pct"]) <= 2.0, (r["batch"], side, r[side])
        assert r["with"]["simulated_ms"] < r["without"]["simulated_ms"]


def test_seed004_savings_table_within_the_seeds_sampling_error():
    table = seed004_table(steps=20)
    assert [r["batch"] for r in table] == sorted(SEED004)
    assert table[0]["simulated_avg_savings"] == 0.0 and table[0]["simulated_max_reuse"] == 0.0
    for r in table:
        assert abs(r["simulated_avg_savings"] - r["published_avg_savings"]) <= 0.03, r
        assert 0.0 <= r["simulated_max_reuse"] < 1.0
    sims = [r["simulated_avg_savings"] for r in table]
    assert sims == sorted(sims)                                     # savings grow with the batch


def _b2_expected_savings(E: int, k: int, locality: float) -> float:
    """Closed form at batch 2: item 1 re-uses r = floor(k * locality * u) of item 0's experts and
    draws k - r of the E - r others, of which k - r are item 0's: expected (k-r)^2 / (E-r) repeats."""
    x = k * locality
    probs = {j: 1 / x for j in range(math.ceil(x))}
    if x != math.floor(x):
        probs[math.floor(x)] = (x - math.floor(x)) / x
    return sum(p * (j + (k - j) ** 2 / (E - j)) / (2 * k) for j, p in probs.items())


@pytest.mark.parametrize("k, locality", [(8, 0.5), (4, 0.7), (16, 0.1)])
def test_item_copy_batch2_matches_the_closed_form(k, locality):
    rng = np.random.Generator(np.random.PCG64(11))
    block = item_copy_block(rng, 8_000, 2, 128, k, locality).reshape(8_000, -1)
    uniq = np.array([len(set(row)) for row in block.tolist()])
    sav = (2 * k - uniq) / (2 * k)
    se = sav.std(ddof=1) / math.sqrt(len(sav))
    assert abs(sav.mean() - _b2_expected_savings(128, k, locality)) <= 4 * se


def test_item_copy_trace_is_valid_seeded_and_uniform_without_locality():
    kw = dict(num_layers=3, num_experts=64, top_k=4, batch_size=8, steps=40, seed=5)
    tr = generate(generator="item_copy", locality=0.6, prefill_tokens=3, **kw)
    e = tr.experts
    assert e.shape == (8 * 3 + 8 * 40, 3, 4) and e.min() >= 0 and e.max() < 64
    assert all(len(set(row)) == 4 for row in e.reshape(-1, 4).tolist())   # distinct per token and layer
    assert list(tr.phase[:2]) == [1, 0] and tr.num_steps == 41
    again = generate_item_copy(locality=0.6, prefill_tokens=3, **kw)
    assert np.array_equal(again.experts, e)
    other = generate_item_copy(locality=0.6, prefill_tokens=3, **{**kw, "seed": 6})
    assert not np.array_equal(other.experts, e)
    # locality 0: every item a uniform k-subset, E[unique] = E (1 - (1 - k/E)^B)
    tr0 = generate_item_copy(locality=0.0, **{**kw, "steps": 400})
    uniq = [len(set(tr0.step(s)[:, l].ravel())) for s in range(400) for l in range(3)]
    assert abs(np.mean(uniq) - expected_unique_uniform(64, 4, 8)) < 0.15
    # more locality, more repeats
    hi = generate_item_copy(locality=0.9, **{**kw, "steps": 400})
    assert np.mean([len(set(hi.step(s)[:, l].ravel())) for s in range(400) for l in range(3)]) < np.mean(uniq) - 2


def test_scenario_knob_is_checked():
    base = {"name": "x", "model": {"preset": "published-study", "num_layers": 1}, "batch_sizes": [2],
            "policies": [{"name": "d", "load": "dedup"}]}
    parse_scenario({**base, "trace": {"generator": "item_copy", "locality": 0.3}}, "t")
    with pytest.raises(Exception, match="locality"):
        parse_scenario({**base, "trace": {"generator": "zipf", "locality": 0.3}}, "t")
    with pytest.raises(Exception, match="locality"):
        parse_scenario({**base, "trace": {"generator": "item_copy", "locality": 1.5}}, "t")


def test_dedup_savings_reported_for_decode_and_prefill_apart():
    def run(prefill):
        sc = parse_scenario({
            "name": "phases", "model": {"preset": "published-study", "num_layers": 2, "top_k": 2},
            "batch_sizes": [4], "trace": {"generator": "uniform", "steps": 8, "prefill_tokens": prefill},
            "policies": [{"name": "d", "load": "dedup"}]}, "t")
        res = run_scenario(sc)
        return res.summary[0], res.steps

    row, steps = run(32)
    dec, pre = steps[steps["phase"] == 0], steps[steps["phase"] == 1]
    assert row["dedup_savings_decode"] == pytest.approx(1 - dec["unique_requests"].sum() / dec["requests"].sum())
    assert row["dedup_savings_prefill"] == pytest.approx(1 - pre["unique_requests"].sum() / pre["requests"].sum())
    # the prefill step (128 tokens over 128 experts) dominates the ratio of sums over all steps
    assert row["dedup_savings_prefill"] > 5 * row["dedup_savings_decode"]
    assert abs(row["dedup_savings"] - row["dedup_savings_prefill"]) < abs(row["dedup_savings"] - row["dedup_savings_decode"])
    row, _ = run(0)
    assert row["dedup_savings_prefill"] is None and row["dedup_savings_decode"] == row["dedup_savings"]


def test_trace_gen_cli_takes_locality(tmp_path):
    from click.testing import CliRunner

    from simmoe.cli import main
    from simulator.traces.trace import load_trace

    out = tmp_path / "ic.npz"
    r = CliRunner().invoke(main, ["trace", "gen", "-g", "item_copy", "--locality", "0.7", "-b", "8", "-s", "3",
                                  "--seed", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    tr = load_trace(out)
    assert tr.meta["generator"] == "item_copy" and tr.meta["params"] == {"locality": 0.7}
    r = CliRunner().invoke(main, ["trace", "gen", "-g", "zipf", "--locality", "0.7", "-o", str(tmp_path / "z.npz")])
    assert r.exit_code == 2 and "locality" in r.output


def test_item_copy_block_valid_across_chunks(monkeypatch):
    import simulator.traces.item_copy as ic

    monkeypatch.setattr(ic, "_CHUNK_ELEMENTS", 3 * 32)        # 3 layer-steps per chunk
    block = ic.item_copy_block(np.random.Generator(np.random.PCG64(3)), 10, 5, 32, 6, 0.7)
    assert block.shape == (10, 5, 6) and block.min() >= 0 and block.max() < 32
    assert all(len(set(item)) == 6 for item in block.reshape(-1, 6).tolist())
    uniq = [len(set(row)) for row in block.reshape(10, -1).tolist()]
    assert min(uniq) >= 6 and max(uniq) <= 30 and len(set(uniq)) > 1
