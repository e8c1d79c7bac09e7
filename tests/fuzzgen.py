"""Fuzzed inputs for the CLI, shared by tests/test_fuzz.py (hypothesis, bounded) and
bench/fuzz.py (thousands of inputs, counts by family and outcome).

Each generator takes a ``random.Random`` and a fresh folder and returns a :class:`Case`: the
``simmoe`` arguments, whether the input is certainly bad (``must_refuse``: an exit 0 is then
a bug), and the output folder that must be absent after an error and complete after a run.
:func:`run_case` runs one case in this process (click's CliRunner, a SIGALRM watchdog) and
classifies it: ``clean`` (exit 2, one ``error: <source>: ...`` line), ``valid`` (exit 0),
``traceback``, ``hang``, ``accepted`` (exit 0 though the input is bad), ``unclear`` (exit 2
without one clean line) or ``half-written`` (output left after an error, or incomplete).
"""
from __future__ import annotations

import io
import json
import os
import random
import signal
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from click.testing import CliRunner

from simmoe.cli import main
from simulator.traces.trace import concat_steps

OUTCOMES = ("clean", "valid", "traceback", "hang", "accepted", "unclear", "half-written")
RUN_FILES = ("summary.json", "steps.parquet", "scenario.yaml", "profile.json")


@dataclass
class Case:
    family: str
    label: str
    args: list[str]
    must_refuse: bool
    out: Path | None = None          # a results folder: absent after an error, complete after a run
    out_files: tuple[str, ...] = RUN_FILES
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- base inputs
def base_scenario() -> dict:
    return {
        "name": "fz", "model": {"preset": "published-study", "num_layers": 2, "num_experts": 8, "top_k": 2},
        "seed": 1, "replications": 1, "batch_sizes": [1, 2],
        "trace": {"generator": "mixed", "steps": 4, "zipf": 0.5, "batch_locality": 0.5},
        "policies": [{"name": "dedup", "load": "dedup"},
                     {"name": "lru", "cache": {"kind": "lru", "capacity": 6}, "prefetch": {"kind": "oracle"}}],
    }


#: scenario fields a mutation sets (dotted; [i] indexes a list)
SCENARIO_FIELDS = [
    "seed", "replications", "batch_sizes", "batch_sizes[0]", "trace.steps", "trace.zipf", "trace.batch_locality",
    "trace.prefill_tokens", "trace.batch_pool", "model.num_layers", "model.num_experts", "model.top_k",
    "model.hidden", "model.ffn", "model.dense_ms_per_layer", "model.shared_experts", "engine.warmup_steps",
    "engine.dense_ms_per_layer", "policies[1].cache.capacity", "policies[1].cache.staging",
    "policies[1].prefetch.budget", "policies[1].prefetch.accuracy", "policies[1].prefetch.options",
    "policies[0].miss", "policies[0].memory", "policies[0].load", "name", "trace.generator",
]
#: values that no numeric field may take (each must be refused)
ABSURD = [float("inf"), float("-inf"), float("nan"), 1e308, -1e308, 10**12, 10**30, "abc", [], {"a": 1}, 128.7]
#: values some fields take and others refuse (any clean outcome is right)
ODD = [0, -1, 1, 2, 5e-324, 0.5, True, None, "", "4 GiB", "99999 TiB", [1, 2], 3]


def set_field(doc: dict, path: str, value) -> None:
    node = doc
    parts = path.replace("]", "").replace("[", ".").split(".")
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    last = parts[-1]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value


def _yaml_value(v) -> str:
    """A YAML scalar for v (non-finite floats as .inf / .nan, which safe_dump writes too)."""
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


#: fields that take fractional values up to beyond 128.7 (milliseconds): 128.7 is absurd only
#: for the integer fields
_WIDE_FLOATS = ("model.dense_ms_per_layer", "engine.dense_ms_per_layer")


def absurd_value(rng: random.Random, path: str):
    """A value ``path`` must refuse (a seed may be as large as 2^63 - 1)."""
    return rng.choice([v for v in ABSURD if not (path == "seed" and v == 10**12)
                       and not (path in _WIDE_FLOATS and v == 128.7)])


def _numeric_field(path: str) -> bool:
    return path not in ("policies[0].miss", "policies[0].memory", "policies[0].load", "name", "trace.generator",
                        "policies[1].prefetch.options", "batch_sizes", "policies[1].cache.capacity")


def bomb_yaml(levels: int = 9) -> str:
    lines = ["x0: &x0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, levels):
        lines.append(f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- scenario
def gen_scenario(rng: random.Random, tmp: Path) -> Case:
    doc = base_scenario()
    out = tmp / "out"
    kind = rng.choice(["absurd", "odd", "odd", "text", "dup", "bomb", "nest", "option", "cross", "bytes",
                       "special", "valid"])
    must, label, text = False, kind, None
    if kind == "absurd":
        path = rng.choice([f for f in SCENARIO_FIELDS if _numeric_field(f)])
        v = absurd_value(rng, path)
        set_field(doc, path, v)
        must, label = True, f"{path}={v!r}"
    elif kind == "odd":
        path = rng.choice(SCENARIO_FIELDS)
        v = rng.choice(ODD + ABSURD)
        set_field(doc, path, v)
        label = f"{path}={v!r}"
    elif kind == "text":
        text = yaml.safe_dump(doc, sort_keys=False)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(text))
            text = text[:i] + rng.choice(["", ":", "[", "{", "&a", "*a", "\t", "- ", "'", "!!python/object "]) + text[i + 1:]
        label = "corrupted text"
    elif kind == "dup":
        text = yaml.safe_dump(doc, sort_keys=False) + rng.choice(["seed: 2\n", "name: again\n", "trace: {steps: 3}\n"])
        must = True
    elif kind == "bomb":
        levels = rng.randint(5, 9)
        opts = "{" + ", ".join(f"k{i}: *x{levels - 1}" for i in range(rng.randint(1, 5))) + "}"
        text = bomb_yaml(levels) + yaml.safe_dump(doc, sort_keys=False).replace(
            "prefetch:\n    kind: oracle", f"prefetch:\n    kind: oracle\n    options: {opts}")
        must = True
    elif kind == "nest":
        depth = rng.choice([70, 500, 5000])
        text = yaml.safe_dump(doc, sort_keys=False) + "description: " + "[" * depth + "]" * depth + "\n"
        must = True
    elif kind == "option":
        pick = rng.choice([("oracle", {"bogus": 1}), ("predicted", {"top_n": 2}), ("history", {"smoothing": 0}),
                           ("history", {"smoothing": float("nan")}), ("affinity", {"top_n": -1}),
                           ("popularity", {"train": "x.npz"})])
        doc["policies"][1]["prefetch"] = {"kind": pick[0], "options": pick[1]}
        must, label = True, f"prefetch {pick}"
    elif kind == "cross":
        pick = rng.choice([("model.top_k", 9), ("engine.warmup_steps", 4), ("engine.warmup_steps", 10),
                           ("policies[1].cache.capacity", 17), ("policies[1].cache.capacity", "1 TiB"),
                           ("policies[1].prefetch.budget", 9)])
        set_field(doc, *pick)
        must, label = True, f"{pick[0]}={pick[1]!r}"
    elif kind == "bytes":
        raw = yaml.safe_dump(doc).encode()
        i = rng.randrange(len(raw))
        (tmp / "s.yaml").write_bytes(raw[:i] + bytes([rng.choice([0xff, 0xfe, 0xc3, 0x80])]) + raw[i:])
        return Case("scenario", "non-UTF-8", ["run", str(tmp / "s.yaml"), "-q", "--out", str(out)], True, out)
    elif kind == "special":
        target = rng.choice(["dir", "fifo", "/dev/zero", "missing"])
        path = {"dir": tmp, "fifo": tmp / "fifo.yaml", "/dev/zero": Path("/dev/zero"), "missing": tmp / "no.yaml"}[target]
        if target == "fifo":
            os.mkfifo(path)
        return Case("scenario", target, ["run", str(path), "-q", "--out", str(out)], True, out)
    p = tmp / "s.yaml"
    p.write_text(text if text is not None else yaml.safe_dump(doc, sort_keys=False))
    return Case("scenario", label, ["run", str(p), "-q", "--out", str(out)], must, out)


# -------------------------------------------------------------------------------- trace
def small_trace(rng: random.Random, num_experts: int = 8, layers: int = 2, k: int = 2, batch: int = 2, steps: int = 4):
    parts = []
    for _ in range(steps):
        e = np.stack([np.stack([np.array(rng.sample(range(num_experts), k)) for _ in range(layers)])
                      for _ in range(batch)])
        parts.append((e, np.arange(batch, dtype=np.int32), 0))
    return concat_steps(parts, num_experts, {"generator": "fuzz"})


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _huge_npy(shape, dtype="<i2") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * 64


TRACE_BAD = {
    "experts": [lambda e: e.astype(np.float32), lambda e: e[:, :, 0], lambda e: e.astype(object),
                lambda e: e * 0 + 99, lambda e: e * 0 - 1, lambda e: np.repeat(e[:, :, :1], 2, axis=2), None],
    "step_offsets": [lambda o: o[::-1].copy(), lambda o: o.astype(np.float64), lambda o: o * 2,
                     lambda o: o.astype(np.uint64) * 0 + np.uint64(2**63 + 5), None],
    "seq": [lambda s: s[:-1], lambda s: s.astype(np.float64), lambda s: s * 0 - 3, None],
    "phase": [lambda p: p * 0 + 0.5, lambda p: p.astype(np.int8) * 0 - 1, lambda p: p * 0 + 2, lambda p: p[:-1], None],
    "num_experts": [lambda n: np.array(128.7), lambda n: np.array(0), lambda n: np.array(-5),
                    lambda n: np.array(2**40), lambda n: np.array("8"), lambda n: np.array([8, 8]), None],
    "version": [lambda v: np.array(2), lambda v: np.array(1.0), lambda v: np.array("one"), None],
    "format": [lambda f: np.array("other"), lambda f: np.array(3), None],
    "meta_json": [lambda m: np.array("{"), lambda m: np.array("[1]"), lambda m: np.array('{"a":1,"a":2}'),
                  lambda m: np.array("[" * 3000 + "]" * 3000), lambda m: np.array('{"x": NaN}'), None],
}


def write_trace_npz(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for k, v in members.items():
            z.writestr(f"{k}.npy", v)


def gen_trace(rng: random.Random, tmp: Path) -> Case:
    tr = small_trace(rng)
    p = tmp / "t.npz"
    tr.save(p)
    with np.load(p, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    members = {k: _npy(v) for k, v in arrays.items()}
    kind = rng.choice(["member", "member", "member", "huge", "truncate", "garbage", "extra", "valid"])
    label = kind
    if kind == "member":
        key = rng.choice(list(TRACE_BAD))
        fn = rng.choice(TRACE_BAD[key])
        if fn is None:
            del members[key]
            label = f"no {key}"
        else:
            members[key] = _npy(fn(arrays[key]))
            label = f"bad {key}"
    elif kind == "huge":
        key = rng.choice(["experts", "step_offsets", "seq", "phase"])
        shape = {"experts": (10**9, 2, 2), "step_offsets": (10**12,), "seq": (10**11,), "phase": (10**10,)}[key]
        members[key] = _huge_npy(shape, "<i8" if key == "step_offsets" else "<i2")
        label = f"huge {key}"
    if kind in ("member", "huge", "extra"):
        if kind == "extra":
            members["experts"] = _npy(arrays["experts"].astype(np.int64))   # a wider dtype is fine
        write_trace_npz(p, members)
    elif kind == "truncate":
        data = p.read_bytes()
        p.write_bytes(data[:rng.randrange(1, len(data))])
    elif kind == "garbage":
        p.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 400))))
    must = kind not in ("valid", "extra")
    if rng.random() < 0.5:
        return Case("trace", label, ["trace", "stats", str(p), "-b", "1,2"], must, None)
    sc = base_scenario()
    sc["trace"] = {"path": str(p)}
    sc["batch_sizes"] = [2]
    (tmp / "s.yaml").write_text(yaml.safe_dump(sc))
    out = tmp / "out"
    return Case("trace", label, ["run", str(tmp / "s.yaml"), "-q", "--out", str(out)], must, out)


# ------------------------------------------------------------------------------ profile
def _leaf_paths(doc, prefix=()):
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _leaf_paths(v, prefix + (k,))
    elif isinstance(doc, list) and doc and not isinstance(doc[0], (int, float)):
        for i, v in enumerate(doc):
            yield from _leaf_paths(v, prefix + (i,))
    else:
        yield prefix


def gen_profile(rng: random.Random, tmp: Path) -> Case:
    from importlib import resources

    doc = json.loads((resources.files("simulator") / "profiles" / "h100-pcie5.json").read_text())
    kind = rng.choice(["absurd", "odd", "text", "dup", "nest", "valid"])
    must, text = False, None
    numeric = [p for p in _leaf_paths(doc) if len(p) > 1 and p[0] in ("copy", "host", "compute")]
    path = rng.choice(numeric)
    label = kind + " " + ".".join(map(str, path))
    if kind in ("absurd", "odd"):
        node = doc
        for k in path[:-1]:
            node = node[k]
        v = rng.choice(["Infinity", "NaN", "1e999", "-1", '"x"', "1e308", "[]"] if kind == "absurd"
                       else ["0", "5e-324", "1", "null", "true", "[[1, 0.1]]", "[[0, 1]]"])
        node[path[-1]] = "@@V@@"
        text = json.dumps(doc).replace('"@@V@@"', v)
        must = kind == "absurd"
        label += f"={v}"
    elif kind == "text":
        text = json.dumps(doc)
        i = rng.randrange(len(text))
        text = text[:i] + rng.choice(["", "}", "[", ",", '"']) + text[i + 1:]
    elif kind == "dup":
        text = json.dumps(doc)[:-1] + ', "name": "again"}'
        must = True
    elif kind == "nest":
        doc["provenance"]["notes"] = "@@N@@"
        d = rng.choice([100, 5000])
        text = json.dumps(doc).replace('"@@N@@"', "[" * d + "]" * d)
        must = True
    p = tmp / "p.json"
    p.write_text(text if text is not None else json.dumps(doc))
    (tmp / "s.yaml").write_text(yaml.safe_dump(base_scenario()))
    out = tmp / "out"
    return Case("profile", label, ["run", str(tmp / "s.yaml"), "-q", "--profile", str(p), "--out", str(out)], must, out)


# -------------------------------------------------------------------------------- sweep
def gen_sweep(rng: random.Random, tmp: Path) -> Case:
    doc = {"name": "fzs", "base": base_scenario(), "grid": {"batch_sizes": [1, 2]}}
    kind = rng.choice(["axis", "huge", "dup", "bomb", "path", "key", "valid"])
    must, text, label = True, None, kind
    if kind == "axis":
        path = rng.choice([f for f in SCENARIO_FIELDS if _numeric_field(f)])
        v = absurd_value(rng, path)
        doc["grid"][path] = [1, v]
        label = f"{path}: [1, {v!r}]"
    elif kind == "huge":
        doc["grid"] = {"seed": list(range(100)), "trace.zipf": [0.1 * i for i in range(40)],
                       "replications": list(range(1, 31))}
    elif kind == "dup":
        text = yaml.safe_dump(doc, sort_keys=False) + "name: again\n"
    elif kind == "bomb":
        text = bomb_yaml() + yaml.safe_dump(doc, sort_keys=False) + "set: {description: *x8}\n"
    elif kind == "path":
        doc["grid"][rng.choice(["policies[9].load", "trace..zipf", "[0]", "policies[nope].load"])] = [1]
    elif kind == "key":
        doc[rng.choice(["grids", "Set", "zip2"])] = {}
    else:
        must = False
    p = tmp / "sw.yaml"
    p.write_text(text if text is not None else yaml.safe_dump(doc, sort_keys=False))
    out = tmp / "out"
    return Case("sweep", label, ["sweep", str(p), "-q", "-j", "1", "--out", str(out)], must, out,
                out_files=("results.parquet", "sweep.json"))


# --------------------------------------------------------------------------- importers
def _long_rows(rng, seqs=2, tokens=3, layers=2, k=2, num_experts=8):
    rows = []
    for s in range(seqs):
        for t in range(tokens):
            for l in range(layers):
                rows.append({"sequence": f"s{s}", "step": t, "layer": l, "experts": rng.sample(range(num_experts), k)})
    return rows


def gen_import(rng: random.Random, tmp: Path) -> Case:
    fmt = rng.choice(["csv", "jsonl", "layer-csv"])
    rows = _long_rows(rng)
    kind = rng.choice(["big-ids", "non-utf8", "wide-field", "long-line", "bad-cell", "dup", "missing", "valid",
                       "special", "nest"])
    must = {"non-utf8": True, "wide-field": fmt != "jsonl", "long-line": True, "dup": True, "special": True,
            "nest": True}.get(kind, False)
    num_experts = None
    if kind == "big-ids":
        num_experts = 131072
        for r in rows:
            r["experts"] = [40000 + e for e in rng.sample(range(90000), 2)]
    def render(rows) -> str:
        if fmt == "jsonl":
            return "".join(json.dumps(r) + "\n" for r in rows)
        if fmt == "csv":
            return "sequence,step,layer,experts\n" + "".join(
                f'{r["sequence"]},{r["step"]},{r["layer"]},"{r["experts"]}"\n' for r in rows)
        return "Layer ID,Batch Number,Token,Activated Expert IDs\n" + "".join(
            f'{r["layer"]},{r["sequence"][1:]},{r["step"]},"{r["experts"]}"\n'
            for r in sorted(rows, key=lambda r: (str(r["layer"]), r["sequence"], str(r["step"]))))
    text = render(rows).encode()
    if kind == "non-utf8":
        i = rng.randrange(len(text))
        text = text[:i] + b"\xff\xfe" + text[i:]
    elif kind == "wide-field":
        text = text.replace(b"s0", b"s" + b"0" * (200 * 1024), 1) if fmt != "layer-csv" else \
            text + b'0,0,9,"' + b"1 " * (90 * 1024) + b'"\n'
    elif kind == "long-line":
        text = text + (b'{"sequence": "' + b"x" * (2 << 20) + b'"}\n' if fmt == "jsonl" else b"a" * (300 * 1024) + b"\n")
    elif kind == "bad-cell":
        r = rng.choice(rows)
        r[rng.choice(["step", "layer", "experts"])] = rng.choice(["x", -1, 1e400 if fmt == "jsonl" else "1e400",
                                                                    [1, 1], [10**40, 2], "9" * 5000])
        text = render(rows).encode()
    elif kind == "dup":
        text = render(rows).encode() + (b'{"sequence": "s9", "sequence": "s8", "step": 0, "layer": 0, "experts": [1, 2]}\n'
                                        if fmt == "jsonl" else render(rows[:1]).encode().split(b"\n", 1)[1])
    elif kind == "missing":
        text = b"\n".join(text.split(b"\n")[:-3]) + b"\n"      # may be a shorter sequence, or a hole
    elif kind == "nest":
        text = text + (b'{"sequence": ' + b"[" * 5000 + b"]" * 5000 + b"}\n" if fmt == "jsonl" else b'0,0,0,"' + b"[" * 500 + b'"\n')
    suffix = ".jsonl" if fmt == "jsonl" else ".csv"
    src = tmp / f"r{suffix}"
    if kind == "special":
        src = rng.choice([Path("/dev/zero"), tmp / "fifo.csv"])
        if src.name == "fifo.csv":
            os.mkfifo(src)
    else:
        src.write_bytes(text)
    out = tmp / "o.npz"
    args = ["trace", "import", str(src), "-o", str(out)]
    if fmt != "jsonl":
        args += ["--format", "layer-csv" if fmt == "layer-csv" else "long-csv"]
    if num_experts:
        args += ["--num-experts", str(num_experts)]
    return Case("import", f"{fmt} {kind}", args, must, None, extra={"npz": out, "num_experts": num_experts})


# ----------------------------------------------------------------------------- flags
def gen_flags(rng: random.Random, tmp: Path) -> Case:
    (tmp / "s.yaml").write_text(yaml.safe_dump(base_scenario()))
    out = tmp / "out"
    flag, value, must = rng.choice([
        ("--batch-sizes", "0", True), ("--batch-sizes", "-1", True), ("--batch-sizes", "1e9", True),
        ("--batch-sizes", "1,1", True), ("--batch-sizes", "2000000000", True), ("--batch-sizes", "abc", True),
        ("--batch-sizes", "1,,2", False), ("--replications", "0", True), ("--replications", "100000", True),
        ("--replications", "1.5", True), ("--seed", "-1", True), ("--seed", str(2**70), True), ("--seed", "7", False),
        ("--profile", "nope", True), ("--profile", str(tmp), True), ("--profile", "/dev/zero", True),
        ("--format", "xml", True), ("--bogus", "1", True), ("--batch-sizes", "4", False),
    ])
    return Case("flags", f"{flag} {value}", ["run", str(tmp / "s.yaml"), "-q", flag, value, "--out", str(out)], must, out)


# ------------------------------------------------------------------------------- report
_RUN_DIR: dict[str, Path] = {}


def _base_run() -> Path:
    """One small run folder per process (made once), copied and mutated by report cases."""
    if "run" not in _RUN_DIR:
        import atexit
        import shutil
        import tempfile
        d = Path(tempfile.mkdtemp(prefix="simmoe-fuzz-run-"))
        atexit.register(shutil.rmtree, d, True)   # the process's one folder goes with it
        (d / "s.yaml").write_text(yaml.safe_dump(base_scenario()))
        r = CliRunner().invoke(main, ["run", str(d / "s.yaml"), "-q", "--out", str(d / "run")])
        assert r.exit_code == 0, r.stderr
        _RUN_DIR["run"] = d / "run"
    return _RUN_DIR["run"]


def gen_report(rng: random.Random, tmp: Path) -> Case:
    import shutil

    run = tmp / "run"
    shutil.copytree(_base_run(), run)
    summary = json.loads((run / "summary.json").read_text())
    kind = rng.choice(["drop", "mistype", "corrupt", "truncate-json", "policy", "results", "valid"])
    must = kind != "valid"
    label = kind
    if kind in ("drop", "mistype"):
        row = rng.choice(summary["results"])
        key = rng.choice(["policy", "batch_size", "requests", "bytes_h2d", "dedup_savings", "hit_rate",
                          "step_latency_ms", "tokens_per_s", "compute_ms", "transfer_ms", "bytes_per_token"])
        if kind == "drop":
            del row[key]
        else:
            row[key] = rng.choice(["x", None, [], {"a": 1}, True])
        label = f"{kind} {key}"
        (run / "summary.json").write_text(json.dumps(summary))
    elif kind == "corrupt":
        target = rng.choice(["steps.parquet", "profile.json", "scenario.yaml"])
        data = (run / target).read_bytes()
        i = rng.randrange(len(data))
        (run / target).write_bytes(data[:i] + bytes(rng.randrange(256) for _ in range(8)) + data[i + 8:])
        label = f"corrupt {target}"
        must = False        # random bytes may land where nothing checks them (a comment, padding)
    elif kind == "truncate-json":
        data = (run / "summary.json").read_text()
        (run / "summary.json").write_text(data[:rng.randrange(len(data))])
    elif kind == "policy":
        summary["results"][0]["policy"] = "nope"
        (run / "summary.json").write_text(json.dumps(summary))
    elif kind == "results":
        summary["results"] = rng.choice([None, "x", [1, 2], {"a": 1}])
        (run / "summary.json").write_text(json.dumps(summary))
    out = tmp / "rep"
    return Case("report", label, ["report", str(run), "--out", str(out)], must, out,
                out_files=("report.md", "report.html"))


FAMILIES = {"scenario": gen_scenario, "trace": gen_trace, "profile": gen_profile, "sweep": gen_sweep,
            "import": gen_import, "flags": gen_flags, "report": gen_report}


# -------------------------------------------------------------------------------- runner
class Hang(BaseException):
    """Raised by the watchdog: the case ran past its time."""


def _alarm(signum, frame):
    raise Hang()


def run_case(case: Case, timeout_s: int = 20) -> tuple[str, str]:
    """(outcome, detail) of one case, run in this process."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout_s)
    try:
        r = CliRunner().invoke(main, case.args, catch_exceptions=True)
    except Hang:
        return "hang", " ".join(case.args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    stderr = r.stderr.strip()
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback
        tb = "".join(traceback.format_exception(r.exception)).strip().splitlines()
        return "traceback", f"{type(r.exception).__name__}: {r.exception} ({tb[-3] if len(tb) > 2 else ''})"
    out = case.out
    if r.exit_code == 0:
        if case.must_refuse:
            return "accepted", case.label
        if out is not None and not all((out / f).is_file() for f in case.out_files):
            return "half-written", f"exit 0 but {out} lacks a result file"
        if case.family == "import" and case.extra.get("num_experts"):
            from simulator.traces.real import load_sequences
            ss = load_sequences(case.extra["npz"])
            if ss.experts.dtype.itemsize < 4 or int(np.asarray(ss.experts).max()) < 40000:
                return "accepted", "expert ids above int16 wrapped"
        return "valid", ""
    if r.exit_code == 2:
        lines = stderr.splitlines()
        if len(lines) != 1 or not lines[0].startswith("error: ") or lines[0].count(": ") < 2:
            return "unclear", stderr[:300]
        if out is not None and out.exists():
            return "half-written", f"{out} exists after an error"
        return "clean", lines[0][:300]
    return "traceback", f"exit {r.exit_code}: {stderr[-300:]}"


def make_case(family: str, seed: int, tmp: Path) -> Case:
    rng = random.Random(f"{family}-{seed}")
    tmp.mkdir(parents=True, exist_ok=True)
    return FAMILIES[family](rng, tmp)
