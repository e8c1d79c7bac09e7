"""Every bad input: one line naming the file and field, exit 2, no traceback, nothing written."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from simmoe.cli import main
from simulator.traces import generate

from conftest import scenario_dict


def invoke(args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def write_yaml(tmp_path, doc, name="s.yaml"):
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return p


def mutate(**changes):
    d = scenario_dict()
    for path, value in changes.items():
        obj = d
        keys = path.split("__")
        for k in keys[:-1]:
            obj = obj[int(k)] if k.isdigit() else obj[k]
        last = keys[-1]
        if value is KeyError:
            del obj[last]
        else:
            obj[int(last) if last.isdigit() else last] = value
    return d


BAD_SCENARIOS = [
    (mutate(colour="blue"), "colour: unknown key"),
    (mutate(batch_sizes=[0, 4]), "batch_sizes: batch size 0 must be positive"),
    (mutate(batch_sizes="many"), "batch_sizes"),
    (mutate(replications=0), "replications"),
    (mutate(model={"preset": "published-study", "top_k": 200}), "model: top_k (200) exceeds num_experts"),
    (mutate(model="gpt-9"), "unknown model preset 'gpt-9'"),
    (mutate(model={"preset": "published-study", "hidden": -5}), "model.hidden"),
    (mutate(policies__0__cache={"kind": "arc", "capacity": 4}), "policies[0].cache.kind: unknown cache policy 'arc'"),
    (mutate(policies__0__cache={"kind": "lru"}), "needs a capacity"),
    (mutate(policies__0__cache={"kind": "lru", "capacity": 0}), "policies[0].cache.capacity"),
    (mutate(policies__0__prefetch={"kind": "telepathy"}), "unknown prefetch policy 'telepathy'"),
    (mutate(policies__0__load="telepathic"), "policies[0].load: unknown load policy"),
    (mutate(policies__0__memory="flash"), "policies[0].memory"),
    (mutate(trace={"generator": "uniform", "zipf": 1.0}), "generator 'uniform' has no knob 'zipf'"),
    (mutate(trace={"generator": "mixed", "temporal": 1.5}), "trace.temporal"),
    (mutate(trace={"generator": "mixed", "steps": -1}), "trace.steps"),
    (mutate(trace={"steps": 4}), "give exactly one of generator, path, sequences"),
    (mutate(name=KeyError), "name: required key missing"),
    (mutate(policies=[{"name": "a"}, {"name": "a"}]), "policy name 'a' used twice"),
    ("name: [unclosed\n", "malformed YAML"),
    ("- just\n- a list\n", "a scenario must be a YAML mapping"),
]


@pytest.mark.parametrize("doc,expected", BAD_SCENARIOS)
def test_bad_scenario(tmp_path, doc, expected):
    p = write_yaml(tmp_path, doc)
    out = tmp_path / "out"
    code, stdout, stderr = invoke(["run", p, "-o", out, "-q"])
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {p}") and expected in lines[0], stderr
    assert "Traceback" not in stderr + stdout
    assert not out.exists()


def test_missing_scenario_file(tmp_path):
    code, _, stderr = invoke(["run", tmp_path / "nope.yaml"])
    assert code == 2 and "nope.yaml: scenario: file not found" in stderr


def saved_trace(tmp_path, **kw):
    d = scenario_dict()
    m = d["model"]
    tr = generate(num_layers=m["num_layers"], num_experts=m["num_experts"], top_k=2, batch_size=4, steps=3, seed=0)
    for k, v in kw.items():
        object.__setattr__(tr, k, v)
    return tr.save(tmp_path / "t.npz"), tr


def run_with_trace(tmp_path, trace_path, batch=4):
    doc = mutate(trace={"path": str(trace_path)}, batch_sizes=[batch])
    return invoke(["run", write_yaml(tmp_path, doc), "-o", tmp_path / "out", "-q"])


def test_trace_file_runs(tmp_path):
    p, _ = saved_trace(tmp_path)
    code, _, stderr = run_with_trace(tmp_path, p)
    assert code == 0, stderr


def test_trace_expert_out_of_range(tmp_path):
    p, tr = saved_trace(tmp_path)
    e = tr.experts.copy()
    e[5, 1, 0] = 99
    saved_trace(tmp_path, experts=e)
    code, _, stderr = run_with_trace(tmp_path, p)
    assert code == 2 and "t.npz: experts: expert id 99 out of range [0, 16) at token row 5" in stderr


def test_trace_truncated(tmp_path):
    p, _ = saved_trace(tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    code, _, stderr = run_with_trace(tmp_path, p)
    assert code == 2 and "t.npz: trace: malformed or truncated trace file" in stderr
    assert "Traceback" not in stderr


def test_trace_wrong_batch(tmp_path):
    p, _ = saved_trace(tmp_path)
    code, _, stderr = run_with_trace(tmp_path, p, batch=8)
    assert code == 2 and "saved with batch 4" in stderr


def test_trace_not_npz(tmp_path):
    p = tmp_path / "t.npz"
    p.write_text("hello")
    code, _, stderr = run_with_trace(tmp_path, p)
    assert code == 2 and "malformed or truncated" in stderr


def test_trace_pickle_refused(tmp_path):
    p = tmp_path / "t.npz"
    np.savez(p, format=np.array(["simmoe-trace", None], dtype=object))
    code, _, stderr = run_with_trace(tmp_path, p)
    assert code == 2 and "Traceback" not in stderr


@pytest.mark.parametrize("content,expected", [
    ("{not json", "malformed JSON"),
    (json.dumps({"format": "something-else"}), "format: not a simmoe profile"),
    (json.dumps({"format": "simmoe-profile", "version": 9}), "unsupported profile version 9"),
    (json.dumps({"format": "simmoe-profile", "version": 1, "name": "x", "provenance": {},
                 "copy": {"h2d": {"pinned": {"latency_us": 1, "bandwidth_GBps": -2}}},
                 "compute": {"gpu": {}}}), "copy.h2d.pinned.bandwidth_GBps"),
])
def test_bad_profile(tmp_path, content, expected):
    prof = tmp_path / "p.json"
    prof.write_text(content)
    code, _, stderr = invoke(["run", write_yaml(tmp_path, scenario_dict()), "--profile", prof, "-q",
                              "-o", tmp_path / "out"])
    assert code == 2 and str(prof) in stderr and expected in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_profile_without_the_models_shape(tmp_path):
    doc = mutate(model="mixtral-8x7b")
    code, _, stderr = invoke(["run", write_yaml(tmp_path, doc), "--profile", "rtx3090-published", "-q"])
    assert code == 2 and "compute.gpu.4096x14336-bf16-gated" in stderr


@pytest.mark.parametrize("args,expected", [
    (["--profile", "nonexistent"], "unknown profile 'nonexistent'"),
    (["--batch-sizes", "1,x"], "--batch-sizes"),
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--replications", "0"], "--replications"),
    (["--format", "xlsx"], "--format"),
])
def test_bad_flags(tmp_path, args, expected):
    code, _, stderr = invoke(["run", write_yaml(tmp_path, scenario_dict()), "-q", "-o", tmp_path / "out"] + args)
    assert code == 2 and expected in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,expected", [
    (["run"], "Missing argument 'SCENARIO'"),
    (["run", "s.yaml", "--bogus"], "No such option '--bogus'"),
    (["--bogus"], "No such option '--bogus'"),
    (["bogus"], "No such command 'bogus'"),
    (["trace", "gen", "--batch", "0"], "'--batch' / '-b': 0 is not in the range"),
    (["validate", "s.yaml", "--host-window", "-1"], "'--host-window': -1.0 is not in the range"),
])
def test_usage_errors_are_one_line(args, expected):
    """click's own usage errors (a missing argument, an unknown flag, a value out of range) get
    the same one line as every other bad input, naming the command to ask for help."""
    code, stdout, stderr = invoke(args)
    assert code == 2 and expected in stderr and stderr.count("\n") == 1
    assert stderr.startswith("error: command line: ") and "--help'" in stderr and "Usage:" not in stderr + stdout


def test_cpu_miss_without_cpu_timings(tmp_path):
    doc = mutate(policies=[{"name": "cpu", "miss": "cpu"}])
    code, _, stderr = invoke(["run", write_yaml(tmp_path, doc), "--profile", "h100-probe", "-q"])
    assert code == 2 and "compute.cpu" in stderr


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, stderr = invoke(["run", write_yaml(tmp_path, scenario_dict()), "-q", "-o", blocker / "sub"])
    assert code == 2 and "--out" in stderr


def test_console_script_exit_code(tmp_path):
    p = write_yaml(tmp_path, mutate(batch_sizes=[-1]))
    r = subprocess.run([sys.executable, "-m", "simmoe.cli", "run", str(p)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
