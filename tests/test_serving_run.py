"""Serving runs end to end: reproducible bit for bit, the CLI's files, the rate search."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from serving_helpers import serving_dict, serving_scenario
from simmoe.cli import main
from simulator.errors import InputError
from simulator.serving.runner import serve_scenario
from simulator.serving.sweep import search_rate


def test_reproducible_bit_for_bit():
    sc = serving_scenario(replications=2, policies=[
        {"name": "lru", "cache": {"kind": "lru", "capacity": 24}},
        {"name": "warm", "cache": {"kind": "lru", "capacity": 24}, "serving": {"prefill": "warm", "upload_budget": 6}}])
    a, b = serve_scenario(sc), serve_scenario(sc)
    pd.testing.assert_frame_equal(a.requests, b.requests, check_exact=True)
    pd.testing.assert_frame_equal(a.steps, b.steps, check_exact=True)
    assert json.dumps(a.summary) == json.dumps(b.summary)
    c = serve_scenario(serving_scenario(seed=4, replications=2, policies=sc.model_dump(mode="json")["policies"]))
    assert not a.requests["e2e_ms"].equals(c.requests["e2e_ms"])


def test_summary_has_the_latency_statistics_with_cis():
    res = serve_scenario(serving_scenario(replications=3))
    row = res.summary[0]
    for c in ("ttft_ms", "tpot_ms", "e2e_ms", "queue_ms"):
        blk = row[c]
        assert blk["p50"] <= blk["p90"] <= blk["p99"]
        lo, hi = blk["mean_ci95"]
        assert lo <= blk["mean"] <= hi and hi > lo
    assert row["requests"] == 36 and row["replications"] == 3
    assert 0 <= row["slo_attainment"] <= 1 and row["goodput_rps"] <= row["requests_per_s"]
    assert row["tokens_per_s"] > 0 and row["tokens_per_s_ci95"][0] <= row["tokens_per_s"]


def test_cli_run_writes_serving_results(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(serving_dict()))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["run", str(p), "-o", str(out)], env={"COLUMNS": "100"})
    assert r.exit_code == 0, r.output
    assert "TTFT" in r.output and "SLO" in r.output
    names = {x.name for x in out.iterdir()}
    assert {"summary.json", "summary.csv", "requests.parquet", "steps.parquet", "scenario.yaml", "profile.json",
            "latency_cdf.png"} <= names
    req = pd.read_parquet(out / "requests.parquet")
    assert len(req) == 12 and {"ttft_ms", "tpot_ms", "e2e_ms", "queue_ms", "meets_slo"} <= set(req.columns)
    doc = json.loads((out / "summary.json").read_text())
    assert doc["format"] == "simmoe-serving-summary" and doc["results"][0]["policy"] == "lru"
    again = yaml.safe_load((out / "scenario.yaml").read_text())
    assert again["workload"]["requests"] == 12


def test_cli_serving_timeline_has_request_tracks_on_the_serving_clock(tmp_path):
    """--timeline of a serving run: the engine's tracks moved onto the serving clock (each
    step's events inside its step span, which starts at the run's own start_ms) and a track per
    request whose queued/prefill/decode spans are the request table's times."""
    d = serving_dict(workload={"arrivals": {"kind": "poisson", "rate": 2.0}},
                     policies=[{"name": "lru", "cache": {"kind": "lru", "capacity": 24}},
                               {"name": "bypass", "cache": {"kind": "lru", "capacity": 24},
                                "serving": {"prefill": "bypass"}}])
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(d))
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["run", str(p), "--timeline", "-o", str(out)])
    assert r.exit_code == 0, r.output
    ev = json.loads((out / "timeline.json").read_text())["traceEvents"]
    steps = pd.read_parquet(out / "steps.parquet")
    req = pd.read_parquet(out / "requests.parquet")
    for pid, pol in ((1, "lru"), (2, "bypass")):
        st = [e for e in ev if e["pid"] == pid and e.get("cat") == "step"]
        mine = steps[steps["policy"] == pol]
        assert [e["ts"] for e in st] == pytest.approx(list(mine["start_ms"] * 1e3))
        assert any(b["ts"] > a["ts"] + a["dur"] + 1 for a, b in zip(st, st[1:]))    # idle gaps are kept
        ops = [e for e in ev if e["pid"] == pid and e["ph"] == "X" and e.get("cat") in ("expert", "copy", "dense")]
        starts = [e["ts"] for e in st]
        for e in ops:                       # every operation inside the span of its step
            i = max(j for j, t in enumerate(starts) if t <= e["ts"] + 1e-6)
            assert e["ts"] + e["dur"] <= st[i]["ts"] + st[i]["dur"] + 1e-3
        rq = req[req["policy"] == pol].set_index("request")
        spans = [e for e in ev if e["pid"] == pid and e.get("cat") in ("queued", "prefill", "decode")]
        assert {e["tid"] - 100 for e in spans} == set(rq.index)
        for e in spans:
            row = rq.loc[e["tid"] - 100]
            a, b = {"queued": ("arrival_ms", "admit_ms"), "prefill": ("admit_ms", "first_token_ms"),
                    "decode": ("first_token_ms", "finish_ms")}[e["cat"]]
            assert e["ts"] == pytest.approx(row[a] * 1e3) and e["dur"] == pytest.approx((row[b] - row[a]) * 1e3)
        names = {e["args"]["name"] for e in ev if e["pid"] == pid and e.get("name") == "thread_name"}
        assert {"steps", "compute stream", "copy engine"} <= names and f"request {rq.index[0]}" in names


RATES = {"requests": 24, "prompt": {"kind": "fixed", "value": 16}, "output": {"kind": "fixed", "value": 6},
         "slo": {"ttft_ms": 150, "tpot_ms": 40, "attainment": 0.9}}


def test_rate_search_grid_then_bisection():
    sc = serving_scenario(workload=RATES)
    res = search_rate(sc, [1, 4, 16, 64, 256], bisect=3)
    best = res["best"][0]
    grid = sorted((r for r in res["rows"] if not r.get("bisection")), key=lambda r: r["rate"])
    att = [r["slo_attainment"] for r in grid]
    assert best["monotone"] == all(a >= b for a, b in zip(att, att[1:]))
    assert grid[0]["passes"] and not grid[-1]["passes"]          # the grid brackets the answer
    lo, hi = best["max_rate"], best["first_failing_rate"]
    g_hi = next(r["rate"] for r in grid if not r["passes"])
    g_lo = max(r["rate"] for r in grid if r["passes"] and r["rate"] < g_hi)
    assert g_lo <= lo < hi <= g_hi and hi - lo == pytest.approx((g_hi - g_lo) / 8)   # 3 halvings
    by_rate = {r["rate"]: r for r in res["rows"]}
    assert by_rate[lo]["passes"] and not by_rate[hi]["passes"]
    assert sum(1 for r in res["rows"] if r.get("bisection")) == 3
    # the same search again gives the same answer (seeded)
    assert search_rate(sc, [1, 4, 16, 64, 256], bisect=3)["best"] == res["best"]


def test_slo_attainment_falls_with_the_rate():
    sc = serving_scenario(workload=RATES)
    rows = search_rate(sc, [1, 8, 64, 512], bisect=0)["rows"]
    att = [r["slo_attainment"] for r in sorted(rows, key=lambda r: r["rate"])]
    assert att == sorted(att, reverse=True) and att[0] > att[-1]


def test_rate_search_refuses_a_file_workload(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text("arrival_s,prompt_tokens,output_tokens\n0,4,2\n")
    sc = serving_scenario(workload={"arrivals": {"kind": "file", "path": str(f)}})
    with pytest.raises(InputError, match="generated arrivals"):
        search_rate(sc, [1, 2])


def test_cli_serve_sweep(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(serving_dict(workload={**RATES, "rates": [1, 16, 256]})))
    out = tmp_path / "rates"
    r = CliRunner().invoke(main, ["serve-sweep", str(p), "--bisect", "1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "highest rate meeting the SLO" in r.output
    doc = json.loads((out / "rates.json").read_text())
    assert len(doc["rows"]) == 4 and doc["best"][0]["policy"] == "lru"
    assert (out / "throughput_latency.png").stat().st_size > 0 and (out / "attainment.png").exists()
    bad = CliRunner().invoke(main, ["serve-sweep", str(p), "--rates", "1,x"])
    assert bad.exit_code == 2 and "--rates" in bad.output


def test_python_api_serve_and_run_refusal():
    import simmoe

    res = simmoe.serve(serving_dict(), replications=1)
    assert len(res.requests) == 12 and res.summary[0]["policy"] == "lru"
    with pytest.raises(InputError, match="serving scenario"):
        simmoe.run(serving_dict())
    from conftest import scenario_dict

    with pytest.raises(InputError, match="not a serving scenario"):
        simmoe.serve(scenario_dict())
