"""simmoe validate of a serving scenario on the CPU with a tiny real model: the live run's
decisions are the replay's, the report's fields are computed from the runs (replayed on the
live schedule and projected end to end), and a schedule that does not depend on time gives
the replay and the end-to-end projection the same latencies."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from calibrate.validation.serving import (LATENCY_COLS, latency_stats, replay_requests,  # noqa: E402
                                          validate_serving)
from simmoe.cli import main  # noqa: E402
from simulator.models import get_preset  # noqa: E402
from simulator.profile import load_profile  # noqa: E402
from simulator.scenario import parse_scenario  # noqa: E402

PROFILES = Path(__file__).resolve().parents[1] / "simulator" / "profiles"
POLICIES = [
    {"name": "lru", "cache": {"kind": "lru", "capacity": 512}},
    {"name": "bypass", "cache": {"kind": "lru", "capacity": 512}, "serving": {"prefill": "bypass"}},
    {"name": "defer", "cache": {"kind": "lru", "capacity": 512},
     "serving": {"prefill": "bypass", "upload_budget": 128, "budget_over": "defer"}},
]


def scenario_dict(arrivals=None, n=4, policies=POLICIES) -> dict:
    return {"name": "sv", "model": "olmoe-1b-7b", "profile": "h200", "seed": 1, "replications": 1,
            "batch_sizes": [3], "trace": {"generator": "temporal", "zipf": 1.0, "temporal": 0.7},
            "engine": {"style": "offload"},
            "workload": {"requests": n, "arrivals": arrivals or {"kind": "poisson", "rate": 5.0},
                         "prompt": {"kind": "uniform", "min": 6, "max": 20}, "output": {"kind": "uniform", "min": 2, "max": 5},
                         "scheduler": {"token_budget": 24, "chunk": 12}},
            "policies": policies}


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    """The h200 profile pricing the tiny model like OLMoE (decisions do not depend on prices;
    the report's arithmetic is what these tests check)."""
    from calibrate.models.build import tiny_spec

    t = tiny_spec(get_preset("olmoe-1b-7b"))
    d = json.loads((PROFILES / "h200.json").read_text())
    d["engine"][t.name] = d["engine"]["olmoe-1b-7b"]
    for k in ("gpu", "cpu"):
        d["compute"][k][t.shape_key] = d["compute"][k]["2048x1024-bf16-gated"]
    p = tmp_path_factory.mktemp("prof") / "tiny.json"
    p.write_text(json.dumps(d))
    return load_profile(str(p))


def test_report_rows_are_computed_from_the_runs(tiny_profile, capsys):
    rep = validate_serving(parse_scenario(scenario_dict()), rates=[2.0, 40.0], profile=tiny_profile, device="cpu",
                           tiny=True, timing=True)
    from simmoe.serve_cli import print_serving_validation
    print_serving_validation(rep)   # the terminal report: both tables, 80 columns
    out = capsys.readouterr().out
    assert "error, projected end to end" in out and max(len(ln) for ln in out.splitlines()[1:]) <= 80
    assert sum(ln.split()[:1] == [POLICIES[0]["name"]] for ln in out.splitlines()) == 4   # 2 rates x 2 tables
    assert rep["decisions_identical"] and rep["rates"] == [2.0, 40.0]
    assert [(r["rate"], r["policy"]) for r in rep["rows"]] == [(r, p["name"]) for r in (2.0, 40.0) for p in POLICIES]
    for r in rep["rows"]:
        assert r["requests"] == 4 and r["steps"] == len(r["live_steps_ms"]) == len(r["replay_steps_ms"])
        live = np.array(r["live_steps_ms"])
        rep_ms = np.array(r["replay_steps_ms"])
        a = r["step_ms"]["all"]
        assert a["live_median_ms"] == pytest.approx(np.median(live), rel=1e-4)
        assert a["replay_median_ms"] == pytest.approx(np.median(rep_ms), rel=1e-4)
        assert a["error_pct"] == pytest.approx((a["replay_median_ms"] / a["live_median_ms"] - 1) * 100)
        assert r["step_ms"]["prefill"]["steps"] == r["prefill_steps"] > 0
        assert r["step_ms"]["prefill"]["steps"] + r["step_ms"]["decode"]["steps"] == r["steps"]
        for col in LATENCY_COLS:
            cdf = np.array(r["cdf"]["live"][col])
            m = r["latency"][col]["mean"]
            if col != "tpot_ms":
                assert m["live"] == pytest.approx(cdf.mean())
            assert m["live"] > 0 and m["projected"] > 0 and m["replayed"] > 0
            assert m["error_pct"] == pytest.approx((m["projected"] / m["live"] - 1) * 100)
            assert m["replayed_error_pct"] == pytest.approx((m["replayed"] / m["live"] - 1) * 100)
            assert r["latency"][col]["p90"]["live"] >= min(cdf)
        # the replay with the host terms now: the row's probes over the profile's, and its errors
        assert r["probe_dispatch_us"] > 0 and r["host_factor"] > 0
        for col in LATENCY_COLS:
            n = r["latency_now"][col]["mean"]
            assert n["error_pct"] == pytest.approx((n["replayed_now"] / r["latency"][col]["mean"]["live"] - 1) * 100)
            rep_m = r["latency"][col]["mean"]["replayed"]
            if col != "tpot_ms":   # every step no longer (shorter): no token later (a TPOT may grow)
                assert (n["replayed_now"] <= rep_m * (1 + 1e-9)) if r["host_factor"] < 1 \
                    else (n["replayed_now"] >= rep_m * (1 - 1e-9))
    assert "e2e_ms_mean_replayed_now" in rep["errors"] and "host factor now" in out
    by = {(r["rate"], r["policy"]): r for r in rep["rows"]}
    assert by[2.0, "defer"]["deferred_prompt_tokens"] > 0 and by[2.0, "lru"]["deferred_prompt_tokens"] == 0
    assert by[2.0, "defer"]["steps"] > by[2.0, "bypass"]["steps"]       # prompts spread over more steps
    # the rates differ: the later arrivals wait less at the lower rate's schedule ... or not, but they differ
    assert by[2.0, "lru"]["cdf"]["live"]["e2e_ms"] != by[40.0, "lru"]["cdf"]["live"]["e2e_ms"]
    assert set(rep["errors"]) >= {"ttft_ms_mean_projected", "tpot_ms_p90_replayed", "step_median_replayed"}


def test_a_time_independent_schedule_replays_as_it_projects(tiny_profile, tmp_path):
    """Every request arriving at once and a max batch that admits them all: the schedule does
    not depend on step times, so the end-to-end projection runs the live schedule, and the
    replayed latencies equal the projected ones."""
    arr = tmp_path / "a.csv"
    arr.write_text("arrival_s,prompt_tokens,output_tokens\n" + "".join(f"0,{6 + 4 * i},{2 + i}\n" for i in range(3)))
    d = scenario_dict({"kind": "file", "path": str(arr)}, n=3, policies=POLICIES[:2])
    rep = validate_serving(parse_scenario(d), profile=tiny_profile, device="cpu", tiny=True, timing=True)
    assert rep["rates"] == [None]
    for r in rep["rows"]:
        assert r["schedule_identical"] and r["projected_steps"] == r["steps"]
        for col in LATENCY_COLS:
            for q in ("mean", "p90"):
                v = r["latency"][col][q]
                assert v["replayed"] == pytest.approx(v["projected"], rel=1e-9)


def test_replaying_live_step_times_gives_the_live_latencies():
    """replay_requests on the live schedule with the live step times rebuilds the live run's
    per-request table exactly (the same clock arithmetic)."""
    from calibrate.executors.model import host_experts
    from calibrate.executors.serving import serve_live
    from calibrate.models.build import build_model
    from simulator.serving.workload import make_requests

    built = build_model("olmoe-1b-7b", tiny=True, dtype="fp32")
    host = host_experts(built, pinned=False)
    sc = parse_scenario(scenario_dict({"kind": "poisson", "rate": 30.0}, n=5))
    sc = sc.model_copy(update={"model": built.spec})
    reqs = make_requests(sc.workload, sc.seed, 0, None)
    for pol in sc.policies[::2]:            # lru, and defer (whose steps the driver cuts)
        live, steps, _ = serve_live(sc, pol, 3, 0, built, requests=reqs, host=host)
        again = replay_requests(reqs, [it for it, _, _ in steps], [st.latency_ms for _, st, _ in steps], sc.workload.slo)
        for c in ("first_token_ms", "finish_ms", "ttft_ms", "e2e_ms", "tpot_ms"):
            assert list(again[c]) == list(live[c])
        assert latency_stats(again) == latency_stats(live)


def test_cli_validates_a_serving_scenario_on_the_cpu(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(scenario_dict(n=3, policies=POLICIES[:1])))
    out = tmp_path / "v"
    r = CliRunner().invoke(main, ["validate", str(p), "--executor", "model", "--tiny", "--device", "cpu",
                                  "--rates", "1,8", "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "validation.json").read_text())
    assert doc["format"] == "simmoe-serving-validation" and doc["decisions_identical"] and not doc["timing"]
    assert [row["rate"] for row in doc["rows"]] == [1.0, 8.0] and (out / "validation.png").stat().st_size > 0
    twin = CliRunner().invoke(main, ["validate", str(p), "--device", "cpu"])
    assert twin.exit_code == 2 and "--executor" in twin.output
    f = tmp_path / "a.csv"
    f.write_text("arrival_s,prompt_tokens,output_tokens\n0,4,2\n")
    p2 = tmp_path / "f.yaml"
    p2.write_text(yaml.safe_dump(scenario_dict({"kind": "file", "path": str(f)}, n=1)))
    bad = CliRunner().invoke(main, ["validate", str(p2), "--executor", "model", "--tiny", "--device", "cpu",
                                    "--rates", "1"])
    assert bad.exit_code == 2 and "--rates" in bad.output and "Traceback" not in bad.output
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({**{k: v for k, v in scenario_dict().items() if k != "workload"},
                                     "policies": POLICIES[:1]}))
    refused = CliRunner().invoke(main, ["validate", str(plain), "--device", "cpu", "--rates", "1"])
    assert refused.exit_code == 2 and "--rates" in refused.output


def test_max_seconds_keeps_the_first_row_and_names_the_rest(tiny_profile):
    """--max-seconds 0 on a serving scenario: the first row still runs (a report with no row
    says nothing), every other (rate, policy) is named in rows_not_run, none twice."""
    rep = validate_serving(parse_scenario(scenario_dict()), rates=[2.0, 40.0], profile=tiny_profile, device="cpu",
                           tiny=True, timing=True, max_seconds=0.0)
    assert [(r["rate"], r["policy"]) for r in rep["rows"]] == [(2.0, POLICIES[0]["name"])]
    want = [f"{p['name']} B=3 rate {r:g}/s" for r in (2.0, 40.0) for p in POLICIES][1:]
    assert rep["rows_not_run"] == want and rep["max_seconds"] == 0.0 and rep["live_s"] > 0


def test_max_seconds_on_the_command_line(tmp_path):
    """The flag reaches a serving validation and its report names the rows not run."""
    path = tmp_path / "sv.yaml"
    path.write_text(yaml.safe_dump(scenario_dict(n=2, policies=POLICIES[:2])))
    r = CliRunner().invoke(main, ["validate", str(path), "--executor", "model", "--tiny", "--device", "cpu",
                                  "--rates", "5", "--max-seconds", "0", "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "1 row(s) not run: bypass B=3 rate 5/s" in r.output
    doc = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert doc["rows_not_run"] == ["bypass B=3 rate 5/s"] and len(doc["rows"]) == 1
