"""The host's speed state, and a gate that times work only while the host is in its fast one.

On the lent H200 (a Firecracker microVM, 16 vCPUs) the host runs at two speeds, switching
every few hundred milliseconds to seconds whichever core a thread is pinned to: a pure-Python
loop takes 0.085 or 0.145 µs per iteration (1.7x), and the kernel-dispatch probe of
:mod:`calibrate.measurements.host_speed` 7.4 or 10 µs per op, in step (docs/validation.md,
"The host's two speeds"). An eager transformers decode step is host-bound, so a step, or a
calibration trial, that ran in the slow state is 1.3-1.7x longer for reasons that are not the
model's. Calibration and validation of the real-model path therefore time work in the fast
state only with ``--host-state fast``: before each trial or live step the
gate waits (at most ``max_wait_s``) until a short Python probe is within ``FAST_RATIO`` of the
fastest probe seen, and after it probes again; a trial that ended slow is run again (at most
``RETRIES`` times), a live step that ended slow is kept but marked (``host_fast``) and left out
of the fast-state median.

Not the default (`--host-state any`): see :func:`enable_for`. The gate is one object per process (:func:`enable`, :func:`gate`): the Timer of
:mod:`calibrate.measurements.timing` and the model executor consult it, so the measurements
and the executor need no new arguments.
"""
from __future__ import annotations

import time

PROBE_ITERS = 2000     # ~0.2 ms (fast state) to ~0.3 ms (slow) of pure-Python work
FAST_RATIO = 1.25      # the two states are ~1.7x apart; within 1.25x of the best is the fast one
RETRIES = 3            # a calibration trial that ended in the slow state is run again at most this often
MAX_WAIT_S = 2.0       # longest wait for the fast state before a trial (then it runs anyway)


def python_probe(iters: int = PROBE_ITERS) -> float:
    """Microseconds per iteration of a fixed pure-Python loop (the interpreter's speed now)."""
    t0 = time.perf_counter()
    x = 0
    for i in range(iters):
        x += i
    return (time.perf_counter() - t0) * 1e6 / iters


class HostGate:
    """Waits for, and checks, the host's fast state; counts what it did."""

    def __init__(self, max_wait_s: float = MAX_WAIT_S, ratio: float = FAST_RATIO, probe=python_probe):
        self.max_wait_s, self.ratio, self._probe = max_wait_s, ratio, probe
        self.best = float("inf")
        self.waits = 0            # gate passes that had to wait
        self.waited_s = 0.0
        self.timeouts = 0         # waits that gave up (the work ran in the slow state)
        self.checks = 0
        self.slow_after = 0       # checks after the work that found the slow state

    def fast(self, value: float) -> bool:
        self.best = min(self.best, value)
        return value <= self.best * self.ratio

    def wait(self) -> bool:
        """Return once the host is in its fast state (True) or after ``max_wait_s`` (False)."""
        t0 = time.perf_counter()
        if self.fast(self._probe()):
            return True
        self.waits += 1
        while True:
            if self.fast(self._probe()):
                self.waited_s += time.perf_counter() - t0
                return True
            if time.perf_counter() - t0 > self.max_wait_s:
                self.waited_s += time.perf_counter() - t0
                self.timeouts += 1
                return False

    def check(self) -> bool:
        """Is the host in its fast state now (after the work)?"""
        self.checks += 1
        ok = self.fast(self._probe())
        self.slow_after += not ok
        return ok

    def summary(self) -> dict:
        return {"best_probe_us": self.best, "ratio": self.ratio, "waits": self.waits,
                "waited_s": round(self.waited_s, 3), "timeouts": self.timeouts, "checks": self.checks,
                "slow_after": self.slow_after}


_GATE: HostGate | None = None


def enable(on: bool = True, **kw) -> HostGate | None:
    """Turn the process's gate on (a fresh one) or off; returns it."""
    global _GATE
    _GATE = HostGate(**kw) if on else None
    return _GATE


def gate() -> HostGate | None:
    """The process's gate, or None when work is timed whatever the host's state."""
    return _GATE


def gated(run, retries: int = RETRIES):
    """``run()`` in the fast state: wait, run, check; run again (at most ``retries`` times) if
    the host ended slow. Without a gate, just ``run()``. Returns ``run``'s last result."""
    g = _GATE
    if g is None:
        return run()
    for _ in range(retries + 1):
        g.wait()
        out = run()
        if g.check():
            return out
    return out


def enable_for(choice: str | None, device: str) -> HostGate | None:
    """``--host-state``: ``fast`` turns the gate on, ``any`` (the default) off. Not the
    default: on the H200 host the gated calibration met its fastest moments while the host
    stayed 1.7x slower for the minutes of the validation after it (docs/validation.md), so
    the resident row beside each batch (the paired error) is the better host reference."""
    return enable((choice or "any") == "fast")
