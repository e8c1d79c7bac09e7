"""The live timeline's copy analysis on hand-made profiler events (no GPU, no torch)."""
from __future__ import annotations

from calibrate.validation.live_timeline import copy_summary, live_events, overtaken_uploads

MB = 1 << 20


def gpu_copy(ts, dur, nbytes, stream, corr):
    return {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": ts, "dur": dur,
            "tid": stream, "args": {"stream": stream, "bytes": nbytes, "correlation": corr}}


def launch(ts, corr):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": ts, "dur": 3.0,
            "args": {"correlation": corr}}


def step(upload_start: float) -> list[dict]:
    """Two expert copies of layer l (stream 9, launched at 1000 and 1001), the index upload on
    stream 7 launched at 1002 (behind the layer's wait), then the next layer's prefetch copies
    (launched at 1003, 1004) that ran 1500-1700 and 1700-1900; the upload ran at
    ``upload_start``."""
    ev = [launch(1000, 1), launch(1001, 2), launch(1002, 3), launch(1003, 4), launch(1004, 5),
          gpu_copy(1010, 245, 12 * MB, 9, 1), gpu_copy(1255, 245, 12 * MB, 9, 2),
          gpu_copy(upload_start, 2, 4096, 7, 3),
          gpu_copy(1500, 200, 12 * MB, 9, 4), gpu_copy(1700, 200, 12 * MB, 9, 5)]
    return live_events(ev, cuda=True)


def test_live_events_keep_the_launch_time_on_the_step_clock():
    live = step(1501)
    first = min(e["ts"] for e in live)
    assert first == 0.0
    up = next(e for e in live if e["args"]["bytes"] == 4096)
    assert up["args"]["launch_us"] == 1002 - 1010 and up["ts"] == 1501 - 1010


def test_an_upload_run_after_copies_issued_later_is_counted_with_the_time_it_was_held():
    held = overtaken_uploads(step(1900))   # after both prefetch copies
    assert held == {"uploads": 1, "overtaken": 1, "copies_ahead": 2, "held_ms": (1900 - 1500) / 1e3}
    one = overtaken_uploads(step(1700))     # after the first: one copy ahead
    assert one["overtaken"] == 1 and one["copies_ahead"] == 1 and abs(one["held_ms"] - 0.2) < 1e-9


def test_an_upload_in_issue_order_is_not_overtaken():
    ok = overtaken_uploads(step(1500 - 2))  # right after its own layer's copies, before the prefetch
    assert ok == {"uploads": 1, "overtaken": 0, "copies_ahead": 0, "held_ms": 0.0}
    s = copy_summary(step(1498), [("copy", 0.0, 0.25), ("copy", 0.25, 0.5)], step_ms=1.0)
    assert s["live"]["copies"] == 4 and s["overtaken_uploads"]["overtaken"] == 0
    assert s["projected"]["copies"] == 2


def test_events_without_launch_times_are_left_out_not_guessed():
    live = [e for e in step(1900)]
    for e in live:
        e["args"].pop("launch_us", None)
    assert overtaken_uploads(live)["uploads"] == 0
