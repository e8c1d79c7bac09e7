"""Statistics of timing samples: per-point summaries and two-sample comparisons.

``summary`` keeps, for one measured point, the number of trials, mean, standard deviation
(ddof 1), median, min, max and the 95% Student-t interval of the mean. ``compare`` tests two
samples with Welch's t-test (unequal variances, ``scipy.stats.ttest_ind(equal_var=False)``)
and gives Cohen's d with the average-variance denominator, ``(mean_b - mean_a) /
sqrt((s_a^2 + s_b^2) / 2)``, which suits unequal variances as Welch's test does.
Non-finite results (for example two constant samples) are stored as None.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from simulator.metrics import ci95_half_width


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def summary(values: list[float]) -> dict:
    """Trials, mean, std, median, min, max and 95% CI of the mean of ``values`` (ms)."""
    v = np.asarray(values, dtype=float)
    mean, half = float(v.mean()), ci95_half_width(v)
    return {
        "trials": int(len(v)), "mean": mean, "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "ci95": [mean - half, mean + half],
    }


def cohens_d(a: list[float], b: list[float]) -> float | None:
    """Effect size of ``b`` over ``a``: mean difference over the root of the average variance."""
    va, vb = np.var(a, ddof=1), np.var(b, ddof=1)
    pooled = math.sqrt((va + vb) / 2)
    if pooled == 0:
        return None
    return _finite((np.mean(b) - np.mean(a)) / pooled)


def compare(a: list[float], b: list[float]) -> dict:
    """Welch's t-test of ``a`` against ``b`` and Cohen's d of ``b`` over ``a``."""
    t, p = sps.ttest_ind(a, b, equal_var=False)
    return {"welch_t": _finite(t), "p_value": _finite(p), "cohens_d": cohens_d(a, b)}
