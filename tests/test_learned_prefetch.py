"""Learned prefetch predictors: planted rules are learned exactly, the oracle's knowledge is
never read, training splits, options, and runs through the simulator."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simulator.errors import InputError
from simulator.models import ModelSpec
from simulator.policies import PREFETCH_POLICIES, PlanContext, PrefetchRequest
from simulator.policies.learned import prefetch_quality
from simulator.runner import run_scenario
from simulator.scenario import parse_scenario
from simulator.traces import generate
from simulator.traces.real import batch_set, sequences_from_trace, split_indices

MODEL = ModelSpec(name="tiny", num_layers=4, num_experts=16, top_k=2, hidden=8, ffn=8)


def corpus(path: Path, **knobs) -> Path:
    """20 recorded sequences of 60 tokens, saved as a sequences file."""
    tr = generate(num_layers=4, num_experts=16, top_k=2, batch_size=20, steps=60, seed=5, **knobs)
    sequences_from_trace(tr).save(path)
    return path


def held_out(path: Path, batch: int, steps: int = 40):
    from simulator.traces.real import load_sequences

    ss = load_sequences(path)
    return batch_set(ss, split_indices(ss.num_sequences, "test"), batch_size=batch, steps=steps, seed=1,
                     meta={"source": str(path), "format": "simmoe"})


@pytest.mark.parametrize("batch", [1, 4])
def test_affinity_learns_a_planted_layer_to_layer_rule(tmp_path, batch):
    path = corpus(tmp_path / "rule.npz", generator="cross_layer", cross_layer=1.0)   # layer l+1 = pi(layer l)
    q = prefetch_quality(PREFETCH_POLICIES["affinity"](), held_out(path, batch), MODEL)
    assert q["next_layer"]["recall"] == 1.0
    assert q["next_layer"]["precision"] > 0.6          # chance: k/E = 0.125
    untrained = prefetch_quality(PREFETCH_POLICIES["popularity"](), held_out(path, batch), MODEL)
    assert untrained["next_layer"]["recall"] < 0.9


def test_history_learns_sequences_that_repeat_their_experts(tmp_path):
    path = corpus(tmp_path / "sticky.npz", generator="temporal", temporal=1.0)       # every token repeats
    q = prefetch_quality(PREFETCH_POLICIES["history"](), held_out(path, 2), MODEL)
    # after each sequence's first token, every prediction is right
    assert q["next_step"]["recall"] == 1.0 and q["next_step"]["precision"] == 1.0
    assert q["all"]["recall"] > 0.95


def test_predictors_train_on_the_train_split_only(tmp_path):
    path = corpus(tmp_path / "c.npz", generator="mixed", zipf=0.5, cross_layer=0.6)
    pol = PREFETCH_POLICIES["affinity"](train={"path": str(path), "split": "train", "max_sequences": 3})
    tr = held_out(path, 2)
    pol.prepare(PlanContext(trace=tr, model=MODEL, batch_size=2, seed=0, request_keys=np.zeros(0, np.int64)))
    from simulator.policies.learned import training_counts, training_source

    counts = training_counts(training_source({"path": str(path), "max_sequences": 3}, tr))
    assert counts.tokens == 3 * 60                                     # sequences 0, 1, 2 of the train split
    assert training_counts(training_source(None, tr)).tokens == 16 * 60   # default: the trace's own train split


class Poisoned(list):
    """Stands in for ``PrefetchRequest.future``: reading it fails the test."""

    def _fail(self, *a, **k):
        raise AssertionError("a learned policy read the oracle's future")

    __iter__ = __len__ = __getitem__ = __contains__ = _fail


@pytest.mark.parametrize("name", ["history", "affinity"])
def test_learned_policies_never_read_the_future_and_are_deterministic(tmp_path, name):
    path = corpus(tmp_path / "c.npz", generator="mixed", zipf=0.5, temporal=0.3, cross_layer=0.5)
    tr = held_out(path, 3, steps=10)
    runs = []
    for _ in range(2):
        pol = PREFETCH_POLICIES[name]()
        pol.prepare(PlanContext(trace=tr, model=MODEL, batch_size=3, seed=0, request_keys=np.zeros(0, np.int64)))
        out = []
        for s in range(tr.num_steps):
            for l in range(MODEL.num_layers):
                ts, tl = (s, l + 1) if l + 1 < MODEL.num_layers else (s + 1, 0)
                cur = tr.step(s)[:, l, :]
                if ts < tr.num_steps:
                    out.append(list(pol.predict(PrefetchRequest(step=s, layer=l, target_step=ts, target_layer=tl,
                                                                current=cur, future=Poisoned()))))
                pol.observe(s, l, cur)
        runs.append(out)
    assert runs[0] == runs[1]
    assert all(len(p) >= 1 for p in runs[0])


def _scenario(path: Path, policies: list[dict]) -> dict:
    return {"name": "learned", "model": {"preset": "published-study", "num_layers": 4, "num_experts": 16, "top_k": 2},
            "seed": 0, "replications": 1, "batch_sizes": [1, 4],
            "trace": {"sequences": {"path": str(path), "split": "test"}, "steps": 12},
            "engine": {"dense_ms_per_layer": 0.05}, "policies": policies}


def test_learned_policies_run_through_the_simulator_between_the_bounds(tmp_path):
    path = corpus(tmp_path / "rule.npz", generator="cross_layer", cross_layer=1.0)
    cache = {"kind": "lru", "capacity": 24}
    pols = [{"name": n, "cache": cache, "prefetch": {"kind": k}}
            for n, k in (("none", "none"), ("affinity", "affinity"), ("history", "history"), ("oracle", "oracle"))]
    res = run_scenario(parse_scenario(_scenario(path, pols)))
    by = {(r["policy"], r["batch_size"]): r for r in res.summary}
    for b in (1, 4):
        assert by[("affinity", b)]["prefetches_used"] > 0
        assert by[("none", b)]["hit_rate"] < by[("affinity", b)]["hit_rate"] <= by[("oracle", b)]["hit_rate"]
        assert by[("history", b)]["prefetches_issued"] > 0


def test_bad_options_are_input_errors(tmp_path):
    path = corpus(tmp_path / "c.npz", generator="uniform")
    bad = [{"name": "x", "cache": {"kind": "lru", "capacity": 24}, "prefetch": {"kind": "affinity", "options": {"topn": 3}}}]
    with pytest.raises(InputError, match=r"policies\[0\]\.prefetch\.options: prefetch 'affinity': unknown option 'topn'"):
        parse_scenario(_scenario(path, bad))        # refused at load, before anything runs
    synthetic = _scenario(path, [{"name": "h", "cache": {"kind": "lru", "capacity": 24}, "prefetch": {"kind": "history"}}])
    synthetic["trace"] = {"generator": "uniform", "steps": 4}
    with pytest.raises(InputError, match="needs options.train"):
        run_scenario(parse_scenario(synthetic))
    missing = [{"name": "m", "cache": {"kind": "lru", "capacity": 24},
                "prefetch": {"kind": "history", "options": {"train": str(tmp_path / "nope.npz")}}}]
    with pytest.raises(InputError, match="nope.npz: source: file or folder not found"):
        run_scenario(parse_scenario(_scenario(path, missing)))
