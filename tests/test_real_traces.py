"""Real routing traces: import (layer CSV, long CSV, Parquet, JSON lines), the sequences file,
malformed rows, streaming memory, and batching recorded sequences into decode steps."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from simulator.errors import InputError
from simulator.models import PRESETS
from simulator.runner import build_trace
from simulator.scenario import parse_scenario
from simulator.traces.real import (
    SequenceSet, batch_set, import_sequences, load_sequences, open_sequences, read_sequences, sequences_from_trace,
    split_indices,
)
from simulator.traces import generate

REPO = Path(__file__).resolve().parent.parent
SHARED_TRACE = REPO.parent / "shared" / "traces" / "deepseek-v2-lite-puffin"


def random_set(seed: int = 0, n: int = 5, L: int = 3, E: int = 8, k: int = 2) -> SequenceSet:
    """Sequences of random lengths with distinct random experts per (token, layer)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    lengths = rng.integers(1, 12, size=n)
    T = int(lengths.sum())
    experts = np.argsort(rng.random((T, L, E)), axis=2)[:, :, :k].astype(np.int16)
    return SequenceSet(experts=experts, offsets=np.concatenate([[0], np.cumsum(lengths)]), num_experts=E,
                       names=np.array([f"s{i}" for i in range(n)]), prompt_lengths=np.zeros(n, np.int64))


def write_layer_csv(path: Path, routing: np.ndarray, tokens: list[str]) -> None:
    """One sequence in the DeepSeek-V2-Lite Puffin layout (rows grouped by layer, ids from 1)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Layer ID", "Batch Number", "Token", "Activated Expert IDs"])
        for l in range(routing.shape[1]):
            for t in range(routing.shape[0]):
                w.writerow([l + 1, 0, tokens[t], "[" + ", ".join(str(int(e)) for e in routing[t, l]) + "]"])


def long_rows(ss: SequenceSet) -> list[dict]:
    """One row per (sequence, token, layer), tokens of each sequence in a scrambled order."""
    rng = np.random.Generator(np.random.PCG64(7))
    rows = []
    for i in range(ss.num_sequences):
        seq = ss.sequence(i)
        cells = [(t, l) for t in range(len(seq)) for l in range(ss.num_layers)]
        for j in rng.permutation(len(cells)):
            t, l = cells[j]
            rows.append({"sequence": str(ss.names[i]), "position": t, "layer": 10 + l, "token": f"tok{t}",
                         "experts": [int(e) for e in seq[t, l]]})
    return rows


def assert_same_routing(a: SequenceSet, b: SequenceSet) -> None:
    assert np.array_equal(np.asarray(a.experts), np.asarray(b.experts))
    assert np.array_equal(a.offsets, b.offsets)
    assert list(a.names) == list(b.names)


# ---------------------------------------------------------------------------- round trips
def test_layer_csv_round_trip_in_natural_file_order(tmp_path):
    ss = random_set(n=3)
    src = tmp_path / "src"
    src.mkdir()
    awkward = ['<｜begin▁of▁sentence｜>', ",", 'say "hi", then', "Ġ", "[8, 26]"] * 3
    names = ["prompt_10", "prompt_2", "prompt_1"]          # natural order: 1, 2, 10
    for i, name in zip([2, 1, 0], names):
        seq = ss.sequence(i)
        write_layer_csv(src / f"{name}.csv", seq, awkward[:len(seq)])
    out = import_sequences(src, tmp_path / "t.npz")
    assert isinstance(out.experts, np.memmap)          # stored uncompressed, opened lazily
    assert list(out.names) == ["prompt_1", "prompt_2", "prompt_10"]
    assert np.array_equal(np.asarray(out.experts), ss.experts)
    assert np.array_equal(out.offsets, ss.offsets)
    assert out.num_experts == int(ss.experts.max()) + 1
    assert out.meta["source_format"] == "layer-csv"
    assert_same_routing(read_sequences(src), out)        # in-memory parse = streamed import


@pytest.mark.parametrize("fmt", ["long-csv", "parquet", "jsonl"])
def test_long_form_round_trip(tmp_path, fmt):
    ss = random_set(seed=3)
    rows = long_rows(ss)
    if fmt == "long-csv":
        path = tmp_path / "r.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sequence", "position", "layer", "token", "experts"])
            for r in rows:
                w.writerow([r["sequence"], r["position"], r["layer"], r["token"], json.dumps(r["experts"])])
    elif fmt == "parquet":
        path = tmp_path / "r.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=17)
    else:
        path = tmp_path / "r.jsonl"
        path.write_text("".join(json.dumps({"request_id": r["sequence"], "pos": r["position"], "layer_id": r["layer"],
                                            "topk_ids": r["experts"]}) + "\n" for r in rows))
    out = import_sequences(path, tmp_path / "t.npz", num_experts=ss.num_experts)
    assert out.meta["source_format"] == fmt
    assert_same_routing(out, ss)
    again = tmp_path / "again.npz"
    out.save(again)                                       # write -> read gives the same routing
    assert_same_routing(load_sequences(again), ss)


def test_expert_columns_and_step_order_of_appearance(tmp_path):
    # a prefill step (step 0) holds two tokens: rows sharing (sequence, step, layer) keep their order
    path = tmp_path / "r.csv"
    path.write_text("sequence,step,layer,expert_0,expert_1\n"
                    "a,0,0,1,2\na,0,1,3,4\na,0,0,5,6\na,0,1,7,0\na,1,0,2,3\na,1,1,4,5\n"
                    "b,0,0,0,1\nb,0,1,1,2\n")
    ss = read_sequences(path)
    assert list(ss.names) == ["a", "b"]
    assert ss.sequence(0).tolist() == [[[1, 2], [3, 4]], [[5, 6], [7, 0]], [[2, 3], [4, 5]]]
    assert ss.sequence(1).tolist() == [[[0, 1], [1, 2]]]


def test_sequences_from_trace_recovers_each_batch_row():
    tr = generate(num_layers=2, num_experts=8, top_k=2, batch_size=3, steps=5, seed=1, prefill_tokens=2)
    ss = sequences_from_trace(tr)
    assert ss.num_sequences == 3 and ss.lengths.tolist() == [7, 7, 7]
    assert ss.prompt_lengths.tolist() == [2, 2, 2]
    decode = tr.experts[tr.step_offsets[1]:]
    assert np.array_equal(ss.sequence(1)[2:], decode[1::3])


# ---------------------------------------------------------------------------- bad rows
def _csv_with(tmp_path: Path, body: str, name="prompt_1.csv") -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / name).write_text("Layer ID,Batch Number,Token,Activated Expert IDs\n" + body)
    return src


@pytest.mark.parametrize("body, where, says", [
    ('1,0,a,"[1, 2]"\n1,0,b,"[1, x]"\n', "line 3", "not a list of integers"),
    ('1,0,a,"[1, 2]"\n1,0,b\n', "line 3", "expected 4 fields, found 3"),
    ('1,0,a,"[1, 2]"\n1,0,b,"[3, 3]"\n', "line 3", "repeat an expert"),
    ('1,0,a,"[1, 2]"\nx,0,b,"[3, 4]"\n', "line 3", "Layer ID 'x' is not an integer"),
    ('1,0,a,"[1, 2]"\n1,0,b,"[3, 4, 5]"\n', "line 3", "3 expert ids; earlier rows have 2"),
    ('1,0,a,"[1, 2]"\n1,0,b,"[3, 4]"\n2,0,a,"[1, 2]"\n', "line 4", "layer 2 has 1 tokens, layer 1 has 2"),
    ('1,0,a,"[1, 2]"\n2,0,z,"[1, 2]"\n', "line 3", "token 0 of layer 2 is 'z', layer 1 has 'a'"),
    ('1,0,a,"[1, 9]"\n', "line 2", "out of range [0, 8)"),
])
def test_layer_csv_rejects_malformed_rows_with_file_and_line(tmp_path, body, where, says):
    src = _csv_with(tmp_path, body)
    with pytest.raises(InputError) as e:
        import_sequences(src, tmp_path / "t.npz", num_experts=8)
    assert e.value.source == str(src / "prompt_1.csv")
    assert e.value.field == where
    assert says in e.value.message
    assert not (tmp_path / "t.npz").exists() and not list(tmp_path.glob(".t.npz*"))   # nothing left behind


def test_layer_csv_files_must_share_layers(tmp_path):
    src = _csv_with(tmp_path, '1,0,a,"[1, 2]"\n2,0,a,"[1, 2]"\n')
    _csv_with(tmp_path, '1,0,a,"[1, 2]"\n3,0,a,"[1, 2]"\n', name="prompt_2.csv")
    with pytest.raises(InputError, match=r"prompt_2.csv: line 2: layers \[1, 3\] differ"):
        read_sequences(src)


@pytest.mark.parametrize("lines, where, says", [
    (['{"seq": 1, "pos": 0, "layer": 0, "experts": [1, 2]}', '{"seq": 1, "pos": 0, "layer": 0'],
     "line 2", "malformed JSON"),
    (['{"seq": 1, "pos": 0, "layer": 0, "experts": [1, 2]}', '{"seq": 1, "pos": 0, "layer": 0, "experts": [1, 3]}'],
     "line 2", "given twice (first at line 1)"),
    (['{"seq": 1, "pos": 0, "layer": 0, "experts": [1, 2]}', '{"seq": 2, "pos": 0, "layer": 0, "experts": [1, 2]}',
      '{"seq": 1, "pos": 1, "layer": 0, "experts": [1, 2]}'], "line 3", "must be contiguous"),
    (['{"seq": 1, "pos": 0, "layer": 0, "experts": [1, 2]}', '{"seq": 1, "pos": 0, "layer": 1, "experts": [1, 2]}',
      '{"seq": 1, "pos": 1, "layer": 0, "experts": [1, 2]}'], "line 1", "token 1 has no row for layer 1"),
    (['{"seq": 1, "pos": "x", "layer": 0, "experts": [1, 2]}'], "line 1", "position 'x' is not an integer"),
    (['{"seq": 1, "pos": 0, "layer": 0, "experts": [1, true]}'], "line 1", "not all integers"),
])
def test_jsonl_rejects_malformed_records_with_line(tmp_path, lines, where, says):
    path = tmp_path / "dump.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as e:
        read_sequences(path)
    assert (e.value.source, e.value.field) == (str(path), where)
    assert says in e.value.message


def test_parquet_bad_row_is_named_by_row_number(tmp_path):
    path = tmp_path / "r.parquet"
    rows = [{"sequence": "a", "step": t, "layer": 0, "experts": [t, t + 1]} for t in range(5)]
    rows[3]["experts"] = [4, 4]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(InputError, match=r"r.parquet: row 4: expert ids \[4, 4\] repeat an expert"):
        read_sequences(path)


def test_cli_import_prints_one_line_and_exits_2(tmp_path):
    from simmoe.cli import main

    src = _csv_with(tmp_path, '1,0,a,"[1, 2]"\n1,0,b,"[1, 2"\n')
    (src / "prompt_1.csv").write_text((src / "prompt_1.csv").read_text().replace('"[1, 2"', "[1; 2]"))
    res = CliRunner().invoke(main, ["trace", "import", str(src), "-o", str(tmp_path / "t.npz")])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: {src / 'prompt_1.csv'}: line 3: expert ids '[1; 2]' are not a list of integers"]


def test_cli_import_reports_what_it_wrote(tmp_path):
    from simmoe.cli import main

    src = tmp_path / "src"
    src.mkdir()
    write_layer_csv(src / "prompt_1.csv", random_set(n=1).sequence(0), ["t"] * 20)
    res = CliRunner().invoke(main, ["trace", "import", str(src), "-o", str(tmp_path / "t.npz")])
    assert res.exit_code == 0, res.output
    assert "1 sequences" in res.output and "3 layers" in res.output


def test_truncated_sequences_file_is_an_input_error(tmp_path):
    path = tmp_path / "t.npz"
    random_set().save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match="malformed or truncated"):
        load_sequences(path)


# ------------------------------------------------------------------------- streaming memory
_PEAK = """
import sys, tracemalloc
from simulator.traces.real import import_sequences
tracemalloc.start()
import_sequences(sys.argv[1], sys.argv[2])
print(tracemalloc.get_traced_memory()[1])
"""


def _write_corpus(folder: Path, n: int) -> None:
    """n files of 100 tokens, 2 layers, top-16 of 64 (6.4 kB of routing each)."""
    folder.mkdir()
    base = random_set(seed=5, n=40, L=2, E=64, k=16)
    routing = np.asarray(base.experts[:100])
    for i in range(n):
        write_layer_csv(folder / f"prompt_{i}.csv", np.roll(routing, i, axis=0), ["tok"] * 100)


def test_import_memory_does_not_grow_with_the_corpus(tmp_path):
    """The 80-file corpus's routing alone (> 0.5 MB) would double the 8-file import's peak."""
    peaks = []
    for n in (8, 80):
        _write_corpus(tmp_path / f"c{n}", n)
        out = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / f"c{n}"), str(tmp_path / f"c{n}.npz")],
                             capture_output=True, text=True, check=True, cwd=REPO)
        peaks.append(int(out.stdout))
    big = load_sequences(tmp_path / "c80.npz")
    assert big.num_sequences == 80 and big.experts.nbytes > 0.5e6 > peaks[0] / 2
    assert peaks[1] < 1.5 * peaks[0], peaks          # 10x the corpus, not 10x the memory


# ------------------------------------------------------------------------------- batching
def test_decode_batching_advances_each_slot_and_replaces_finished_sequences():
    ss = random_set(seed=2, n=6)
    tr = batch_set(ss, np.arange(6), batch_size=2, steps=20, seed=4)
    assert tr.num_steps == 20 and set(np.diff(tr.step_offsets)) == {2} and not tr.phase.any()
    order = np.random.Generator(np.random.PCG64(4)).permutation(6)
    # replay: each slot emits its sequence's next token; a free slot takes the next sequence
    queue, slots, admitted = list(order), [], 0
    for s in range(20):
        for b in range(2):
            if len(slots) <= b:
                slots.append([queue[0], 0, 0]); queue = queue[1:] + queue[:1]; admitted += 1
            if slots[b][1] == ss.lengths[slots[b][0]]:
                slots[b] = [queue[0], 0, admitted]; queue = queue[1:] + queue[:1]; admitted += 1
        for b in range(2):
            i, pos, _ = slots[b]
            assert np.array_equal(tr.step(s)[b], ss.sequence(i)[pos])
            slots[b][1] += 1
    assert tr.meta["sequences_admitted"] == admitted


def test_batching_is_deterministic_per_seed_and_prefill_holds_the_prompts():
    ss = random_set(seed=8, n=8)
    a = batch_set(ss, np.arange(8), batch_size=3, steps=6, seed=1, prefill=True)
    b = batch_set(ss, np.arange(8), batch_size=3, steps=6, seed=1, prefill=True)
    c = batch_set(ss, np.arange(8), batch_size=3, steps=6, seed=2, prefill=True)
    assert np.array_equal(a.experts, b.experts) and not np.array_equal(a.experts, c.experts)
    assert a.phase.tolist() == [1] + [0] * 6
    order = np.random.Generator(np.random.PCG64(1)).permutation(8)
    first = [i for i in order if ss.lengths[i] > 1][:3]
    prompts = [ss.sequence(i)[:ss.lengths[i] // 2] for i in first]
    assert np.array_equal(a.step(0), np.concatenate(prompts))
    assert np.array_equal(a.step(1)[0], ss.sequence(first[0])[ss.lengths[first[0]] // 2])


def test_splits_are_disjoint_and_cover_the_corpus():
    test, train = split_indices(23, "test"), split_indices(23, "train")
    assert test.tolist() == [4, 9, 14, 19]
    assert sorted(test.tolist() + train.tolist()) == list(range(23))
    assert split_indices(23, "train", max_sequences=3).tolist() == [0, 1, 2]


def _seq_scenario(path: str, **seq) -> dict:
    return {"name": "real", "model": {"preset": "published-study", "num_layers": 3, "num_experts": 8, "top_k": 2},
            "batch_sizes": [2], "trace": {"sequences": {"path": path, **seq}, "steps": 5},
            "policies": [{"name": "dedup"}]}


def test_scenario_reads_sequences_relative_to_its_folder_and_honours_the_env(tmp_path, monkeypatch):
    monkeypatch.delenv("SIMMOE_TRACE_DIR", raising=False)
    random_set(seed=1, n=15).save(tmp_path / "mine.npz")
    sc = parse_scenario(_seq_scenario("mine.npz", split="test"))
    tr = build_trace(sc, 2, 0, tmp_path)
    assert tr.num_steps == 5 and tr.meta["split"] == "test" and tr.meta["sequences_available"] == 3
    assert tr.meta["source"] == str((tmp_path / "mine.npz").resolve())
    assert np.array_equal(build_trace(sc, 2, 0, tmp_path).experts, tr.experts)       # deterministic
    assert not np.array_equal(build_trace(sc, 2, 1, tmp_path).experts, tr.experts)  # replications differ
    other = random_set(seed=9)
    other.save(tmp_path / "other.npz")
    monkeypatch.setenv("SIMMOE_TRACE_DIR", str(tmp_path / "other.npz"))
    assert build_trace(sc, 2, 0, tmp_path).meta["source"] == str((tmp_path / "other.npz").resolve())
    monkeypatch.setenv("SIMMOE_TRACE_DIR", str(tmp_path / "missing"))
    with pytest.raises(InputError, match="SIMMOE_TRACE_DIR: not found"):
        build_trace(sc, 2, 0, tmp_path)


def test_scenario_rejects_a_trace_with_more_experts_than_the_model(tmp_path, monkeypatch):
    monkeypatch.delenv("SIMMOE_TRACE_DIR", raising=False)
    random_set(E=16).save(tmp_path / "wide.npz")
    with pytest.raises(InputError, match="model published-study.* has 8 experts"):
        build_trace(parse_scenario(_seq_scenario("wide.npz")), 2, 0, tmp_path)


# ---------------------------------------------------------------------------- shared trace
shared = pytest.mark.skipif(not SHARED_TRACE.exists(), reason="shared DeepSeek-V2-Lite trace not present")


@shared
def test_shared_deepseek_trace_imports_with_the_models_shape():
    ss = open_sequences(SHARED_TRACE, "layer-csv")
    m = PRESETS["deepseek-v2-lite"]
    assert (ss.num_sequences, ss.num_tokens) == (300, 22287)
    assert (ss.num_layers, ss.num_experts, ss.top_k) == (m.num_layers, m.num_experts, m.top_k)
    assert ss.names[0] == "prompt_1" and ss.names[-1] == "prompt_300"
    first = [int(x) for x in "8 26 56 57 60 43".split()]       # prompt_1.csv line 2
    assert ss.sequence(0)[0, 0].tolist() == first


@shared
def test_real_scenario_builds_its_trace(monkeypatch):
    from simulator.scenario import load_scenario

    monkeypatch.delenv("SIMMOE_TRACE_DIR", raising=False)
    sc, base = load_scenario(REPO / "scenarios" / "deepseek_v2_lite_real.yaml")
    tr = build_trace(sc, 4, 0, base)
    assert (tr.num_steps, tr.max_step_tokens) == (sc.trace.steps, 4)
    assert tr.meta["split"] == "test" and tr.meta["sequences_available"] == 60
