"""Calibration of the graphed styles (``simmoe calibrate engine --style graphs``) on a tiny
model on the CPU: the decode grid of the graphed piece, the eager expert call with its host
terms, engine-merge into a profile, and DenseCost pricing the style from its own grid."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from calibrate.measurements.engine import EngineMeasurer, EnginePlan  # noqa: E402
from calibrate.measurements.engine_profile import engine_section  # noqa: E402
from calibrate.models.build import build_model, tiny_spec  # noqa: E402
from calibrate.validation.model_rows import validate_model  # noqa: E402
from simmoe.cli import main  # noqa: E402
from simulator.engine_costs import DenseCost, GridCost, MixedStepCost, require_style  # noqa: E402
from simulator.errors import InputError  # noqa: E402
from simulator.models import PRESETS  # noqa: E402
from simulator.profile import load_profile, parse_profile  # noqa: E402
from simulator.scenario import PolicySpec, parse_scenario  # noqa: E402
from tests.conftest import scenario_dict  # noqa: E402

MODEL = "olmoe-1b-7b"
KEY = f"{MODEL}-tiny"
OLMOE = PRESETS[MODEL]
TINY = tiny_spec(OLMOE)
H200 = Path(__file__).resolve().parents[1] / "simulator" / "profiles" / "h200.json"


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """One tiny calibration with both graphed styles, merged into the default profile."""
    d = tmp_path_factory.mktemp("graphs")
    eng, prof = d / "e.json", d / "p.json"
    with pytest.raises(SystemExit) as ex:
        main(["calibrate", "engine", "--model", MODEL, "--device", "cpu", "--tiny", "--batch", "1,4",
              "--context", "8,32", "--prompt", "8", "-n", "3", "--style", "graphs", "--style", "offload-graphs",
              "--out", str(eng)])
    assert ex.value.code in (0, None)
    base = json.loads(H200.read_text())   # with a compute table for the tiny expert shape (plumbing only)
    for side in ("gpu", "cpu"):
        base["compute"][side][TINY.shape_key] = base["compute"][side][OLMOE.shape_key]
    prof.write_text(json.dumps(base))
    with pytest.raises(SystemExit) as ex:
        main(["calibrate", "engine-merge", str(eng), "--profile", str(prof)])
    assert ex.value.code in (0, None)
    return json.loads(eng.read_text()), parse_profile(json.loads(prof.read_text()), str(prof))


def test_the_calibration_writes_graphed_tables(merged):
    doc, prof = merged
    t = doc["tables"]
    assert {"decode", "decode_graphs"} <= set(t) and set(t["experts"]) == {"graphs", "offload-graphs"}
    pts = [p for row in t["decode_graphs"]["points"] for p in row]
    assert len(pts) == 4 and all(p["ms"] > 0 and p["trials"] == 3 for p in pts)
    # the executor's call also timed for its GPU work alone (host ahead); transformers' is not
    ex = t["experts"]
    assert all(p["gpu_ms"] > 0 for p in ex["offload-graphs"]["points"]) and "gpu_fit" in ex["offload-graphs"]
    assert not any("gpu_ms" in p for p in ex["graphs"]["points"]) and "gpu_fit" not in ex["graphs"]
    e = prof.engine[KEY]
    for style in ("graphs", "offload-graphs"):
        st = e.styles[style]
        assert st.decode is not None and st.decode.batch == [1, 4] and st.decode.context == [8, 32]
        assert st.decode.ms == e.styles["graphs"].decode.ms     # one grid, both graphed styles
    # the eager expert call's host time (a fit a noisy CPU may make negative: set here)
    fit = {"base_ms": 0.1, "per_expert_ms": 0.02, "errors": [0.0, 0.0], "max_abs_error": 0.0}
    for style in ("graphs", "offload-graphs"):
        doc["tables"]["experts"][style]["host_fit"] = fit
    sec = engine_section(doc)["styles"]
    for style in ("graphs", "offload-graphs"):
        assert (sec[style]["host_base_ms"], sec[style]["host_per_expert_ms"]) == (0.1, 0.02)
    assert sec["graphs"]["host_per_load_ms"] is None            # it copies nothing
    assert sec["offload-graphs"]["host_per_load_ms"] == doc["tables"]["experts"]["offload-graphs"]["host_per_load_ms"]


def test_dense_cost_prices_the_graphed_grid(merged):
    _, prof = merged
    e = prof.engine[KEY]
    d = scenario_dict(model=MODEL, engine={"style": "graphs"})
    d["trace"] = {**d["trace"], "prompt_tokens": 16}
    sc = parse_scenario(d)
    sc = sc.model_copy(update={"model": sc.model.model_copy(update={"name": KEY})})
    cost = DenseCost.from_scenario(sc, prof, batch=4, phases=[0, 0], tokens=[4, 4])
    assert cost.dense_ms(0, 0) == pytest.approx(GridCost(e.styles["graphs"].decode).ms(4, 16))
    assert cost.dense_ms(1, 0) == pytest.approx(GridCost(e.styles["graphs"].decode).ms(4, 17))
    eager = DenseCost.from_scenario(sc.model_copy(update={"engine": sc.engine.model_copy(update={"style": "offload"})}),
                                    _with_offload(prof), batch=4, phases=[0], tokens=[4])
    assert eager.dense_ms(0, 0) != cost.dense_ms(0, 0)     # the eager grid prices the other styles
    assert cost.grouped
    mixed = MixedStepCost.from_scenario(sc, prof)          # a serving run's steps: the same grid
    assert mixed.price(4, 16, 0, 4)[0] == pytest.approx(GridCost(e.styles["graphs"].decode).ms(4, 16))


def _with_offload(prof):
    doc = prof.to_json()
    doc["engine"][KEY]["styles"]["offload"] = {"base_ms": 0.1, "per_expert_ms": 0.01}
    return parse_profile(doc, "p")


def test_a_graphed_style_without_its_grid_is_one_clear_error(merged):
    _, prof = merged
    doc = prof.to_json()
    del doc["engine"][KEY]["styles"]["graphs"]["decode"]
    p = parse_profile(doc, "p")
    with pytest.raises(InputError, match=rf"engine.{KEY}.styles.graphs.decode: .*no decode table replayed"):
        require_style(p, KEY, "graphs")
    del doc["engine"][KEY]["styles"]["graphs"]
    with pytest.raises(InputError, match=rf"engine.{KEY}.styles.graphs: engine style 'graphs' not measured"):
        require_style(parse_profile(doc, "p"), KEY, "graphs")


def test_the_graphed_layer_writes_at_its_position_only():
    """The measured piece: a static cache of context + 1 tokens, every trial writing the new
    token's keys at ``context`` and leaving the random context as it was."""
    b = build_model(MODEL, tiny=True)
    m = EngineMeasurer(EnginePlan(MODEL, device="cpu", tiny=True, trials=3, warmup=1), b)
    layer = b.moe_layers[0]
    call, cache = m.graphed_layer_call(layer, 2, 6, m.kv_shapes(layer))
    keys = cache.layers[layer].keys
    before = keys.clone()
    for _ in range(2):
        out = call()
        assert out.shape == (2, 1, b.spec.hidden)
        assert keys.shape[-2] == 7 and torch.equal(keys[:, :, :6], before[:, :, :6])
        assert not torch.equal(keys[:, :, 6], before[:, :, 6])     # the new token's keys written at 6
        assert int(cache.layers[layer].cumulative_length) == 7    # then the index past it, reset each trial


def test_graphs_are_not_measured_by_default():
    assert not any(s in ("graphs", "offload-graphs") for s in EnginePlan(MODEL).styles)


def test_validate_model_runs_the_offload_graphs_executor(merged, monkeypatch):
    """``simmoe validate --executor model`` with engine.style offload-graphs: the executor's
    graphs dispatch live (eager pieces on the CPU), decisions identical to the simulator's,
    projected from the graphed grid (timing forced on the CPU)."""
    _, prof = merged
    d = scenario_dict(model=MODEL, engine={"style": "offload-graphs"}, batch_sizes=[2])
    d["trace"] = {"generator": "uniform", "steps": 3, "prompt_tokens": 6}
    d["policies"] = [{"name": "lru", "load": "dedup", "cache": {"kind": "lru", "capacity": 256}}]
    from calibrate.executors import graphs
    runs = []
    real = graphs.GraphedLayers.run
    monkeypatch.setattr(graphs.GraphedLayers, "run", lambda self, ids, pos: runs.append(pos) or real(self, ids, pos))
    rep = validate_model(parse_scenario(d), profile=prof, device="cpu", tiny=True, routing="trace", timing=True)
    assert runs and set(runs) == {6, 7, 8}          # every step of every row through the pieces
    assert [r["policy"] for r in rep["rows"]] == ["resident", "lru"]
    for r in rep["rows"]:
        assert r["decisions_identical"] and r["sim_median_ms"] > 0
    assert rep["rows"][1]["copies_per_step"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphed_grid_captured_and_replayed():
    """On CUDA every point of the graphed grids is captured and replayed (none skipped for a
    refused capture), DeepSeek-V2's dense layer and MLA included."""
    from calibrate.measurements.engine import measure_engine
    doc = measure_engine(EnginePlan("deepseek-v2-lite", device="cuda", tiny=True, batches=[1, 4], contexts=[8, 32],
                                    prompts=[8], trials=3, warmup=1, styles=["graphs"]))
    assert not [s for s in doc["skipped"] if "capture" in s["why"]]
    for t in ("decode_graphs", "dense_decode_graphs"):
        assert all(p is not None and p["ms"] > 0 for row in doc["tables"][t]["points"] for p in row)
