"""The host-state gate (calibrate/measurements/host_state.py): work timed in the host's fast
state, on a scripted probe (no real host needed)."""
import pytest

from calibrate.measurements import host_state as hs


def scripted(values):
    it = iter(values)
    return lambda: next(it)


def test_wait_returns_at_once_in_the_fast_state_and_waits_out_the_slow_one():
    g = hs.HostGate(probe=scripted([1.0, 1.7, 1.7, 1.1]))
    assert g.wait() is True and g.waits == 0          # 1.0: the best so far, fast
    assert g.wait() is True and g.waits == 1          # 1.7, 1.7 slow, then 1.1 <= 1.25 x 1.0
    assert g.timeouts == 0


def test_wait_gives_up_after_max_wait():
    g = hs.HostGate(max_wait_s=0.0, probe=scripted([1.0, 2.0, 2.0, 2.0]))
    g.wait()
    assert g.wait() is False and g.timeouts == 1


def test_gated_runs_again_when_the_host_ended_slow():
    # wait: 1.0 fast; check: 1.8 slow -> again; wait 1.0; check 1.0 fast -> done
    g = hs.enable(probe=scripted([1.0, 1.8, 1.0, 1.0]))
    try:
        runs = []
        assert hs.gated(lambda: runs.append(1) or len(runs)) == 2
        assert g.slow_after == 1 and g.checks == 2
    finally:
        hs.enable(False)
    assert hs.gate() is None and hs.gated(lambda: 7) == 7


def test_gated_keeps_the_last_run_after_its_retries():
    hs.enable(probe=scripted([1.0] + [3.0] * 20), max_wait_s=0.0)
    try:
        runs = []
        hs.gated(lambda: runs.append(1), retries=2)
        assert len(runs) == 3
    finally:
        hs.enable(False)


@pytest.mark.parametrize("choice, device, on", [(None, "cuda", False), (None, "cpu", False), ("any", "cuda", False),
                                                ("fast", "cpu", True)])
def test_the_gate_is_on_only_when_asked(choice, device, on):
    try:
        assert (hs.enable_for(choice, device) is not None) is on
    finally:
        hs.enable(False)


def test_the_python_probe_measures_something():
    assert 0 < hs.python_probe(200) < 1e4
