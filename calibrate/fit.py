"""Fits of the measured medians into the forms the simulator's cost model reads.

Copy time: ``latency + bytes / bandwidth`` by least squares on the *relative* error (every
size counts alike, 4 KiB as much as 1 GiB), with ``scipy.optimize.curve_fit``; 95% CIs of
latency and bandwidth from its covariance and Student's t with ``n - 2`` degrees of freedom.
Where the line misses a measured median by more than ``LINE_TOLERANCE``, the profile keeps a
table of the measured points from one point before the first miss to one point after the
last, which the cost model interpolates (log-log) instead of using the line.

Expert compute: no fit of our own. The cost model interpolates the medians monotonically
(isotonic, then PCHIP over log tokens); the fit errors are that interpolation against each
measured point, and a leave-one-out error (each point predicted from the others), which says
whether the token grid is dense enough.

Every point's error is kept in the profile's ``fit`` section.
"""
from __future__ import annotations

import numpy as np
from scipy import stats
from scipy.optimize import curve_fit

from simulator.profile import CopyCurve, compute_table_ms, copy_ms_from_curve

LINE_TOLERANCE = 0.05


def _line(x_gb, latency_ms, ms_per_gb):
    return latency_ms + ms_per_gb * x_gb


def fit_copy_line(nbytes: list[int], ms: list[float]) -> dict:
    """Latency (us) and bandwidth (GB/s, 1e9 bytes) of ``ms = latency + bytes / bandwidth``, with 95% CIs."""
    x = np.asarray(nbytes, dtype=float) / 1e9
    y = np.asarray(ms, dtype=float)
    slope0 = max((y[-1] - y[0]) / (x[-1] - x[0]), 1e-6) if len(x) > 1 and x[-1] > x[0] else 1.0
    (lat, slope), cov = curve_fit(_line, x, y, p0=[max(y.min(), 1e-6), slope0], sigma=y,
                                  absolute_sigma=False, bounds=([0.0, 1e-9], [np.inf, np.inf]))
    out = {"latency_us": float(lat * 1e3), "bandwidth_GBps": float(1e3 / slope)}
    if len(x) > 2 and np.all(np.isfinite(cov)):
        half = stats.t.ppf(0.975, len(x) - 2) * np.sqrt(np.diag(cov))
        out["latency_ci95_us"] = [float(max(0.0, lat - half[0]) * 1e3), float((lat + half[0]) * 1e3)]
        if slope - half[1] > 0:
            out["bandwidth_ci95_GBps"] = [float(1e3 / (slope + half[1])), float(1e3 / (slope - half[1]))]
    return out


def copy_curve(points: list[tuple[int, float]], tolerance: float = LINE_TOLERANCE) -> tuple[dict, dict]:
    """A profile copy curve from measured ``(bytes, median ms)`` points, and its fit record."""
    nbytes = [int(b) for b, _ in points]
    ms = [float(m) for _, m in points]
    curve = fit_copy_line(nbytes, ms)
    line_ms = [curve["latency_us"] * 1e-3 + b / (curve["bandwidth_GBps"] * 1e9) * 1e3 for b in nbytes]
    line_err = [(p - m) / m for p, m in zip(line_ms, ms)]
    misses = [i for i, e in enumerate(line_err) if abs(e) > tolerance]
    lo, hi = (max(0, misses[0] - 1), min(len(points) - 1, misses[-1] + 1)) if misses else (0, -1)
    curve["table"] = [[nbytes[i], ms[i]] for i in range(lo, hi + 1)]
    frozen = CopyCurve(**curve)
    rows = [
        {"bytes": b, "measured_ms": m, "line_ms": lm, "line_rel_error": le, "in_table": lo <= i <= hi,
         "model_rel_error": (copy_ms_from_curve(frozen, b) - m) / m}
        for i, (b, m, lm, le) in enumerate(zip(nbytes, ms, line_ms, line_err))
    ]
    record = {"model": "latency + bytes / bandwidth, least squares on relative error; "
                       "table where the line misses by more than the tolerance",
              "tolerance": tolerance, "points": rows}
    return curve, record


def compute_fit(points: list[tuple[int, float]]) -> list[dict]:
    """Per-point error of the cost model's monotone interpolation of ``(tokens, median ms)``."""
    top = points[-1][0]
    model = compute_table_ms(points, top)
    rows = []
    for i, (t, m) in enumerate(points):
        others = points[:i] + points[i + 1:]
        loo = compute_table_ms(others, top)[t] if others else None
        rows.append({"tokens": t, "measured_ms": m, "model_ms": float(model[t]),
                     "rel_error": float((model[t] - m) / m),
                     "loo_rel_error": None if loo is None else float((loo - m) / m)})
    return rows


def fit_sleep_cycles(cycles: list[int], ms: list[float]) -> dict:
    """``torch.cuda._sleep`` rate: cycles per ms from a linear regression of ms on cycles."""
    reg = stats.linregress(cycles, ms)
    return {"cycles_per_ms": float(1.0 / reg.slope), "intercept_ms": float(reg.intercept),
            "r": float(reg.rvalue), "points": [[int(c), float(m)] for c, m in zip(cycles, ms)]}
