"""The highest arrival rate that meets the SLO.

A rate passes when the share of requests meeting the SLO (TTFT and TPOT within
``workload.slo``) is at least ``slo.attainment``, over all replications' requests. The search
runs the scenario at every rate of a grid (``workload.rates`` or given), takes per policy the
highest passing rate below the first failing one, then bisects between the two for
``bisect`` more runs (this assumes attainment falls as the rate grows; the grid's rows show
whether it did: ``monotone``). Every run is a plain serving run with only
``workload.arrivals.rate`` changed, so the same seeds give the same answer.
"""
from __future__ import annotations

from typing import Callable

from ..errors import InputError
from .runner import serve_scenario


def with_rate(sc, rate: float):
    w = sc.workload
    return sc.model_copy(update={"workload": w.model_copy(update={"arrivals": w.arrivals.model_copy(update={"rate": rate})})})


def rate_rows(sc, rate: float, profile, base_dir, progress=None) -> list[dict]:
    res = serve_scenario(with_rate(sc, rate), profile=profile, base_dir=base_dir, progress=progress)
    rows = []
    for r in res.summary:
        rows.append({"policy": r["policy"], "max_batch": r["max_batch"], "rate": rate,
                     "slo_attainment": r["slo_attainment"], "passes": r["meets_slo"],
                     "tokens_per_s": r["tokens_per_s"], "requests_per_s": r["requests_per_s"],
                     "goodput_rps": r["goodput_rps"],
                     **{f"{c}_{q}": r[c][q] for c in ("ttft_ms", "tpot_ms", "e2e_ms") for q in ("mean", "p90", "p99")}})
    return rows


def search_rate(sc, rates: list[float] | None = None, bisect: int = 4, profile=None, base_dir=None,
                progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Grid then bisection per (policy, max batch): ``{"rows": [...], "best": [...]}``."""
    if sc.workload.arrivals.kind == "file":
        raise InputError(f"scenario {sc.name}", "workload.arrivals.kind",
                         "a rate search needs generated arrivals (poisson, burst or gamma), not a file")
    rates = sorted(set(rates or sc.workload.rates or []))
    if not rates:
        raise InputError(f"scenario {sc.name}", "workload.rates", "give the arrival rates to search (or --rates)")
    total = len(rates) + bisect * len(sc.policies) * len(sc.batch_sizes)
    n_done = len(rates)
    rows: list[dict] = []
    for i, rate in enumerate(rates):
        if progress:
            progress(i, total, f"rate {rate:g}/s")
        rows.extend(rate_rows(sc, rate, profile, base_dir))
    best = []
    keys = sorted({(r["policy"], r["max_batch"]) for r in rows}, key=lambda k: ([p.name for p in sc.policies].index(k[0]), k[1]))
    for pol, b in keys:
        grid = sorted((r for r in rows if r["policy"] == pol and r["max_batch"] == b), key=lambda r: r["rate"])
        att = [r["slo_attainment"] for r in grid]
        lo = hi = None
        for r in grid:
            if r["passes"]:
                lo = r["rate"]
            else:
                hi = r["rate"]
                break
        one = sc.model_copy(update={"policies": [p for p in sc.policies if p.name == pol], "batch_sizes": [b]})
        tried = []
        if lo is not None and hi is not None:
            for j in range(bisect):
                mid = (lo + hi) / 2
                if progress:
                    progress(n_done, total, f"{pol} B={b}: bisect {lo:g}..{hi:g}/s")
                n_done += 1
                row = rate_rows(one, mid, profile, base_dir)[0]
                row["bisection"] = True
                tried.append(row)
                if row["passes"]:
                    lo = mid
                else:
                    hi = mid
        rows.extend(tried)
        best.append({"policy": pol, "max_batch": b, "max_rate": lo, "first_failing_rate": hi,
                     "method": f"grid of {len(grid)} rate(s), then {len(tried)} bisection step(s)",
                     "monotone": all(a >= b2 for a, b2 in zip(att, att[1:]))})
    if progress:
        progress(total, total, "done")
    return {"slo": sc.workload.slo.model_dump(mode="json"), "rows": rows, "best": best}
