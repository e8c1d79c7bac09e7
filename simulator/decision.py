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


def baseline_of(rows: list[dict], sc) -> tuple[str, str]:
    """The baseline policy of one batch size's rows and the rule that chose it."""
    if sc.baseline is not None:
        return sc.baseline, "scenario key 'baseline'"
    no_cache = {p.name for p in sc.policies if p.cache.kind == "none"}
    candidates = [r for r in rows if r["policy"] in no_cache]
    if candidates:
        return min(candidates, key=_mean)["policy"], "fastest policy without a cache"
    return sc.policies[0].name, "first policy (every policy has a cache)"


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
    return (pol.cache.scope, slots, per_step) if slots < per_step else None


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
        hits = ", ".join(f"{r['policy']} {(r['hits'] - r['prefetches_used']) / max(1, r['hits'] + r['misses']):.0%}"
                         for r, _ in rows)
        out.append(f"B={b}: a {scope} cache of {slots:,} experts is smaller than one step's working set "
                   f"({per_step:,.0f} distinct experts{layer}): it thrashes (demand hits: {hits})")
    return out


def decide(summary: list[dict], sc) -> dict:
    """The decision summary of a run (see the module's doc); also fills each row's
    ``baseline`` and ``speedup_vs_baseline``."""
    eb = sc.model.expert_bytes
    by_batch: dict[int, list[dict]] = {}
    for r in summary:
        by_batch.setdefault(r["batch_size"], []).append(r)
    out = []
    for b, rows in by_batch.items():
        base_name, rule = baseline_of(rows, sc)
        base = next(r for r in rows if r["policy"] == base_name)
        for r in rows:
            r["baseline"] = base_name
            r["speedup_vs_baseline"] = _mean(base) / _mean(r) if _mean(r) > 0 else None
        ranked = sorted(rows, key=_mean)
        best = ranked[0]
        entry = {"batch_size": b, "best": best["policy"], "best_latency_ms": _mean(best),
                 "baseline": base_name, "baseline_rule": rule, "baseline_latency_ms": _mean(base),
                 "speedup": best["speedup_vs_baseline"],
                 "runner_up": None, "distinguishable": None,
                 "demand_hits": best["hits"] - best["prefetches_used"], "prefetch_hits": best["prefetches_used"],
                 "wasted_prefetch_bytes": best.get("wasted_prefetch_bytes", best["prefetches_wasted"] * eb)}
        if len(ranked) > 1:
            second = ranked[1]
            entry["runner_up"] = second["policy"]
            entry["runner_up_latency_ms"] = _mean(second)
            entry["distinguishable"] = best["step_latency_ms"]["ci95"][1] < second["step_latency_ms"]["ci95"][0]
        out.append(entry)
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
                         f"{d['wasted_prefetch_bytes'] / 2**20:,.1f} MiB prefetched in vain")
    lines += [f"warning: {w}" for w in decision["warnings"]]
    return lines
