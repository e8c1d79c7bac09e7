"""Serving workloads: arrivals, length distributions, per-request routing, arrival files."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from serving_helpers import serving_dict, serving_scenario
from simmoe.cli import main
from simulator.errors import InputError
from simulator.scenario import parse_scenario
from simulator.serving.spec import ArrivalSpec, LengthSpec
from simulator.serving.workload import (
    draw_arrivals, draw_lengths, make_requests, read_arrivals_file, routing_source,
)


def rng(seed=0):
    return np.random.Generator(np.random.PCG64(seed))


def test_poisson_rate_and_exponential_gaps():
    t = draw_arrivals(ArrivalSpec(kind="poisson", rate=50.0), 20000, rng())
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert np.all(gaps >= 0)
    assert abs(gaps.mean() - 20.0) < 0.5                 # 1000 / 50 ms
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05    # exponential: cv 1


def test_gamma_cv_and_rate():
    t = draw_arrivals(ArrivalSpec(kind="gamma", rate=10.0, cv=3.0), 40000, rng(1))
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert abs(gaps.mean() - 100.0) < 6
    assert abs(gaps.std() / gaps.mean() - 3.0) < 0.3


def test_bursts_arrive_only_in_on_periods():
    spec = ArrivalSpec(kind="burst", rate=100.0, on_s=0.5, off_s=1.5)
    t = draw_arrivals(spec, 5000, rng(2))
    phase = np.mod(t, 2000.0)
    assert np.all(phase <= 500.0)
    assert np.all(np.diff(t) >= 0)
    on_time = np.floor(t[-1] / 2000.0) * 500 + min(phase[-1], 500.0)
    assert abs(len(t) / on_time * 1e3 - 100.0) < 5       # the rate holds over on-time


@pytest.mark.parametrize("spec,check", [
    (LengthSpec(kind="fixed", value=7), lambda x: np.all(x == 7)),
    (LengthSpec(kind="uniform", min=3, max=9), lambda x: x.min() == 3 and x.max() == 9),
    (LengthSpec(kind="lognormal", mean=200, sigma=0.5, min=1, max=100000), lambda x: abs(x.mean() - 200) < 6),
    (LengthSpec(kind="lognormal", mean=200, sigma=1.5, min=10, max=300), lambda x: x.min() >= 10 and x.max() <= 300),
    (LengthSpec(kind="empirical", values=[5, 50], weights=[3, 1]), lambda x: abs((x == 5).mean() - 0.75) < 0.03),
])
def test_length_distributions(spec, check):
    x = draw_lengths(spec, 5000, rng(3))
    assert x.dtype == np.int64 and check(x)


def test_requests_are_seeded_and_reproducible():
    sc = serving_scenario()
    a = make_requests(sc.workload, sc.seed, 0)
    assert a == make_requests(sc.workload, sc.seed, 0)
    assert a != make_requests(sc.workload, sc.seed, 1)
    assert a != make_requests(sc.workload, sc.seed + 1, 0)
    assert [r.arrival_ms for r in a] == sorted(r.arrival_ms for r in a)


def test_routing_per_request_depends_on_the_request_only():
    sc = serving_scenario()
    reqs = make_requests(sc.workload, sc.seed, 0)
    src = routing_source(sc, 5, 0)
    first = [src.rows(r) for r in reqs]
    again = routing_source(sc, 5, 0)
    for r, rows in zip(reversed(reqs), reversed(first)):        # another order, the same rows
        assert np.array_equal(again.rows(r), rows)
        assert rows.shape == (r.prompt + r.output - 1, 4, sc.model.top_k)
        srt = np.sort(rows, axis=2)
        assert not np.any(srt[:, :, 1:] == srt[:, :, :-1])      # top-k distinct
    assert not np.array_equal(first[0][:4], first[1][:4])


def test_zipf_popularity_is_shared_across_requests():
    """The model-wide ranking comes from the scenario seed: requests agree on the hot experts."""
    sc = serving_scenario(trace={"generator": "zipf", "zipf": 2.0})
    src = routing_source(sc, 9, 0)
    reqs = make_requests(sc.workload, sc.seed, 0)
    tops = [np.bincount(src.rows(r)[:, 0].ravel(), minlength=16).argmax() for r in reqs]
    assert len(set(tops)) <= 2


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_arrivals_file_csv_and_jsonl(tmp_path):
    c = write(tmp_path, "a.csv", "arrival_s,prompt_tokens,output_tokens\n0,5,2\n0.5,7,1\n")
    assert read_arrivals_file(c, 10) == [(0.0, 5, 2), (500.0, 7, 1)]
    j = write(tmp_path, "a.jsonl", '{"arrival_s": 0.25, "prompt_tokens": 3, "output_tokens": 4}\n\n'
                                   '{"arrival_s": 1, "prompt_tokens": 2.0, "output_tokens": 1}\n')
    assert read_arrivals_file(j, 10) == [(250.0, 3, 4), (1000.0, 2, 1)]
    assert read_arrivals_file(j, 1) == [(250.0, 3, 4)]


@pytest.mark.parametrize("name,text,field", [
    ("b.csv", "arrival_s,prompt_tokens\n0,5\n", "header"),
    ("b.csv", "arrival_s,prompt_tokens,output_tokens\n0,x,2\n", "line 2: prompt_tokens"),
    ("b.csv", "arrival_s,prompt_tokens,output_tokens\n0,5,0\n", "line 2: output_tokens"),
    ("b.csv", "arrival_s,prompt_tokens,output_tokens\n-1,5,2\n", "line 2: arrival_s"),
    ("b.csv", "arrival_s,prompt_tokens,output_tokens\nnan,5,2\n", "line 2: arrival_s"),
    ("b.csv", "arrival_s,prompt_tokens,output_tokens\n1,5,2\n0,5,2\n", "line 3: arrival_s"),
    ("b.csv", "arrival_s,prompt_tokens,output_tokens\n0,5.5,2\n", "line 2: prompt_tokens"),
    ("b.csv", "arrival_s,prompt_tokens,output_tokens\n", "workload.arrivals.path"),
    ("b.jsonl", '{"arrival_s": 0, "prompt_tokens": 3}\n', "line 1: output_tokens"),
    ("b.jsonl", '[1, 2]\n', "line 1"),
    ("b.jsonl", '{"arrival_s": 0, "prompt_tokens": 3, "output_tokens": 1, "x": 1}\n', "line 1: x"),
    ("b.jsonl", '{"arrival_s": NaN, "prompt_tokens": 3, "output_tokens": 1}\n', "line 1"),
    ("b.jsonl", '{"arrival_s": 0, "prompt_tokens": true, "output_tokens": 1}\n', "line 1: prompt_tokens"),
])
def test_bad_arrivals_file_one_line(tmp_path, name, text, field):
    p = write(tmp_path, name, text)
    with pytest.raises(InputError) as e:
        read_arrivals_file(p, 100)
    assert e.value.field == field and "\n" not in str(e.value)


@pytest.mark.parametrize("over,field", [
    ({"workload": {"arrivals": {"kind": "poisson"}}}, "workload.arrivals"),
    ({"workload": {"arrivals": {"kind": "poisson", "rate": 1, "cv": 2}}}, "workload.arrivals"),
    ({"workload": {"arrivals": {"kind": "gamma", "rate": -1, "cv": 2}}}, "workload.arrivals.rate"),
    ({"workload": {"prompt": {"kind": "uniform", "min": 9, "max": 3}}}, "workload.prompt"),
    ({"workload": {"prompt": {"kind": "empirical", "values": [1, 2], "weights": [1]}}}, "workload.prompt"),
    ({"workload": {"requests": 0}}, "workload.requests"),
    ({"workload": {"bogus": 1}}, "workload.bogus"),
    ({"workload": {"scheduler": {"token_budget": 32, "chunk": None},
                   "prompt": {"kind": "uniform", "min": 4, "max": 64}}}, "workload.scheduler.chunk"),
    ({"batch_sizes": [64]}, "batch_sizes"),
    ({"workload": {"scheduler": {"gpu_memory": "-3 GiB"}}}, "workload.scheduler.gpu_memory"),
    ({"policies": [{"name": "x", "serving": {"prefill": "nope"}}]}, "policies[0].serving.prefill"),
])
def test_bad_workload_keys_one_line(over, field):
    with pytest.raises(InputError) as e:
        parse_scenario(serving_dict(**over), "s.yaml")
    assert e.value.field == field, str(e.value)


def test_serving_knobs_without_workload_refused():
    d = serving_dict(policies=[{"name": "x", "cache": {"kind": "lru", "capacity": 4}, "serving": {"prefill": "bypass"}}])
    d.pop("workload")
    with pytest.raises(InputError, match="need a workload"):
        parse_scenario(d, "s.yaml")


def test_cli_bad_workload_file_exit_2(tmp_path):
    import yaml

    bad = write(tmp_path, "arr.csv", "arrival_s,prompt_tokens,output_tokens\n0,5,zz\n")
    doc = serving_dict(workload={"arrivals": {"kind": "file", "path": str(bad)}})
    sc = write(tmp_path, "s.yaml", yaml.safe_dump(doc))
    r = CliRunner().invoke(main, ["run", str(sc), "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 2
    assert r.output.strip().count("\n") == 0 and "line 2: output_tokens" in r.output
    assert not (tmp_path / "out").exists()


def test_effective_scenario_of_plain_runs_unchanged():
    from conftest import scenario_dict

    eff = parse_scenario(scenario_dict()).effective()
    assert "workload" not in eff and all("serving" not in p for p in eff["policies"])
    assert json.dumps(parse_scenario(eff).effective()) == json.dumps(eff)


def test_recorded_sequences_route_one_per_request(tmp_path):
    from simulator.traces.real import SequenceWriter

    g = np.random.Generator(np.random.PCG64(0))
    seqs = [np.stack([np.stack([g.choice(16, 2, replace=False) for _ in range(4)]) for _ in range(n)])
            for n in (5, 9, 3)]
    path = tmp_path / "seqs.npz"
    with SequenceWriter(path, num_experts=16) as w:
        for i, s in enumerate(seqs):
            w.add(s.astype(np.int16), f"s{i}", 2)
    sc = serving_scenario(trace={"sequences": {"path": str(path)}})
    src = routing_source(sc, 1, 0)
    reqs = make_requests(sc.workload, sc.seed, 0)
    used = set()
    for r in reqs:
        rows = src.rows(r)
        assert rows.shape[0] == r.kv_tokens
        match = [i for i, s in enumerate(seqs) if np.array_equal(rows[:min(len(s), len(rows))], s[:len(rows)])]
        assert len(match) == 1                       # the rows are one recorded sequence's, from its start
        s = seqs[match[0]]
        if len(rows) > len(s):                        # a longer request reuses them cyclically
            assert np.array_equal(rows[len(s):2 * len(s)][:len(rows) - len(s)], s[:len(rows) - len(s)])
        used.add(match[0])
    assert used == {0, 1, 2}


def test_batched_trace_and_item_copy_are_refused():
    with pytest.raises(InputError, match="trace.generator or trace.sequences"):
        routing_source(serving_scenario(trace={"path": "x.npz"}), 1, 0)
    with pytest.raises(InputError) as e:
        routing_source(serving_scenario(trace={"generator": "item_copy", "locality": 0.5}), 1, 0)
    assert e.value.field == "trace.generator"


@pytest.mark.parametrize("arrivals,prompt", [
    ({"kind": "burst", "rate": 40, "on_s": 0.2, "off_s": 0.3}, {"kind": "empirical", "values": [4, 20], "weights": [1, 2]}),
    ({"kind": "gamma", "rate": 30, "cv": 2.5}, {"kind": "lognormal", "mean": 12, "sigma": 0.7, "min": 2, "max": 40}),
])
def test_every_arrival_kind_serves_every_request(arrivals, prompt):
    from simulator.serving.runner import serve_scenario

    res = serve_scenario(serving_scenario(workload={"arrivals": arrivals, "prompt": prompt}))
    r = res.requests
    assert len(r) == 12 and (r["e2e_ms"] >= r["ttft_ms"]).all()
    assert r["prompt_tokens"].max() <= 40
