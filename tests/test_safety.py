"""Outputs stay where they belong (issue 12, item 0).

Names are names, never paths; every write is atomic, refuses a target that is not a regular
file and cleans its own stale partials; a full disk is one line and exit 2 with nothing
half-written; ``--timeline`` is all files or none; Ray addresses fail fast; ``-j`` is capped.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import simulator.atomic as atomic
from calibrate.profile_writer import write_or_keep
from simmoe.cli import main
from simulator.errors import InputError
from simulator.names import RESULTS, name_problem, results_dir
from simulator.sweep import cap_workers, check_ray_address, sweep
from simulator.traces.real import SequenceWriter

from conftest import scenario_dict

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
TINY = scenario_dict(name="tiny", replications=1, batch_sizes=[1],
                     model={"preset": "published-study", "num_layers": 2, "num_experts": 8},
                     trace={"generator": "uniform", "steps": 3})


def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def one_line_error(code, stdout, stderr, *expected):
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    for e in expected:
        assert e in lines[0], lines[0]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def write_yaml(path: Path, doc) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def dead_pid() -> int:
    """The pid of a process that has exited."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """An empty working folder two levels down: ``../..`` is still inside tmp_path."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    return work


# ------------------------------------------------------------------------------- names
@pytest.mark.parametrize("name", ["../../victim", "..", ".", "a/b", "a\\b", "C:evil", "a\x00b", "tab\there", "",
                                  " padded", "x" * 101])
def test_a_path_as_a_scenario_name_is_refused_and_writes_nothing(cwd, tmp_path, name):
    p = write_yaml(cwd / "s.yaml", {**TINY, "name": name})
    before = tree(tmp_path)
    for cmd in (["run", p, "-q"], ["validate", p, "--device", "cpu", "-q"]):
        one_line_error(*invoke(*cmd), f"{p}: name:")
    assert tree(tmp_path) == before


def test_an_absolute_name_writes_nothing_there(cwd, tmp_path):
    victim = tmp_path / "victim"
    p = write_yaml(cwd / "s.yaml", {**TINY, "name": str(victim)})
    one_line_error(*invoke("run", p, "-q"), "name:", "not a path")
    assert not victim.exists() and not (cwd / "results").exists()


@pytest.mark.parametrize("name", ["..", "../up", "/abs", ""])
def test_a_path_as_a_sweep_name_is_refused(cwd, tmp_path, name):
    write_yaml(cwd / "s.yaml", TINY)
    sw = write_yaml(cwd / "sw.yaml", {"name": name, "base": "s.yaml", "grid": {"seed": [1, 2]}})
    before = tree(tmp_path)
    one_line_error(*invoke("sweep", sw, "-q", "-j", "1"), f"{sw}: name:")
    assert tree(tmp_path) == before


def test_plain_names_still_run_under_results(cwd):
    p = write_yaml(cwd / "s.yaml", {**TINY, "name": "mixtral 8x7b.v2+lru"})
    code, _, stderr = invoke("run", p, "-q")
    assert code == 0, stderr
    assert (cwd / "results" / "mixtral 8x7b.v2+lru" / "summary.json").is_file()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12))
def test_an_accepted_name_is_one_folder_inside_results(name):
    if name_problem(name) is None:
        folder = results_dir(name)
        assert folder.parent == RESULTS and folder.name == name
        assert os.path.normpath(folder).startswith(str(RESULTS) + os.sep)
    else:
        with pytest.raises(ValueError):
            results_dir(name)


# ---------------------------------------------------------------------- atomic writes
def test_a_fifo_target_is_refused_and_left_alone(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    one_line_error(*invoke("trace", "gen", "-s", "2", "-b", "1", "-o", fifo), f"{fifo}: --out:", "a FIFO")
    with pytest.raises(InputError, match="a FIFO"):    # the writer of `trace import` and `trace record`
        SequenceWriter(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and tree(tmp_path) == {"fifo"}


def test_results_into_a_file_are_one_line(tmp_path):
    p = write_yaml(tmp_path / "s.yaml", TINY)
    (tmp_path / "out").write_text("mine")
    one_line_error(*invoke("run", p, "-o", tmp_path / "out", "-q"), "--out", "is a file")
    with pytest.raises(InputError, match="out: --out: exists and is not a folder"), \
            atomic.atomic_files(tmp_path / "out"):
        pass
    assert (tmp_path / "out").read_text() == "mine" and tree(tmp_path) == {"s.yaml", "out"}


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mknod needs root")
def test_a_device_node_is_not_replaced_even_as_root(tmp_path):
    dev = tmp_path / "full"                      # a private copy of /dev/full (char 1, 7)
    os.mknod(dev, 0o600 | stat.S_IFCHR, os.makedev(1, 7))
    for args in (["trace", "gen", "-s", "2", "-b", "1", "-o", dev],
                 ["trace", "stats", tmp_path / "t.npz", "--json", dev]):
        if args[1] == "stats" and not (tmp_path / "t.npz").exists():
            assert invoke("trace", "gen", "-s", "2", "-b", "2", "-o", tmp_path / "t.npz")[0] == 0
        one_line_error(*invoke(*args), f"{dev}:", "a character device")
        assert stat.S_ISCHR(os.stat(dev).st_mode)


def test_results_are_all_or_none_when_one_target_is_a_folder(tmp_path):
    p = write_yaml(tmp_path / "s.yaml", TINY)
    out = tmp_path / "out"
    (out / "summary.json").mkdir(parents=True)
    one_line_error(*invoke("run", p, "-o", out, "-q"), "summary.json: --out:", "a folder")
    assert tree(out) == {"summary.json"}            # nothing else moved in, no partial left


def test_stale_partials_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "x.json"
    dead = tmp_path / f".x.json.{dead_pid()}.0badc0de.partial"
    dead_dir = tmp_path / f".x.json.{dead_pid()}.0badc0df.partial"
    live = tmp_path / f".x.json.{os.getppid()}.0badc0de.partial"
    other = tmp_path / f".y.json.{dead_pid()}.0badc0de.partial"
    for p in (dead, live, other):
        p.write_text("half")
    dead_dir.mkdir()
    atomic.write_text(target, "{}")
    assert target.read_text() == "{}"
    assert not dead.exists() and not dead_dir.exists() and live.exists() and other.exists()
    assert atomic.clean_stale(tmp_path) == [other]


def test_partials_are_named_recognisably():
    p = atomic.partial_path(Path("d") / "steps.parquet")
    assert p.parent == Path("d") and p.name.startswith(f".steps.parquet.{os.getpid()}.")
    assert p.name.endswith(".partial")


def test_a_failing_writer_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")

    def boom(p):
        p.write_text("half")
        raise ENOSPC

    with pytest.raises(InputError, match="t.txt: --json: cannot write: No space left on device"):
        atomic.write_with(target, boom, "--json")
    assert target.read_text() == "old" and tree(tmp_path) == {"t.txt"}


# ----------------------------------------------------------------------- a full disk
def full_disk_at_flush(monkeypatch):
    """Every atomic write fails as a full disk does: when the data reaches the disk."""
    def fsync(path):
        raise ENOSPC
    monkeypatch.setattr(atomic, "_fsync", fsync)


def test_run_on_a_full_disk(tmp_path, monkeypatch):
    p = write_yaml(tmp_path / "s.yaml", TINY)
    out = tmp_path / "out"

    def to_parquet(self, *a, **k):
        raise ENOSPC
    monkeypatch.setattr(pd.DataFrame, "to_parquet", to_parquet)
    one_line_error(*invoke("run", p, "-o", out, "-q"), f"{out}: --out: cannot write: No space left on device")
    assert tree(out) == set()


def test_sweep_on_a_full_disk(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    write_yaml(tmp_path / "s.yaml", TINY)
    sw = write_yaml(tmp_path / "sw.yaml", {"name": "full", "base": "s.yaml", "grid": {"seed": [1, 2]}})
    out = tmp_path / "out"

    def write_table(*a, **k):
        raise ENOSPC
    monkeypatch.setattr(pq, "write_table", write_table)
    one_line_error(*invoke("sweep", sw, "-o", out, "-q", "-j", "1"), "part-", "No space left on device")
    assert tree(out) == {"parts", "sweep.json"}


def test_report_and_trace_stats_json_on_a_full_disk(tmp_path, monkeypatch):
    p = write_yaml(tmp_path / "s.yaml", TINY)
    assert invoke("run", p, "-o", tmp_path / "run", "-q")[0] == 0
    assert invoke("trace", "gen", "-s", "3", "-b", "2", "-o", tmp_path / "t.npz")[0] == 0
    before = tree(tmp_path)
    full_disk_at_flush(monkeypatch)
    one_line_error(*invoke("report", tmp_path / "run"), "No space left on device")
    one_line_error(*invoke("trace", "stats", tmp_path / "t.npz", "-b", "1,2", "--json", tmp_path / "st.json"),
                   "st.json: --json: cannot write: No space left on device")
    assert tree(tmp_path) - before <= {"run/plots"}   # no partial, no truncated file


def test_calibration_keeps_its_measurements_when_the_profile_cannot_be_written(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    target = tmp_path / "profiles" / "gpu.json"
    real = atomic.write_with

    def write_with(t, write, field="--out"):
        if Path(t) == target:
            raise atomic.cannot_write(t, field, ENOSPC)
        return real(t, write, field)
    monkeypatch.setattr(atomic, "write_with", write_with)
    doc = {"name": "my/gpu", "copy": {"h2d": 1}}
    with pytest.raises(InputError) as e:
        write_or_keep(doc, target)
    kept = list((tmp_path / "tmp").iterdir())
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == doc and kept[0].name.startswith("simmoe-profile-my_gpu-")
    assert "No space left on device" in str(e.value) and f"kept in {kept[0]}" in str(e.value)
    assert not target.exists()


# -------------------------------------------------------------------------- timeline
def test_timeline_is_built_before_any_result_is_written(tmp_path, monkeypatch):
    import simulator.timeline as tl

    p = write_yaml(tmp_path / "s.yaml", TINY)
    out = tmp_path / "out"

    def events(*a, **k):
        raise InputError("timeline", "--timeline", "cannot build")
    monkeypatch.setattr(tl, "timeline_events", events)
    one_line_error(*invoke("run", p, "-o", out, "-q", "--timeline"), "cannot build")
    assert not out.exists() or tree(out) == set()
    monkeypatch.undo()
    code, _, stderr = invoke("run", p, "-o", out, "-q", "--timeline")
    assert code == 0, stderr
    assert tree(out) == {"summary.json", "summary.csv", "steps.parquet", "scenario.yaml", "profile.json", "timeline.json"}
    assert json.loads((out / "timeline.json").read_text())["traceEvents"]


# ---------------------------------------------------------------------------- workers
def test_workers_are_capped_by_points_and_cores():
    assert cap_workers(4, 10, 8) == (4, None)
    assert cap_workers(64, 2, 8) == (2, "note: 64 workers asked for, 2 started (2 points to run)")
    assert cap_workers(100_000, 50, 2)[0] == 2 and "2 cores" in cap_workers(100_000, 50, 2)[1]
    assert cap_workers(100_000, 1, 2) == (1, "note: 100000 workers asked for, 1 started (1 point to run)")
    assert cap_workers(9, 2, 2) == (2, "note: 9 workers asked for, 2 started (2 points to run and 2 cores)")


@pytest.mark.parametrize("j", ["0", "-3", "many"])
def test_bad_worker_counts_are_one_line(tmp_path, j):
    sw = write_yaml(tmp_path / "sw.yaml", {"name": "w", "base": TINY})
    one_line_error(*invoke("sweep", sw, "-j", j, "-q", "-o", tmp_path / "o"), "--workers")
    assert not (tmp_path / "o").exists()


def test_an_absurd_worker_count_forks_one_per_point(tmp_path, monkeypatch):
    import concurrent.futures as cf

    import simulator.sweep as sweep_mod

    started = []

    class Pool(cf.ProcessPoolExecutor):
        def __init__(self, n, **kw):
            started.append(n)
            super().__init__(n, **kw)
    monkeypatch.setattr(sweep_mod, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(sweep_mod, "cores", lambda: 8)
    notes = []
    df = sweep({"name": "w", "base": TINY, "grid": {"seed": [1, 2]}}, workers=100_000, out=tmp_path / "o",
               notice=notes.append)
    assert started == [2] and df.attrs["sweep"]["workers"] == 2 and len(df) == 2
    assert notes == ["note: 100000 workers asked for, 2 started (2 points to run)"]


# -------------------------------------------------------------------------------- ray
@pytest.mark.parametrize("address", ["garbage", "host:", "ray://", "h:99999", "a b:1", "http://x:1/y"])
def test_a_garbage_ray_address_is_one_line(tmp_path, address):
    sw = write_yaml(tmp_path / "sw.yaml", {"name": "r", "base": TINY})
    one_line_error(*invoke("sweep", sw, "--backend", "ray", "--address", address, "-q", "-o", tmp_path / "o"),
                   "--address", "is not a Ray address")
    assert not (tmp_path / "o").exists()


def test_an_unreachable_ray_address_fails_within_seconds(monkeypatch):
    with socket.socket() as s:          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(InputError, match="--address: cannot reach the Ray cluster at 127.0.0.1:.* within 5 s"):
        check_ray_address(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5

    def hang(addr, timeout):
        assert timeout == 5.0
        raise socket.timeout("timed out")
    monkeypatch.setattr(socket, "create_connection", hang)
    with pytest.raises(InputError, match="within 5 s: timed out"):
        check_ray_address("ray://head.example:10001")


class FakeRay(types.ModuleType):
    """Records how simmoe starts Ray; runs nothing."""

    def __init__(self, fail: Exception | None = None):
        super().__init__("ray")
        self.calls, self.fail, self.up = [], fail, False

    def is_initialized(self):
        return self.up

    def init(self, **kw):
        env = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_gcs_server_port_wait_time_s",
                                               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
        self.calls.append((kw, env))
        if self.fail:
            raise self.fail
        self.up = True

    def shutdown(self):
        self.up = False

    def cluster_resources(self):
        raise RuntimeError("stop here")


def test_a_local_ray_has_no_dashboard_and_token_auth(monkeypatch, tmp_path):
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(RuntimeError, match="stop here"):
        sweep({"name": "r", "base": TINY}, backend="ray", workers=1, out=tmp_path / "o")
    (kw, env), = fake.calls
    assert kw["include_dashboard"] is False and "address" not in kw
    assert env["RAY_AUTH_MODE"] is None          # unset: Ray turns token authentication on
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and not fake.up           # restored, shut down
    # bound to loopback: the node's address 127.0.0.1, kept so by Ray's cluster setting off
    assert kw["_node_ip_address"] == "127.0.0.1" and env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ


def test_a_ray_cluster_that_does_not_answer_is_one_line(monkeypatch, tmp_path):
    fake = FakeRay(fail=ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379\nmore"))
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(socket, "create_connection", lambda addr, timeout: socket.socket())
    sw = write_yaml(tmp_path / "sw.yaml", {"name": "r", "base": TINY})
    one_line_error(*invoke("sweep", sw, "--backend", "ray", "--address", "10.0.0.1:6379", "-q", "-o", tmp_path / "o"),
                   "--address: cannot reach Ray: Failed to connect to Ray cluster at 10.0.0.1:6379")
    (kw, env), = fake.calls
    assert kw["address"] == "10.0.0.1:6379" and env["RAY_gcs_server_port_wait_time_s"] == "5"


def listening(pids: set[int]) -> list[str]:
    """``address:port`` of every TCP socket that processes ``pids`` listen on (Linux /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:            # LISTEN
                addr, port = cols[1].split(":")
                raw = bytes.fromhex(addr)
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                out.append(f"{socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words)}:{int(port, 16)}")
    return out


def descendants(pid: int) -> set[int]:
    kids = {int(p) for t in os.listdir(f"/proc/{pid}/task")
            for p in open(f"/proc/{pid}/task/{t}/children").read().split()}
    return kids.union(*(descendants(k) for k in kids)) if kids else set()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux /proc")
def test_a_local_ray_listens_on_loopback_only():
    """GCS, raylet, workers and agents of the Ray simmoe starts listen on 127.0.0.1 alone."""
    import contextlib

    from simulator.sweep import _ray_init

    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    with contextlib.ExitStack() as stack:
        _ray_init(ray, None, 1, stack)
        assert ray.get(ray.remote(lambda: 1).remote()) == 1
        addrs = listening(descendants(os.getpid()))
        assert len(addrs) >= 3, addrs                    # GCS, raylet (node manager, object manager), worker
        hosts = {a.rsplit(":", 1)[0] for a in addrs}
        assert hosts <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, addrs
    assert not ray.is_initialized() and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ


@pytest.mark.slow
def test_a_real_local_ray_started_by_simmoe_runs_the_sweep(tmp_path):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    spec = {"name": "r", "base": TINY, "grid": {"seed": [1, 2]}}
    local = sweep(spec, workers=1, out=tmp_path / "local")
    on_ray = sweep(spec, backend="ray", workers=2, out=tmp_path / "ray")
    pd.testing.assert_frame_equal(local, on_ray, check_exact=True)
    assert not ray.is_initialized()
