"""Fuzzed and hostile inputs: every bad scenario, trace, profile, sweep, import file, report
folder and flag gives exit 2 and one ``error: <file>: <field>: ...`` line; nothing throws,
hangs, is accepted when it must be refused, or is left half-written (tests/fuzzgen.py).
A larger run of the same generators: bench/fuzz.py (BENCHMARKS.md)."""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzzgen import FAMILIES, base_scenario, bomb_yaml, make_case, run_case, small_trace, write_trace_npz, _npy
from simmoe.cli import main
from simulator.errors import InputError
from simulator.safe_load import MAX_NODES, parse_json, parse_yaml
from simulator.scenario import parse_scenario
from simulator.traces import Trace, concat_steps, expert_dtype, load_trace
from simulator.traces.real import load_sequences

EXAMPLES = {"scenario": 30, "trace": 25, "profile": 20, "sweep": 15, "import": 25, "flags": 15, "report": 6}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fuzzed_inputs_fail_cleanly(family):
    @settings(max_examples=EXAMPLES[family], deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(seed=st.integers(0, 2**32 - 1))
    def check(seed):
        with tempfile.TemporaryDirectory() as d:
            case = make_case(family, seed, Path(d))
            outcome, detail = run_case(case)
            assert outcome in ("clean", "valid"), (case.label, case.args, outcome, detail)
    check()


def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stderr.strip()


def write(tmp_path, doc, name="s.yaml"):
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return p


def refused(tmp_path, doc, field, match=""):
    """The scenario is refused with exit 2, one line naming the file and ``field``, nothing written."""
    p = write(tmp_path, doc)
    code, err = invoke("run", p, "-q", "--out", tmp_path / "out")
    assert code == 2 and err.startswith(f"error: {p}: {field}: ") and match in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- schema bounds
@pytest.mark.parametrize("path,value,field", [
    ("trace.zipf", float("inf"), "trace.zipf"), ("trace.zipf", float("nan"), "trace.zipf"),
    ("trace.zipf", 1e308, "trace.zipf"), ("model.dense_ms_per_layer", 1e308, "model.dense_ms_per_layer"),
    ("engine.dense_ms_per_layer", float("-inf"), "engine.dense_ms_per_layer"),
    ("model.num_experts", 128.7, "model.num_experts"), ("model.num_layers", 10**9, "model.num_layers"),
    ("model.hidden", 10**12, "model.hidden"), ("seed", 2**70, "seed"), ("trace.steps", 10**9, "trace.steps"),
    ("batch_sizes", [10**9], "batch_sizes"), ("replications", True, "replications"),
])
def test_non_finite_and_absurd_numbers_refused(tmp_path, path, value, field):
    from fuzzgen import set_field
    doc = base_scenario()
    set_field(doc, path, value)
    refused(tmp_path, doc, field)


@pytest.mark.parametrize("path,value,field,match", [
    ("model.top_k", 9, "model", "top_k (9) exceeds num_experts (8)"),
    ("engine.warmup_steps", 4, "engine.warmup_steps", "leaves none of the trace's 4 steps"),
    ("policies[1].cache.capacity", 17, "policies[1].cache.capacity", "has only 16 experts in all layers"),
    ("policies[1].cache.capacity", "1 TiB", "policies[1].cache.capacity", "bytes)"),
    ("policies[1].cache.capacity", "99999 TiB", "policies[1].cache.capacity", "more than any GPU holds"),
    ("policies[1].prefetch.budget", 9, "policies[1].prefetch.budget", "more than the 8 experts"),
])
def test_cross_field_bounds(tmp_path, path, value, field, match):
    from fuzzgen import set_field
    doc = base_scenario()
    set_field(doc, path, value)
    refused(tmp_path, doc, field, match)


def test_per_layer_capacity_bound_is_per_layer():
    doc = base_scenario()
    doc["policies"][1]["cache"] = {"kind": "lru", "capacity": 8, "scope": "per-layer"}
    parse_scenario(doc)
    doc["policies"][1]["cache"]["capacity"] = 9
    with pytest.raises(InputError, match="only 8 experts per layer"):
        parse_scenario(doc)


@pytest.mark.parametrize("kind,options,match", [
    ("oracle", {"bogus": 1}, "unknown option 'bogus' (known: none)"),
    ("history", {"topn": 3}, "unknown option 'topn' (known: smoothing, top_n, train)"),
    ("history", {"smoothing": 0}, "options.smoothing must be a number in (0,"),
    ("affinity", {"smoothing": float("inf")}, "options.smoothing"),
    ("affinity", {"top_n": 2.5}, "options.top_n must be a positive integer"),
])
def test_prefetch_options_checked_at_load(kind, options, match):
    from simulator.policies import PREFETCH_POLICIES
    assert PREFETCH_POLICIES["history"].OPTIONS == {"train", "top_n", "smoothing"}
    doc = base_scenario()
    doc["policies"][1]["prefetch"] = {"kind": kind, "options": options}
    with pytest.raises(InputError) as e:
        parse_scenario(doc, "s.yaml")
    assert e.value.field == "policies[1].prefetch.options" and match in e.value.message


# --------------------------------------------------------------------------- safe loading
def test_duplicate_keys_refused_naming_the_key(tmp_path):
    text = yaml.safe_dump(base_scenario(), sort_keys=False) + "seed: 5\n"
    p = write(tmp_path, text)
    code, err = invoke("run", p, "-q", "--out", tmp_path / "out")
    assert code == 2 and "duplicate key 'seed' (first at line" in err and err.startswith(f"error: {p}: line ")
    with pytest.raises(InputError, match="duplicate key"):
        parse_json('{"a": 1, "b": {"c": 1, "c": 2}}', "p.json")


def test_alias_bombs_refused_quickly_and_small():
    for levels in (6, 9):                      # 10^6 nodes in 50 aliases; 10^9 in 80
        t = time.perf_counter()
        with pytest.raises(InputError, match="aliases"):
            parse_yaml(bomb_yaml(levels) + "y: *x%d\n" % (levels - 1), "b.yaml")
        assert time.perf_counter() - t < 5
    assert parse_yaml(bomb_yaml(4), "ok.yaml")["x3"][0][0][0] == [1] * 10   # 10^4 nodes: fine
    assert MAX_NODES >= 10**5


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "a: " + "[" * 3000 + "]" * 3000 + "\n",
                                  "a: " + "[" * 80 + "]" * 80 + "\n", "a: !!python/object:os.system x\n"],
                         ids=["recursive", "deep-3000", "deep-80", "python-tag"])
def test_recursive_deep_and_unsafe_yaml_refused(text):
    with pytest.raises(InputError):
        parse_yaml(text, "x.yaml")


def test_non_regular_inputs_refused_without_reading(tmp_path):
    fifo = tmp_path / "f.yaml"
    os.mkfifo(fifo)
    for target, msg in [(fifo, "not a regular file"), (Path("/dev/zero"), "not a regular file")]:
        t = time.perf_counter()
        code, err = invoke("run", target, "-q")
        assert code == 2 and msg in err and time.perf_counter() - t < 5, err
    code, err = invoke("trace", "import", "/dev/zero", "--format", "jsonl", "-o", tmp_path / "o.npz")
    assert code == 2 and "/dev/zero: source: not a regular file" in err
    code, err = invoke("run", write(tmp_path, base_scenario()), "-q", "--profile", tmp_path, "--out", tmp_path / "o")
    assert code == 2 and "is a folder" in err


# --------------------------------------------------------------------------- expert ids
def test_expert_dtype_holds_the_model():
    assert expert_dtype(8) == np.int16 and expert_dtype(32768) == np.int16
    assert expert_dtype(32769) == np.int32 and expert_dtype(131072) == np.int32


def test_ids_above_int16_survive_concat_save_and_load(tmp_path):
    E = 131072
    rng = np.random.default_rng(0)
    parts = [(rng.choice(E, size=(3, 2, 4), replace=False).reshape(3, 2, 4) % E, np.arange(3, dtype=np.int32), 0)
             for _ in range(2)]
    tr = concat_steps(parts, E, {})
    assert tr.experts.dtype == np.int32
    assert tr.experts.max() > 32767
    np.testing.assert_array_equal(tr.experts, np.concatenate([p[0] for p in parts]))
    back = load_trace(tr.save(tmp_path / "t.npz"))
    np.testing.assert_array_equal(back.experts, tr.experts)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_generated_ids_above_int16_do_not_wrap(version):
    from simulator.traces import generate
    t = generate(num_layers=2, num_experts=131072, top_k=8, batch_size=64, steps=3, seed=0,
                 generator="uniform", version=version)
    assert t.experts.dtype == np.int32 and int(t.experts.min()) >= 0 and int(t.experts.max()) > 100_000
    t.validate("generated")


def test_importer_keeps_ids_above_int16(tmp_path):
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps({"sequence": "a", "step": t, "layer": l, "experts": [40000 + t, 131071 - l]}) + "\n"
                           for t in range(3) for l in range(2)))
    code, err = invoke("trace", "import", src, "-o", tmp_path / "o.npz")
    assert code == 0, err
    ss = load_sequences(tmp_path / "o.npz")
    assert ss.experts.dtype == np.int32 and int(np.asarray(ss.experts).max()) == 131071
    assert int(np.asarray(ss.experts).min()) == 40000


# ------------------------------------------------------------------------------ .npz trace
def _bad_trace(tmp_path, key, value):
    import random
    tr = small_trace(random.Random(0))
    p = tr.save(tmp_path / "t.npz")
    with np.load(p) as z:
        members = {k: _npy(z[k]) for k in z.files}
    members[key] = _npy(value)
    write_trace_npz(p, members)
    return p


@pytest.mark.parametrize("key,value,match", [
    ("phase", np.array([0, 0.5, 0, 0]), "phase: must be 1-d integers"),
    ("phase", np.array([0, -1, 0, 0], dtype=np.int8), "phase: must hold 0"),
    ("num_experts", np.array(128.7), "num_experts: must be 0-d integers"),
    ("num_experts", np.array(0), "num_experts: 0 out of range"),
    ("experts", np.zeros((8, 2, 2), dtype=object), "experts: holds Python objects"),
    ("meta_json", np.array('{"a": 1, "a": 2}'), "duplicate key"),
])
def test_npz_fields_refused_not_coerced(tmp_path, key, value, match):
    p = _bad_trace(tmp_path, key, value)
    with pytest.raises(InputError, match=match):
        load_trace(p)


def test_npz_huge_declared_size_refused_before_allocating(tmp_path):
    import io
    import random
    tr = small_trace(random.Random(0))
    p = tr.save(tmp_path / "t.npz")
    with np.load(p) as z:
        members = {k: _npy(z[k]) for k in z.files}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<i8", "fortran_order": False, "shape": (10**12,)})
    members["step_offsets"] = buf.getvalue()
    write_trace_npz(p, members)
    with pytest.raises(InputError, match="step_offsets: declares 8,000,000,000,000 bytes"):
        load_trace(p)


# ------------------------------------------------------------------------------ importers
@pytest.mark.parametrize("body,fmt,match", [
    (b"sequence,step,layer,experts\na,0,0,\"[1, 2]\"\n\xff\xfe,0,1,\"[1, 2]\"\n", "long-csv", "line 3: not UTF-8 text"),
    (b"sequence,step,layer,experts\n" + b"x" * (200 * 1024) + b",0,0,\"[1, 2]\"\n", "long-csv", "field larger than field limit"),
    (b'{"sequence": "' + b"x" * (2 << 20) + b'"}\n', "jsonl", "line 1: longer than"),
    (b'{"sequence": "a", "step": 0, "layer": 0, "experts": [1, 2], "step": 1}\n', "jsonl", "line 1: step: duplicate key"),
])
def test_importer_failures_are_one_line(tmp_path, body, fmt, match):
    src = tmp_path / ("r.jsonl" if fmt == "jsonl" else "r.csv")
    src.write_bytes(body)
    code, err = invoke("trace", "import", src, "--format", fmt, "-o", tmp_path / "o.npz")
    assert code == 2 and match in err and err.startswith(f"error: {src}: ") and "\n" not in err, err
    assert not (tmp_path / "o.npz").exists()


# --------------------------------------------------------------------------------- report
def test_report_inputs_checked(tmp_path):
    p = write(tmp_path, base_scenario())
    assert invoke("run", p, "-q", "--out", tmp_path / "run")[0] == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    del summary["results"][1]["hit_rate"]
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    code, err = invoke("report", tmp_path / "run", "--out", tmp_path / "rep")
    assert code == 2 and "summary.json: results[1].hit_rate: required field missing" in err, err
    summary["results"][1]["hit_rate"] = "high"
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    code, err = invoke("report", tmp_path / "run", "--out", tmp_path / "rep")
    assert code == 2 and "results[1].hit_rate: 'high' is not a finite number" in err, err
    summary["results"][1]["hit_rate"] = 0.5
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "run" / "steps.parquet").write_bytes(b"PAR1 not really")
    code, err = invoke("report", tmp_path / "run", "--out", tmp_path / "rep")
    assert code == 2 and "steps.parquet: steps.parquet: unreadable" in err, err
    assert not (tmp_path / "rep").exists()
