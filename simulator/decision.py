"""The answer to a run: per batch size, which policy to use and how much faster it is.

:func:`decide` reads the summary rows (:mod:`simulator.metrics`) and returns, per batch size:

- ``best``: the policy with the lowest mean step latency;
- ``baseline``: the policy the speed-up is relative to: the scenario's ``baseline`` key, or by
  default the fastest policy without a cache (``cache.kind: none``); the scenario's first policy
  when every policy has a cache (``baseline_rule`` says which rule chose it);
- ``speedup``: baseline mean step latency / best mean step latency;
- ``runner_up`` and ``distinguishable``: whether the best's 95% CI of the mean step latency lies
  wholly below the runner-up's (``False``: "not distinguishable" at that confidence);
- ``wasted_prefetch_bytes`` of the best policy.

``warnings`` lists thrashing caches: a global cache with fewer expert slots than one step's
working set (the distinct experts a step requests, over all layers; per layer for a per-layer
cache) evicts each expert before the next step asks for it again.

Every summary row also gets ``baseline`` and ``speedup_vs_baseline``.
"""
from __future__ import annotations

from .units import fmt_bytes


def baseline_of(rows: list[dict], sc) -> tuple[str, str]:
    """The baseline policy of one batch size's rows and the rule that chose it."""
    ran = [r["policy"] for r in rows]
    if sc.baseline is not None and sc.baseline in ran:
        return sc.baseline, "scenario key 'baseline'"
    why = f" (the baseline {sc.baseline} was skipped)" if sc.baseline is not None else ""
    no_cache = {p.name for p in sc.policies if p.cache.kind == "none"}
    candidates = [r for r in rows if r["policy"] in no_cache]
    if candidates:
        return min(candidates, key=_mean)["policy"], "fastest policy without a cache" + why
    first = next(p.name for p in sc.policies if p.name in ran)
    return first, "first policy (every policy has a cache)" + why


def _mean(r: dict) -> float:
    return r["step_latency_ms"]["mean"]


def thrashing(row: dict, sc) -> tuple[str, int, float] | None:
    """(cache kind, slots, working set) when the row's cache holds fewer experts than one step's
    working set, else None."""
    pol = next(p for p in sc.policies if p.name == row["policy"])
    slots = pol.cache.slots(sc.model.expert_bytes)
    if pol.cache.kind == "none" or slots is None or not row["steps"]:
        return None
    per_step = row["unique_requests"] / row["steps"]
    if pol.cache.scope == "per-layer":
        per_step /= sc.model.num_layers
    gpus = sc.gpus.count if getattr(sc, "gpus", None) is not None else 1
    # several GPUs: each has a cache of ``slots``; the step's working set is summed over them
    # (expert-parallel: each distinct expert on one GPU; replicate: each GPU's own distinct experts)
    return (pol.cache.scope, slots, per_step) if slots * gpus < per_step else None


def thrashing_warnings(summary: list[dict], sc) -> list[str]:
    """One warning per batch size and cache size that thrashes, naming its policies."""
    groups: dict[tuple, list[dict]] = {}
    for r in summary:
        t = thrashing(r, sc)
        if t is not None:
            groups.setdefault((r["batch_size"], t[0], t[1]), []).append((r, t[2]))
    out = []
    for (b, scope, slots), rows in groups.items():
        per_step = rows[0][1]
        layer = " per layer" if scope == "per-layer" else ""
        n = sc.gpus.count if getattr(sc, "gpus", None) is not None else 1
        size = f"{slots:,} experts" + (f" on each of {n} GPUs ({slots * n:,})" if n > 1 else "")
        hits = ", ".join(f"{r['policy']} {(r['hits'] - r['prefetches_used']) / max(1, r['hits'] + r['misses']):.0%}"
                         for r, _ in rows)
        out.append(f"B={b}: a {scope} cache of {size} is smaller than one step's working set "
                   f"({per_step:,.0f} distinct experts{layer}): it thrashes (demand hits: {hits})")
    return out


def rank(b: int, rows: list[dict], base_name: str, rule: str, expert_bytes: int) -> dict:
    """One batch size's decision from its rows (each with ``step_latency_ms`` mean and ci95,
    ``speedup_vs_baseline``, ``hits``, ``prefetches_used``, ``prefetches_wasted``)."""
    base = next(r for r in rows if r["policy"] == base_name)
    ranked = sorted(rows, key=_mean)
    best = ranked[0]
    entry = {"batch_size": b, "best": best["policy"], "best_latency_ms": _mean(best),
             "baseline": base_name, "baseline_rule": rule, "baseline_latency_ms": _mean(base),
             "speedup": best["speedup_vs_baseline"],
             "runner_up": None, "distinguishable": None,
             "demand_hits": best["hits"] - best["prefetches_used"], "prefetch_hits": best["prefetches_used"],
             "wasted_prefetch_bytes": best.get("wasted_prefetch_bytes", best["prefetches_wasted"] * expert_bytes)}
    if len(ranked) > 1:
        second = ranked[1]
        entry["runner_up"] = second["policy"]
        entry["runner_up_latency_ms"] = _mean(second)
        entry["distinguishable"] = best["step_latency_ms"]["ci95"][1] < second["step_latency_ms"]["ci95"][0]
    return entry


def decide(summary: list[dict], sc) -> dict:
    """The decision summary of a run (see the module's doc); also fills each row's
    ``baseline``, ``baseline_rule`` and ``speedup_vs_baseline``."""
    by_batch: dict[int, list[dict]] = {}
    for r in summary:
        by_batch.setdefault(r["batch_size"], []).append(r)
    out = []
    for b, rows in by_batch.items():
        base_name, rule = baseline_of(rows, sc)
        base = next(r for r in rows if r["policy"] == base_name)
        for r in rows:
            r["baseline"] = base_name
            r["baseline_rule"] = rule
            r["speedup_vs_baseline"] = _mean(base) / _mean(r) if _mean(r) > 0 else None
        out.append(rank(b, rows, base_name, rule, sc.model.expert_bytes))
    return {"per_batch": out, "warnings": thrashing_warnings(summary, sc)}


def decision_lines(decision: dict) -> list[str]:
    """The decision summary as plain sentences (terminal and report)."""
    rows = decision["per_batch"]
    if not rows:
        return []
    lines = [f"Decision (speed-up vs the baseline: {rows[0]['baseline_rule']}):"]
    for d in rows:
        sp = f"{d['speedup']:.2f}x" if d["speedup"] else "-"
        s = f"  B={d['batch_size']}: {d['best']}, {sp} vs {d['baseline']}"
        if d["runner_up"] is not None:
            s += (f"; beats {d['runner_up']} (95% CIs apart)" if d["distinguishable"] else
                  f"; not distinguishable from {d['runner_up']} (95% CIs overlap)")
        lines.append(s)
        if d["prefetch_hits"] or d["wasted_prefetch_bytes"]:
            lines.append(f"    hits: {d['demand_hits']:,} demand + {d['prefetch_hits']:,} prefetch; "
                         f"{fmt_bytes(d['wasted_prefetch_bytes'])} prefetched in vain")
    lines += [f"warning: {w}" for w in decision["warnings"]]
    return lines


# ------------------------------------------------------------------------------- sweeps
#: the decision's columns in a sweep's decision.csv, after the point and its axes
SWEEP_COLUMNS = ("batch_size", "best", "best_latency_ms", "speedup", "baseline", "baseline_latency_ms",
                 "runner_up", "runner_up_latency_ms", "distinguishable", "demand_hits", "prefetch_hits",
                 "wasted_prefetch_bytes")
#: the terminal shows this many configurations (all are in decision.json / decision.csv)
SHOWN = 12
SHOWN_WARNINGS = 3


def _short_axes(axes: list[str]) -> dict[str, str]:
    """Axis path -> a short name (``trace.batch_locality`` -> ``batch_locality``)."""
    last = {a: a.rsplit(".", 1)[-1] for a in axes}
    return {a: s if list(last.values()).count(s) == 1 else a for a, s in last.items()}


def point_label(entry: dict, axes: list[str]) -> str:
    """``point 3 (capacity=64, batch_locality=0.8)``; zip partners with the same short name and
    value are named once."""
    names = _short_axes(axes)
    parts: list[str] = []
    for a in axes:
        if a in entry:
            p = f"{names[a].rsplit('.', 1)[-1]}={entry[a]}"
            if p not in parts:
                parts.append(p)
    return f"point {entry['point']}" + (f" ({', '.join(parts)})" if parts else "")


def sweep_decision(rows: list[dict], axes: list[str]) -> dict:
    """The decision of every finished point of a sweep, per batch size (each point is a run:
    the same rule as :func:`decide`, from its rows' ``baseline``), how often each policy is the
    best, and the points' warnings (thrashing caches, skipped policies)."""
    axes = [a for a in axes if a != "batch_sizes"]
    groups: dict[tuple[int, int], list[dict]] = {}
    warnings: dict[int, str] = {}
    for r in rows:
        if r.get("status", "ok") != "ok":
            continue
        groups.setdefault((int(r["point"]), int(r["batch_size"])), []).append(r)
        if r.get("decision_warnings"):
            warnings.setdefault(int(r["point"]), r["decision_warnings"])
    per = []
    for (point, b), rs in sorted(groups.items()):
        nested = [{**r, "step_latency_ms": {"mean": r["latency_mean_ms"],
                                            "ci95": [r["latency_ci95_lo"], r["latency_ci95_hi"]]}} for r in rs]
        entry = rank(b, nested, rs[0]["baseline"], rs[0].get("baseline_rule") or "", int(rs[0]["expert_bytes"]))
        entry = {k: None if isinstance(v, float) and v != v else v for k, v in entry.items()}   # NaN: none
        per.append({"point": point, **{a: rs[0][a] for a in axes if a in rs[0]}, **entry})
    counts: dict[str, int] = {}
    for e in per:
        counts[e["best"]] = counts.get(e["best"], 0) + 1
    labels = {e["point"]: point_label(e, axes) for e in per}
    warn = [f"{labels.get(p, f'point {p}')}: {line}" for p, text in sorted(warnings.items())
            for line in text.split("\n")]
    return {"axes": axes, "per_point": per,
            "best_counts": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))), "warnings": warn}


def sweep_decision_lines(dec: dict, shown: int = SHOWN, where: str = "decision.csv") -> list[str]:
    """A sweep's decision as sentences: the tally of best policies, then the first ``shown``
    configurations (the rest: ``where``), then the warnings (the first ``shown``)."""
    per = dec["per_point"]
    if not per:
        return []
    rules = sorted({e["baseline_rule"] for e in per if e["baseline_rule"]})
    tally = ", ".join(f"{p} in {n}" for p, n in dec["best_counts"].items())
    lines = [f"Decision per configuration (speed-up vs each point's baseline: {'; '.join(rules) or '-'}):",
             f"  best policy: {tally} of {len(per)} (configuration x batch size)"]
    for e in per[:shown]:
        sp = f"{e['speedup']:.2f}x" if e["speedup"] == e["speedup"] and e["speedup"] else "-"
        s = f"  {point_label(e, dec['axes'])} B={e['batch_size']}: {e['best']}, {sp} vs {e['baseline']}"
        if e["runner_up"] is not None:
            s += (f"; beats {e['runner_up']} (95% CIs apart)" if e["distinguishable"] else
                  f"; not distinguishable from {e['runner_up']}")
        lines.append(s)
    if len(per) > shown:
        lines.append(f"  ... {len(per) - shown} more configurations in {where}")
    warn = dec["warnings"]
    lines += [f"warning: {w}" for w in warn[:SHOWN_WARNINGS]]
    if len(warn) > SHOWN_WARNINGS:
        lines.append(f"warning: ... {len(warn) - SHOWN_WARNINGS} more warnings (of {len(warn)}) in "
                     f"{where.removesuffix('.csv')}.json")
    return lines
