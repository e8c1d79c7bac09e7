"""`simmoe validate --executor model` and the `offload` engine style, on tiny real models (CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from calibrate.measurements.engine import EnginePlan, measure_engine  # noqa: E402
from calibrate.measurements.engine_profile import merge_engine  # noqa: E402
from calibrate.models.build import tiny_spec  # noqa: E402
from calibrate.validation.model_rows import scaled_policy, validate_model  # noqa: E402
from simmoe.cli import main  # noqa: E402
from simulator.engine_costs import require_style  # noqa: E402
from simulator.errors import InputError  # noqa: E402
from simulator.models import PRESETS  # noqa: E402
from simulator.profile import load_profile  # noqa: E402
from simulator.runner import run_scenario  # noqa: E402
from simulator.scenario import PolicySpec, load_scenario, parse_scenario  # noqa: E402

OLMOE = PRESETS["olmoe-1b-7b"]
TINY = tiny_spec(OLMOE)
H200 = Path(__file__).resolve().parents[1] / "simulator" / "profiles" / "h200.json"

SCENARIO = """name: tiny_model_val
model: olmoe-1b-7b
profile: {profile}
batch_sizes: [1, 3]
trace: {{generator: uniform, steps: 2, prompt_tokens: 6}}
engine: {{style: {style}}}
policies:
  - {{name: dedup, load: dedup}}
  - {{name: lru, load: dedup, cache: {{kind: lru, capacity: 256}}}}
"""


def write_scenario(tmp_path: Path, profile="h200", style="offload", name="sc.yaml") -> Path:
    p = tmp_path / name
    p.write_text(SCENARIO.format(profile=profile, style=style))
    return p


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory) -> Path:
    """h200 plus the tiny OLMoE's engine tables measured here (offload style included) and a
    compute table for its expert shape (copied from a real one: only the plumbing is tested)."""
    d = tmp_path_factory.mktemp("prof")
    doc = measure_engine(EnginePlan("olmoe-1b-7b", device="cpu", tiny=True, batches=[1, 4], contexts=[8, 32],
                                    prompts=[8], trials=3, warmup=1, styles=["offload"]))
    (d / "engine.json").write_text(json.dumps(doc))
    prof = json.loads(H200.read_text())
    for side in ("gpu", "cpu"):
        prof["compute"][side][TINY.shape_key] = prof["compute"][side][OLMOE.shape_key]
    (d / "base.json").write_text(json.dumps(prof))
    merge_engine(d / "base.json", [d / "engine.json"], d / "tiny.json")
    return d / "tiny.json"


def test_offload_style_measured_fitted_and_merged(tiny_profile):
    doc = json.loads((tiny_profile.parent / "engine.json").read_text())
    ex = doc["tables"]["experts"]
    assert list(ex) == ["offload"]
    pts = ex["offload"]["points"]
    assert [p["batch"] for p in pts] == [1, 4] and all(p["host_ms"] > 0 and p["active"] >= 1 for p in pts)
    assert pts[0]["active"] < pts[1]["active"]
    assert ex["offload"]["fit"] is not None and ex["offload"]["host_fit"] is not None
    st = load_profile(str(tiny_profile)).engine["olmoe-1b-7b-tiny"].styles["offload"]
    assert st.base_ms + st.per_expert_ms * pts[1]["active"] > 0 and len(st.points) == 2


def test_scenario_with_offload_style_runs(tiny_profile, tmp_path):
    """A scenario priced with engine.style offload: the engine around the experts and the
    dispatch are the measured tables' (ten times the tables, a slower step; the twin ignores
    them). The tables were timed on this CPU, so they are compared with themselves, not with
    the twin's constants."""
    prof = json.loads(tiny_profile.read_text())
    sec = prof["engine"]["olmoe-1b-7b-tiny"]
    sec["decode"]["ms"] = [[v * 10 for v in row] for row in sec["decode"]["ms"]]
    st = sec["styles"]["offload"]
    for k in ("base_ms", "per_expert_ms", "host_base_ms", "host_per_expert_ms", "host_per_load_ms"):
        if st.get(k) is not None:
            st[k] *= 10
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps(prof))
    doc = {"name": "tiny_offload", "model": TINY.model_dump(mode="json"),
           "replications": 1, "batch_sizes": [2], "trace": {"generator": "uniform", "steps": 4, "prompt_tokens": 8},
           "policies": [{"name": "dedup", "load": "dedup"}]}
    ms = {}
    for style, path in (("offload", tiny_profile), ("twin", tiny_profile), ("offload-slow", slow), ("twin-slow", slow)):
        res = run_scenario(parse_scenario({**doc, "profile": str(path), "engine": {"style": style.split("-")[0]}}))
        ms[style] = float(res.steps["latency_ms"].median())
    assert ms["offload-slow"] > ms["offload"]
    assert ms["twin-slow"] == ms["twin"]


def test_require_style_names_the_missing_style():
    prof = load_profile("h200")
    assert "hf-eager" in require_style(prof, "olmoe-1b-7b", "hf-eager").styles
    with pytest.raises(InputError, match=r"engine\.mixtral-8x7b\.styles\.offload.*--style offload"):
        require_style(prof, "mixtral-8x7b", "offload")


def test_scaled_policy_keeps_the_share_of_experts():
    lru = PolicySpec(name="lru", cache={"kind": "lru", "capacity": 256}, prefetch={"kind": "oracle", "budget": 8})
    s = scaled_policy(lru, OLMOE, TINY)  # 1024 experts -> 16: a quarter stays a quarter
    assert s.cache.capacity == 4 and s.prefetch.budget == 1
    layer = PolicySpec(name="layer", load="layer", cache={"kind": "none", "capacity": 64})
    assert scaled_policy(layer, OLMOE, TINY).cache.capacity == TINY.num_experts  # a whole layer still fits
    assert scaled_policy(lru, OLMOE, OLMOE) is lru


def test_cli_tiny_cpu_decisions_only(tmp_path):
    sc = write_scenario(tmp_path)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["validate", str(sc), "--executor", "model", "--tiny", "--device", "cpu",
                                  "--no-resident", "-o", str(out)])
    assert r.exit_code == 0, r.output
    rows = [ln for ln in r.output.splitlines() if ln.split()[:1] in (["dedup"], ["lru"])]
    assert len(rows) == 4 and all(ln.endswith("yes") for ln in rows)
    assert max(len(ln) for ln in r.output.splitlines()) <= 80
    assert "timing is not meaningful" in r.output
    rep = json.loads((out / "validation.json").read_text())
    assert rep["executor"] == "model" and rep["timing"] is False and rep["decisions_identical"]
    assert {(x["policy"], x["batch_size"]) for x in rep["rows"]} == {(p, b) for p in ("dedup", "lru") for b in (1, 3)}
    assert all(x["router_agrees"] for x in rep["rows"])  # recorded routing, replayed: the router agrees
    lru1 = next(x for x in rep["rows"] if x["policy"] == "lru" and x["batch_size"] == 1)
    dedup1 = next(x for x in rep["rows"] if x["policy"] == "dedup" and x["batch_size"] == 1)
    assert lru1["copies_per_step"] < dedup1["copies_per_step"]  # the cache hits some of the routed experts


def test_projection_rows_with_timing_forced(tiny_profile, tmp_path):
    """The projection side, forced on the CPU with a profile that has the tiny model's tables:
    the resident row first, errors and tokens/s per row, forced scenario routing."""
    sc, base = load_scenario(write_scenario(tmp_path, profile=str(tiny_profile)))
    sc = sc.model_copy(update={"batch_sizes": [2], "policies": sc.policies[:1]})
    rep = validate_model(sc, device="cpu", tiny=True, routing="trace", base_dir=base, timing=True)
    assert [r["policy"] for r in rep["rows"]] == ["resident", "dedup"]
    res, dedup = rep["rows"]
    for r in rep["rows"]:
        assert r["decisions_identical"] and r["sim_median_ms"] > 0 and len(r["sim_steps_ms"]) == 2
        assert r["error_pct"] == pytest.approx((r["sim_median_ms"] - r["live_median_ms"]) / r["live_median_ms"] * 100)
        assert r["sim_tokens_per_s"] == pytest.approx(2 / r["sim_median_ms"] * 1e3)
    assert res["copies_per_step"] == 0 and dedup["copies_per_step"] > 0
    # copies never make a step faster (they may hide entirely behind a host-bound CPU step)
    assert dedup["sim_median_ms"] >= res["sim_median_ms"]
    assert rep["median_abs_error_pct"] >= 0 and rep["worst_abs_error_pct"] >= rep["median_abs_error_pct"]


def test_passes_interleave_rows_and_pool_their_timed_steps(tiny_profile, tmp_path):
    """--repeats N on the model executor: N passes over the rows, each row's median over every
    pass's timed steps (warm-up steps of each pass left out, kept apart); the host probe of each."""
    sc, base = load_scenario(write_scenario(tmp_path, profile=str(tiny_profile)))
    sc = sc.model_copy(update={"batch_sizes": [2], "policies": sc.policies[:1]})
    order = []
    rep = validate_model(sc, device="cpu", tiny=True, routing="trace", base_dir=base, timing=True, passes=2,
                         progress=lambda i, n, what: order.append(what))
    warm, steps = rep["warmup_steps"], sc.trace.steps
    assert [w.split()[0] for w in order[:-1]] == ["resident", "dedup", "resident", "dedup"]   # interleaved
    for r in rep["rows"]:
        assert r["passes"] == 2 and len(r["live_steps_ms"]) == 2 * (steps - warm)
        assert len(r["warmup_steps_ms"]) == 2 * warm and len(r["probes"]) == 2 * (steps - warm)
        assert r["probe_dispatch_us"] > 0


@pytest.mark.parametrize("case, needle", [
    ("no-arch", "model: 'olmoe-1b-7b+custom' has no architecture"),
    ("style", "engine.olmoe-1b-7b-tiny"),
    ("twin", "engine.style: twin does not price what the model executor runs"),
    ("device", "--device: 'tpu'"),
    ("tiny-twin", "--tiny: only with --executor model"),
    ("prompt", "--prompt: 1,000,000,000 tokens is past any context"),
])
def test_cli_bad_inputs_exit_2(tmp_path, case, needle):
    sc = write_scenario(tmp_path)
    args = ["--executor", "model", "--tiny", "--device", "cpu"]
    if case == "no-arch":
        sc.write_text(sc.read_text().replace("model: olmoe-1b-7b", "model: {preset: olmoe-1b-7b, num_layers: 4}"))
    elif case == "style":   # h200 has no tables of the tiny model: a GPU run stops before building anything
        args = ["--executor", "model", "--tiny", "--device", "cuda"]
    elif case == "twin":
        sc = write_scenario(tmp_path, style="twin")
        args = ["--executor", "model", "--device", "cuda"]
    elif case == "prompt":
        args += ["--prompt", "8,1000000000"]
    elif case == "device":
        args = ["--executor", "model", "--device", "tpu"]
    else:
        args = ["--tiny"]
    r = CliRunner().invoke(main, ["validate", str(sc), *args])
    assert r.exit_code == 2, r.output
    err = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and needle in err[0], r.output
    assert "Traceback" not in r.output


def test_shipped_scenario_scales_to_the_tiny_model():
    sc, _ = load_scenario(Path(__file__).resolve().parents[1] / "scenarios" / "validate_olmoe_model.yaml")
    assert sc.engine.style == "offload" and sc.batch_sizes == [1, 4, 16, 64]
    scaled = {p.name: scaled_policy(p, sc.model, TINY) for p in sc.policies}
    assert scaled["lru"].cache.capacity == 4 and scaled["layer-baseline"].cache.capacity == TINY.num_experts
    assert scaled["layer-baseline"].memory == "pageable" and scaled["cpu-miss"].miss.kind == "cpu"


def test_merge_keeps_styles_the_new_run_did_not_measure(tiny_profile, tmp_path):
    doc = json.loads((tiny_profile.parent / "engine.json").read_text())
    doc["tables"]["experts"] = {"hf-eager": doc["tables"]["experts"]["offload"]}
    (tmp_path / "eager.json").write_text(json.dumps(doc))
    prof = merge_engine(tiny_profile, [tmp_path / "eager.json"], tmp_path / "both.json")
    assert set(prof["engine"]["olmoe-1b-7b-tiny"]["styles"]) == {"offload", "hf-eager"}


def test_host_copies_that_would_not_fit_are_refused_before_building():
    from calibrate.validation.model_rows import check_host_memory
    from simulator.models import get_preset
    spec = get_preset("qwen3-30b-a3b")          # 48 x 128 experts of 9.4 MB: 54 GiB per copy
    both = [PolicySpec(name="a", memory="pinned"), PolicySpec(name="b", memory="pageable")]
    check_host_memory(spec, both[:1], "cuda", "s.yaml", available=120 * 2**30)       # one copy fits
    with pytest.raises(InputError, match=r"s.yaml: policies: .*pageable and pinned.*GiB available"):
        check_host_memory(spec, both, "cuda", "s.yaml", available=120 * 2**30)
    check_host_memory(spec, both, "cpu", "s.yaml", available=120 * 2**30)            # CPU: one pageable copy
    int8 = PolicySpec(name="q", memory="pinned", expert_dtype="int8")                 # + a 27 GiB stored copy
    check_host_memory(spec, [both[0], int8], "cuda", "s.yaml", available=120 * 2**30)
    with pytest.raises(InputError, match=r"pinned and a quantised copy\) take 8[0-9]\.[0-9] GiB"):
        check_host_memory(spec, [both[0], int8], "cuda", "s.yaml", available=90 * 2**30)


def test_fast_state_rows_use_only_the_steps_that_ended_fast(tiny_profile, tmp_path, monkeypatch):
    """--host-state fast: each live step starts in the host's fast state and is marked by the
    probe after it; a row's fast-state error compares those steps with the projection of the
    same steps (a scripted probe: every other check finds the host slow)."""
    from calibrate.measurements import host_state as hs

    sc, base = load_scenario(write_scenario(tmp_path, profile=str(tiny_profile)))
    sc = sc.model_copy(update={"batch_sizes": [2], "policies": sc.policies[:1],
                               "trace": sc.trace.model_copy(update={"steps": 8})})
    calls = iter(range(10_000))
    gate = hs.enable(probe=lambda: 1.0 if next(calls) % 4 != 3 else 2.0)   # wait, check, wait, check(slow), ...
    try:
        rep = validate_model(sc, device="cpu", tiny=True, routing="trace", base_dir=base, timing=True)
    finally:
        hs.enable(False)
    assert rep["host_state"]["checks"] == gate.checks > 0 and rep["host_state"]["slow_after"] > 0
    for r in rep["rows"]:
        timed = len(r["live_steps_ms"])
        assert 0 < r["live_fast_steps"] < timed
        assert r["error_fast_pct"] == pytest.approx((r["sim_fast_median_ms"] - r["live_fast_median_ms"])
                                                    / r["live_fast_median_ms"] * 100)
        assert min(r["live_steps_ms"]) <= r["live_fast_median_ms"] <= max(r["live_steps_ms"])
    assert rep["fast_rows"] == sum(r["live_fast_steps"] >= 3 for r in rep["rows"])


def test_paired_error_scales_the_host_to_the_resident_row_beside(tiny_profile, tmp_path):
    """Rows run batch-major (resident first); the host factor found on a batch's resident row
    makes its projection meet its live median, and the same factor prices its neighbours."""
    sc, base = load_scenario(write_scenario(tmp_path, profile=str(tiny_profile)))
    order = []
    rep = validate_model(sc, device="cpu", tiny=True, routing="trace", base_dir=base, timing=True,
                         progress=lambda i, n, what: order.append(what))
    firsts = [w for w in order if w.startswith("resident")]
    assert [w.split()[0] for w in order[:3]] == ["resident", "dedup", "lru"] and len(firsts) == len(sc.batch_sizes)
    for r in rep["rows"]:
        f = r["host_factor_paired"]
        assert 0.2 <= f <= 5.0
        if r["policy"] == "resident":
            assert "error_paired_pct" not in r
            if 0.2 < f < 5.0:   # not clamped: the scaled projection meets the live median
                assert r["sim_paired_median_ms"] == pytest.approx(r["live_median_ms"], rel=0.01)
        else:
            res = next(x for x in rep["rows"] if x["policy"] == "resident" and x["batch_size"] == r["batch_size"])
            assert f == res["host_factor_paired"]
            assert r["error_paired_pct"] == pytest.approx((r["sim_paired_median_ms"] - r["live_median_ms"])
                                                          / r["live_median_ms"] * 100)
    assert rep["paired_rows"] == len(rep["rows"]) - len(sc.batch_sizes)
    assert rep["worst_abs_error_paired_pct"] >= rep["median_abs_error_paired_pct"] >= 0


def test_a_note_when_cpu_misses_run_with_other_threads_than_the_profiles():
    from calibrate.validation.model_rows import thread_notes
    from simulator.profile import load_profile

    prof = load_profile("h200")
    cal = prof.provenance["cpu_threads"]
    cpu = PolicySpec(name="cpu-miss", load="dedup", miss={"kind": "cpu"})
    copy = PolicySpec(name="dedup", load="dedup")
    assert thread_notes(prof, cal, [cpu]) == [] and thread_notes(prof, cal // 2, []) == []
    (note,) = thread_notes(prof, cal // 2, [cpu])
    assert "cpu-miss" in note and f"{cal // 2} torch thread" in note and "--cpus" in note
    assert copy.miss.kind == "copy"


def test_twin_report_fits_80_columns(capsys):
    """The twin's validation report (a shipped H100 run) reads at 80 columns, every row whole."""
    from types import SimpleNamespace

    from simmoe.validate_cli import print_twin_validation

    d = json.loads((Path(__file__).parent.parent / "docs/validation/runs/run-J-deepseek.json").read_text())
    print_twin_validation(SimpleNamespace(name=d["scenario"]), d, "cuda", ["out/validation.json"])
    lines = capsys.readouterr().out.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    assert sum(ln.split()[:1] == ["cpu-miss"] for ln in lines) == 4 and any("-15.2%" in ln for ln in lines)


def test_reproject_gives_the_runs_own_projection_back_and_follows_a_new_profile(tiny_profile, tmp_path):
    """A run's folder keeps each row's routing (routing.npz): re-projected with the same code and
    profile every projected figure comes back bit for bit; with a profile whose copies are twice
    as slow (and a latency of 10 ms a copy, so that the tiny model's copies show), the
    copying row's projection grows and its live figures stay; the command line
    writes a folder of its own and prints the table."""
    import numpy as np
    from calibrate.validation.model_rows import ROUTING_FILE, reproject, write_model_validation
    sc, base = load_scenario(write_scenario(tmp_path, profile=str(tiny_profile)))
    sc = sc.model_copy(update={"batch_sizes": [2], "policies": sc.policies[:1]})
    rep = validate_model(sc, device="cpu", tiny=True, routing="trace", base_dir=base, timing=True)
    run = tmp_path / "run"
    written = write_model_validation(rep, run)
    assert run / ROUTING_FILE in written and (run / ROUTING_FILE).exists()
    saved = json.loads((run / "validation.json").read_text())
    assert "_routing" not in saved and saved["spec"]["name"] == "olmoe-1b-7b-tiny"
    again = reproject(run, str(tiny_profile))
    for old, new in zip(saved["rows"], again["rows"]):
        for k in ("sim_median_ms", "sim_steps_ms", "error_pct", "tokens_error_pct", "live_median_ms"):
            assert new[k] == old[k], k
    assert again["median_abs_error_pct"] == saved["median_abs_error_pct"]
    slow = json.loads(Path(tiny_profile).read_text())
    for kind in ("pinned", "pageable"):
        c = slow["copy"]["h2d"][kind]
        c["bandwidth_GBps"] = c["bandwidth_GBps"] / 2
        c["latency_us"] = 10_000.0
        c.pop("table", None)
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    moved = reproject(run, str(tmp_path / "slow.json"))
    res, dedup = moved["rows"]
    assert dedup["sim_median_ms"] > saved["rows"][1]["sim_median_ms"]
    assert dedup["live_median_ms"] == saved["rows"][1]["live_median_ms"]
    assert res["sim_median_ms"] == pytest.approx(saved["rows"][0]["sim_median_ms"], rel=1e-9)   # copies none
    r = CliRunner().invoke(main, ["validate", str(run), "--reproject", "-p", str(tiny_profile)])
    assert r.exit_code == 0, r.output
    assert "re-projected" in r.output and (tmp_path / "run-reprojected" / "validation.json").exists()
    assert np.load(tmp_path / "run-reprojected" / ROUTING_FILE).files


def test_reproject_refuses_what_it_cannot_project(tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["validate", str(tmp_path / "empty"), "--reproject"])
    assert r.exit_code == 2 and "validation.json" in r.output and "Traceback" not in r.output
    old = tmp_path / "old"
    old.mkdir()
    (old / "validation.json").write_text(json.dumps({"executor": "model", "timing": True, "rows": []}))
    r = CliRunner().invoke(main, ["validate", str(old), "--reproject"])
    assert r.exit_code == 2 and "routing.npz" in r.output and "predates" in r.output
    r = CliRunner().invoke(main, ["validate", str(old)])
    assert r.exit_code == 2 and "is a folder" in r.output


def test_a_prompt_past_the_models_positions_is_one_line(tmp_path):
    """OLMoE-1B-7B has 4,096 positions: a prompt of 4,096 plus the scenario's decode steps is
    refused before anything is built, with the longest prompt that fits."""
    path = write_scenario(tmp_path)
    r = CliRunner().invoke(main, ["validate", str(path), "--executor", "model", "--tiny", "--device", "cpu",
                                  "--prompt", "4096"])
    assert r.exit_code == 2 and "positions: at most" in r.output and "Traceback" not in r.output


def test_the_live_rows_are_announced_with_their_projected_time(tiny_profile, tmp_path):
    """Before the live rows, one line says how long they will take: the projection of their
    steps and prompts, kept in the report beside the time they took."""
    sc, base = load_scenario(write_scenario(tmp_path, profile=str(tiny_profile)))
    sc = sc.model_copy(update={"batch_sizes": [2], "policies": sc.policies[:1]})
    lines = []
    rep = validate_model(sc, device="cpu", tiny=True, routing="trace", base_dir=base, timing=True, say=lines.append)
    assert len(lines) == 1 and lines[0].startswith("2 live row(s): about ")
    steps = sum(sum(r["sim_steps_ms"]) for r in rep["rows"]) / 1e3
    assert rep["estimate_s"] >= steps > 0 and rep["live_s"] > 0


def test_a_row_budget_cuts_a_rows_steps_and_its_projection_follows(tiny_profile, tmp_path):
    """--row-budget on the model executor: a row stops once its steps took that long, after the
    warm-up and 3 timed steps; its projection's median is over the same steps."""
    import statistics
    path = write_scenario(tmp_path, profile=str(tiny_profile))
    path.write_text(path.read_text().replace("steps: 2,", "steps: 8,"))
    sc, base = load_scenario(path)
    sc = sc.model_copy(update={"batch_sizes": [2], "policies": sc.policies[:1]})
    rep = validate_model(sc, device="cpu", tiny=True, routing="trace", base_dir=base, timing=True, row_budget_s=0.0)
    warm = rep["warmup_steps"]
    for r in rep["rows"]:
        assert r["steps"] == 8 and r["steps_run"] == warm + 3 and len(r["live_steps_ms"]) == 3
        assert r["sim_median_ms"] == statistics.median(r["sim_steps_ms"][warm:warm + 3])
    full = validate_model(sc, device="cpu", tiny=True, routing="trace", base_dir=base, timing=True)
    assert all(r["steps_run"] == 8 for r in full["rows"])


def test_max_seconds_keeps_the_rows_that_ran_and_names_the_rest(tiny_profile, tmp_path):
    """--max-seconds on the model executor: no row starts once the call has taken that long;
    the rows that ran are reported and projected, the others named (rows_not_run); with 0
    the first row runs and every later one is cut."""
    path = write_scenario(tmp_path, profile=str(tiny_profile))
    sc, base = load_scenario(path)
    sc = sc.model_copy(update={"batch_sizes": [2, 4], "policies": sc.policies[:1]})
    rep = validate_model(sc, device="cpu", tiny=True, routing="trace", base_dir=base, timing=True, max_seconds=0.0)
    assert [(r["policy"], r["batch_size"]) for r in rep["rows"]] == [("resident", 2)]
    assert rep["rows_not_run"] == [f"{sc.policies[0].name} B=2 prompt {rep['rows'][0]['prompt']}",
                                   f"resident B=4 prompt {rep['rows'][0]['prompt']}",
                                   f"{sc.policies[0].name} B=4 prompt {rep['rows'][0]['prompt']}"]
    assert rep["rows"][0]["sim_median_ms"] > 0
    full = validate_model(sc, device="cpu", tiny=True, routing="trace", base_dir=base, timing=True)
    assert len(full["rows"]) == 4 and full["rows_not_run"] == []


def test_a_sigterm_during_the_rows_keeps_the_rows_done(tiny_profile, tmp_path):
    """timeout's SIGTERM in the third row: that row is dropped and named with the reason, the
    rows after it named too, the two done projected and reported; the handler is restored."""
    import os
    import signal
    path = write_scenario(tmp_path, profile=str(tiny_profile))
    sc, base = load_scenario(path)
    sc = sc.model_copy(update={"batch_sizes": [2, 4], "policies": sc.policies[:1]})
    before = signal.getsignal(signal.SIGTERM)

    def progress(done, total, label):
        if done == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    rep = validate_model(sc, device="cpu", tiny=True, routing="trace", base_dir=base, timing=True,
                         progress=progress)
    prompt = rep["rows"][0]["prompt"]
    assert [(r["policy"], r["batch_size"]) for r in rep["rows"]] == [("resident", 2), (sc.policies[0].name, 2)]
    assert rep["stopped"] == "stopped by SIGTERM"
    assert rep["rows_not_run"] == [f"resident B=4 prompt {prompt} (stopped by SIGTERM)",
                                   f"{sc.policies[0].name} B=4 prompt {prompt} (stopped by SIGTERM)"]
    assert all(r["sim_median_ms"] > 0 for r in rep["rows"])
    assert signal.getsignal(signal.SIGTERM) is before
    from simmoe.validate_cli import not_run_line
    assert not_run_line(rep).startswith("2 row(s) not run: resident B=4")   # each with its reason
    assert not_run_line({**rep, "max_seconds": 9.0, "rows_not_run": ["x B=1 prompt 8"]}).startswith("--max-seconds 9: ")


def test_max_seconds_is_only_for_the_model_executor(tmp_path):
    r = CliRunner().invoke(main, ["validate", str(write_scenario(tmp_path)), "--max-seconds", "5"])
    assert r.exit_code == 2 and "--max-seconds" in r.output and "only with --executor model" in r.output


def test_a_row_too_big_for_the_free_gpu_memory_is_one_line_before_any_row():
    """The slot pool and KV cache of each row against the GPU memory free after the build:
    the largest row is named before anything runs (on the H200 a 4,000-token row at B=64 ran
    out of memory minutes into a call)."""
    from calibrate.executors.model import record_routing
    from calibrate.models.build import build_model
    from calibrate.validation.model_rows import check_gpu_memory, resident_policy, row_gpu_bytes
    b = build_model("olmoe-1b-7b", tiny=True, dtype="fp32")
    tr = record_routing(b, batch=4, steps=2)
    pol = resident_policy(b.spec.num_experts, b.spec.num_layers)
    small, big = row_gpu_bytes(b, pol, tr, 8, 2), row_gpu_bytes(b, pol, tr, 4000, 2)
    assert big > small > b.spec.num_experts * b.spec.num_layers * b.spec.expert_bytes
    check_gpu_memory(b, [(pol, 8, 4, tr)], 2, free=10 * small)
    with pytest.raises(InputError, match=r"row resident B=4 prompt 4000 needs ~.* GiB of GPU memory.*--skip-unfit"):
        check_gpu_memory(b, [(pol, 8, 4, tr), (pol, 4000, 4, tr)], 2, free=2 * small)
    # --skip-unfit: the rows that do not fit are named, the others kept
    assert check_gpu_memory(b, [(pol, 8, 4, tr), (pol, 4000, 4, tr), (pol, 8, 4, tr)], 2, free=2 * small,
                            skip=True) == {1}
    assert check_gpu_memory(b, [(pol, 8, 4, tr)], 2, free=10 * small, skip=True) == set()


def test_skip_unfit_is_only_for_the_model_executor_rows(tmp_path):
    r = CliRunner().invoke(main, ["validate", str(write_scenario(tmp_path)), "--skip-unfit"])
    assert r.exit_code == 2 and "--skip-unfit" in r.output and "only with --executor model" in r.output


def test_merge_keeps_the_in_situ_factors_of_styles_it_keeps(tiny_profile, tmp_path):
    """A style the new run did not time keeps its table and the in situ factor taken against
    it; a style it timed takes the new factor."""
    base = json.loads(tiny_profile.read_text())
    sec = base["engine"]["olmoe-1b-7b-tiny"]
    sec["styles"]["offload-graphs"] = dict(sec["styles"]["offload"])
    sec["in_situ"] = {"dense": 1.0, "experts": 1.31, "styles": {"offload-graphs": 1.09}, "points": []}
    (tmp_path / "base.json").write_text(json.dumps(base))
    doc = json.loads((tiny_profile.parent / "engine.json").read_text())
    doc["tables"]["in_situ"] = {"layers": 2, "moe_layers": 2, "steps": 4, "points": [
        {"batch": 1, "context": 8, "null_ms": 5.0, "resident_ms": 9.0, "active": 2}]}
    (tmp_path / "offload.json").write_text(json.dumps(doc))
    doc["tables"]["experts"] = {"hf-eager": doc["tables"]["experts"]["offload"]}
    (tmp_path / "eager.json").write_text(json.dumps(doc))
    situ = merge_engine(tmp_path / "base.json", [tmp_path / "offload.json"],
                        tmp_path / "out.json")["engine"]["olmoe-1b-7b-tiny"]["in_situ"]
    assert situ["styles"] == {"offload-graphs": 1.09}        # kept with its table
    assert situ["experts"] != 1.31                           # offload timed anew: its own factor
    situ = merge_engine(tmp_path / "base.json", [tmp_path / "eager.json"],
                        tmp_path / "out.json")["engine"]["olmoe-1b-7b-tiny"]["in_situ"]
    assert situ["experts"] == 1.31 and situ["styles"] == {"offload-graphs": 1.09}   # offload kept


def test_in_situ_before_the_rows_projects_them_with_its_terms_and_reprojects_bit_for_bit(tiny_profile, tmp_path):
    """--in-situ: the in situ steps run on the model just built, before any row; the rows are
    projected with the profile they give (written beside the rows, with the raw steps), and
    --reproject of the folder uses that profile: the same numbers, bit for bit."""
    from calibrate.measurements.engine_step import STEP_BATCHES
    from calibrate.validation.model_rows import reproject, write_model_validation
    # the head's table at a tenth: on a loaded CPU the in situ step without experts can come
    # out shorter than the head measured minutes before, and then no factor is taken
    doc = json.loads(tiny_profile.read_text())
    doc["engine"]["olmoe-1b-7b-tiny"]["head"] = [[b, ms / 10] for b, ms in doc["engine"]["olmoe-1b-7b-tiny"]["head"]]
    (tmp_path / "tiny-head.json").write_text(json.dumps(doc))
    sc, base = load_scenario(write_scenario(tmp_path, profile=str(tmp_path / "tiny-head.json")))
    sc = sc.model_copy(update={"batch_sizes": [2], "policies": sc.policies[:1]})
    lines: list[str] = []
    rep = validate_model(sc, device="cpu", tiny=True, routing="trace", base_dir=base, timing=True, in_situ=True,
                         say=lines.append)
    assert rep["profile"] == "profile.json" and rep["in_situ_s"] > 0
    assert any("in situ" in ln for ln in lines)
    out = tmp_path / "run"
    write_model_validation(rep, out)
    prof = json.loads((out / "profile.json").read_text())
    situ = prof["engine"]["olmoe-1b-7b-tiny"]["in_situ"]
    assert [p["batch"] for p in situ["points"]] == STEP_BATCHES and situ["dense"] > 0 and situ["cpu_path"]
    steps = json.loads((out / "in_situ.json").read_text())
    assert len(steps["points"]) == len(STEP_BATCHES) and "null_ms" in steps["points"][0]
    again = reproject(out)
    assert [r["sim_steps_ms"] for r in again["rows"]] == [r["sim_steps_ms"] for r in rep["rows"]]
    plain = validate_model(sc, device="cpu", tiny=True, routing="trace", base_dir=base, timing=True)
    assert "in_situ_s" not in plain and plain["profile"] == str(tmp_path / "tiny-head.json")


def test_in_situ_is_refused_for_the_twin(tmp_path):
    r = CliRunner().invoke(main, ["validate", str(write_scenario(tmp_path)), "--in-situ"])
    assert r.exit_code == 2 and "--in-situ: only with --executor model" in r.output


def test_cpu_miss_rows_report_the_cpu_experts_time_live_and_projected(tiny_profile, tmp_path):
    """A CPU-miss row carries the host's time in its CPU experts (and the input's download),
    live, beside the projection's, and a note sets them side by side; rows without CPU experts
    carry neither."""
    sc, base = load_scenario(write_scenario(tmp_path, profile=str(tiny_profile)))
    cpu = PolicySpec(name="cpu-miss", load="dedup", cache={"kind": "lru", "capacity": 2}, miss="cpu")
    sc = sc.model_copy(update={"batch_sizes": [2], "policies": [cpu]})
    rep = validate_model(sc, device="cpu", tiny=True, routing="trace", base_dir=base, timing=True)
    row = {r["policy"]: r for r in rep["rows"]}
    assert row["cpu-miss"]["live_cpu_ms"] > 0 and row["cpu-miss"]["live_cpu_down_ms"] >= 0
    assert row["cpu-miss"]["sim_cpu_ms"] > 0
    assert row["cpu-miss"]["live_cpu_ms"] < row["cpu-miss"]["live_median_ms"]
    assert "live_cpu_ms" not in row["resident"] and "sim_cpu_ms" not in row["resident"]
    assert any(n.startswith("cpu-miss B=2 prompt") and "projected" in n for n in rep["notes"])


def test_live_timeline_profiles_one_step_past_the_timed_ones_and_writes_both_sides(tiny_profile, tmp_path):
    """--live-timeline: each row's last step runs under the profiler, outside the row's timed
    steps; the row names its Perfetto file, which has the live process and the projected one
    (the engine's tracks of that step), written beside validation.json."""
    from calibrate.validation.model_rows import write_model_validation
    sc, base = load_scenario(write_scenario(tmp_path, profile=str(tiny_profile)))
    sc = sc.model_copy(update={"batch_sizes": [2], "policies": sc.policies[:1],
                               "trace": sc.trace.model_copy(update={"steps": 4})})
    rep = validate_model(sc, device="cpu", tiny=True, routing="trace", base_dir=base, timing=True, live_timeline=True)
    for r in rep["rows"]:
        t = r["live_timeline"]
        assert t["step"] == sc.trace.steps - 1 and r["steps_run"] == sc.trace.steps - 1
        assert len(r["live_steps_ms"]) == sc.trace.steps - 1 - rep["warmup_steps"] and r["decisions_identical"]
        assert t["file"] == f"timelines/{r['policy']}-b2-p{r['prompt']}.json" and t["sim_ms"] > 0
    dedup = rep["rows"][1]["live_timeline"]["copies"]
    assert dedup["projected"]["copies"] > 0 and rep["rows"][0]["live_timeline"]["copies"]["projected"]["copies"] == 0
    out = tmp_path / "run"
    written = write_model_validation(rep, out)
    assert out / "timelines" in written
    doc = json.loads((out / rep["rows"][1]["live_timeline"]["file"]).read_text())
    pids = {e["pid"] for e in doc["traceEvents"]}
    assert pids == {1, 2}
    live = [e for e in doc["traceEvents"] if e["pid"] == 1 and e["ph"] == "X"]
    sim = [e for e in doc["traceEvents"] if e["pid"] == 2 and e["ph"] == "X"]
    assert live and min(e["ts"] for e in live) == 0
    assert any(e.get("cat") == "copy" or e["name"].startswith("copy") for e in sim)
    assert all(0 <= e["ts"] <= rep["rows"][1]["live_timeline"]["sim_ms"] * 1e3 + 1 for e in sim)


def test_live_timeline_is_only_for_the_model_executor(tmp_path):
    r = CliRunner().invoke(main, ["validate", str(write_scenario(tmp_path)), "--live-timeline"])
    assert r.exit_code == 2 and "--live-timeline: only with --executor model" in r.output


def test_tier_policies_run_in_the_real_model_with_the_simulators_decisions(tiny_profile, tmp_path):
    """Quantised copies, direct reads and a cost-aware miss policy (its planners priced with the
    projection's cost model) in the real model on the CPU: every row's decisions and executed
    counts (dequantises, direct reads, CPU experts) equal the simulator's, and each tier
    actually happens."""
    from calibrate.validation.model_rows import COUNTED
    sc, base = load_scenario(write_scenario(tmp_path, profile=str(tiny_profile)))
    pols = [PolicySpec(name="lru", load="dedup", cache={"kind": "lru", "capacity": 4}),
            PolicySpec(name="int8", load="dedup", cache={"kind": "lru", "capacity": 4}, expert_dtype="int8"),
            PolicySpec(name="direct", load="dedup", cache={"kind": "lru", "capacity": 4}, miss="direct"),
            PolicySpec(name="cheapest", load="dedup", cache={"kind": "lru", "capacity": 4}, miss={"kind": "cheapest"})]
    sc = sc.model_copy(update={"batch_sizes": [3], "policies": pols, "trace": sc.trace.model_copy(update={"steps": 3})})
    rep = validate_model(sc, device="cpu", tiny=True, routing="trace", base_dir=base, timing=True)
    rows = {r["policy"]: r for r in rep["rows"]}
    assert all(r["decisions_identical"] for r in rep["rows"]) and rep["decisions_identical"]
    assert {"dequants", "direct_computes"} <= set(COUNTED)
    lru = rows["lru"]["GB_per_step"]
    assert lru > 0 and rows["int8"]["GB_per_step"] < 0.6 * lru    # the same misses, their stored bytes
    assert rows["direct"]["GB_per_step"] < lru                     # misses read in place, not copied
    assert all(r["sim_median_ms"] > 0 for r in rep["rows"])

