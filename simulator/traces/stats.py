"""Statistics of routing that decide how well offloading policies can do.

All take a :class:`~simulator.traces.real.SequenceSet` (a batched trace is first split into
its sequences with :func:`~simulator.traces.real.sequences_from_trace`). With ``E`` experts,
top-``k`` routing and ``L`` layers:

- **skew** (per layer): the share of the layer's routed slots taken by its most routed expert
  (top-1 share; uniform: 1/E) and by its 8 most routed (top-8 share; uniform: 8/E), and the
  entropy of the expert distribution in bits and divided by log2 E (1 = uniform).
- **temporal re-use**: for consecutive tokens of a sequence, the fraction of a token's k
  experts at a layer that the previous token also used there (uniform: k/E).
- **re-use distance**: for every routed (token, layer, expert), how many tokens back the same
  sequence last used that expert at that layer (1 = the previous token), as a histogram;
  "first" counts first uses in a sequence.
- **cross-layer predictability**: an affinity model ``P(e' at l+1 | e at l)`` is counted on the
  train split and applied to the test split (:func:`~simulator.traces.real.split_indices`);
  each test token's k most likely experts at l+1 (noisy-OR over its k experts at l) are
  compared with its actual ones: precision = hits / k. The popularity baseline predicts the
  train split's k most routed experts of layer l+1; uniform guessing scores k/E.
- **batch dedup**: B sequences decoded side by side (:func:`~simulator.traces.real.batch_set`),
  distinct experts per layer-step vs the uniform formula E(1 - (1 - k/E)^B) and vs the
  *independent* formula sum_e 1 - (1 - p_e)^B (tokens independent with the measured
  popularity p_e: what skew alone explains).
- **LRU hit rate by capacity**: the deduplicated request stream (per step, each layer's
  distinct experts in layer then expert order: the simulator's ``dedup`` order) replayed
  through an LRU cache of every capacity at once (stack distances).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import write_with
from .real import SequenceSet, batch_set, split_indices
from .synthetic import expected_unique_uniform

REUSE_BINS = (1, 2, 3, 5, 9, 17, 33, 65, 129)      # lower edges of the re-use distance bins
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
CAPACITY_FRACTIONS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1)
_CHUNK_IDS = 1 << 18      # routed ids processed at a time: bounds the statistics' memory


def _chunk_rows(ss: SequenceSet) -> int:
    return max(1, _CHUNK_IDS // (ss.num_layers * ss.top_k))


def _chunks(ss: SequenceSet):
    """Row ranges ``(a, b)`` made of whole sequences, about ``_CHUNK_IDS`` ids each (a longer
    sequence is one range)."""
    max_rows = _chunk_rows(ss)
    off = ss.offsets
    i, n = 0, ss.num_sequences
    while i < n:
        j = int(np.searchsorted(off, off[i] + max_rows, side="right")) - 1
        j = min(n, max(j, i + 1))
        yield int(off[i]), int(off[j])
        i = j


def _pair_mask(ss: SequenceSet, a: int, b: int) -> np.ndarray:
    """For rows a..b-2: True where row r and r+1 are consecutive tokens of one sequence."""
    mask = np.ones(max(0, b - a - 1), dtype=bool)
    inner = ss.offsets[(ss.offsets > a) & (ss.offsets < b)] - a - 1
    mask[inner] = False
    return mask


# ------------------------------------------------------------------------------- counts
@dataclass
class RoutingCounts:
    """Counts over a set of sequences: what popularity, affinity and history models learn."""

    tokens: int
    single: np.ndarray   # (L, E): tokens routed to e at layer l
    pair: np.ndarray     # (L-1, E, E): tokens routed to e at l and to e2 at l+1
    pairs: int           # consecutive-token pairs inside sequences
    stay: np.ndarray     # (L, E): pairs where both tokens use e at l
    before: np.ndarray   # (L, E): pairs where the first token uses e at l
    after: np.ndarray    # (L, E): pairs where the second token uses e at l

    @property
    def top_k(self) -> int:
        return int(round(self.single[0].sum() / self.tokens)) if self.tokens else 0

    def popularity(self, alpha: float = 1.0) -> np.ndarray:
        """P(a token uses e at l), ``(L, E)``, smoothed towards uniform k/E by ``alpha`` tokens."""
        L, E = self.single.shape
        k = max(1, self.top_k)
        return (self.single + alpha * k / E) / (self.tokens + alpha)

    def conditional(self, alpha: float = 1.0) -> np.ndarray:
        """P(e2 at l+1 | e at l), ``(L-1, E, E)``, smoothed towards layer l+1's popularity."""
        pop = self.popularity(alpha)
        return (self.pair + alpha * pop[1:, None, :]) / (self.single[:-1, :, None] + alpha)

    def stickiness(self, alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """P(e at t+1 | e at t) and P(e at t+1 | e not at t), each ``(L, E)``."""
        pop = self.popularity(alpha)
        stick = (self.stay + alpha * pop) / (self.before + alpha)
        fresh = (self.after - self.stay + alpha * pop) / (self.pairs - self.before + alpha)
        return stick, fresh


def routing_counts(ss: SequenceSet, max_tokens: int | None = None) -> RoutingCounts:
    """One pass over ``ss`` (its first ``max_tokens`` rows when given)."""
    L, E = ss.num_layers, ss.num_experts
    single = np.zeros((L, E), np.int64)
    pair = np.zeros((max(0, L - 1), E, E), np.int64)
    stay, before, after = (np.zeros((L, E), np.int64) for _ in range(3))
    tokens = pairs = 0
    end = ss.num_tokens if max_tokens is None else min(ss.num_tokens, max_tokens)
    for a, b in _chunks(ss):
        b = min(b, end)
        if b <= a:
            break
        x = np.asarray(ss.experts[a:b]).astype(np.int64)
        tokens += len(x)
        lay = np.arange(L)[None, :, None] * E
        single += np.bincount((x + lay).ravel(), minlength=L * E).reshape(L, E)
        for l in range(L - 1):
            keys = x[:, l, :, None] * E + x[:, l + 1, None, :]
            pair[l] += np.bincount(keys.ravel(), minlength=E * E).reshape(E, E)
        m = _pair_mask(ss, a, b)
        prev, nxt = x[:-1][m] + lay, x[1:][m] + lay
        pairs += len(prev)
        kept = (prev[:, :, :, None] == nxt[:, :, None, :]).any(axis=3)      # prev's expert used again
        stay += np.bincount(prev[kept], minlength=L * E).reshape(L, E)
        before += np.bincount(prev.ravel(), minlength=L * E).reshape(L, E)
        after += np.bincount(nxt.ravel(), minlength=L * E).reshape(L, E)
    return RoutingCounts(tokens=tokens, single=single, pair=pair, pairs=pairs, stay=stay, before=before, after=after)


def _one_hot(x: np.ndarray, E: int) -> np.ndarray:
    """``(n, L, k)`` ids -> ``(n, L, E)`` membership."""
    out = np.zeros((*x.shape[:2], E), dtype=bool)
    np.put_along_axis(out, x, True, axis=2)
    return out


# ------------------------------------------------------------------------- the statistics
def skew(counts: RoutingCounts) -> dict:
    """Top-1 / top-8 share and entropy of each layer's expert popularity."""
    c = counts.single.astype(float)
    L, E = c.shape
    total = c.sum(1, keepdims=True)
    p = np.divide(c, total, out=np.zeros_like(c), where=total > 0)
    srt = -np.sort(-p, axis=1)
    top = min(8, E)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log2(p), 0.0), axis=1)
    per = [{"layer": l, "top1_share": float(srt[l, 0]), "top8_share": float(srt[l, :top].sum()),
            "entropy_bits": float(ent[l]), "entropy_norm": float(ent[l] / np.log2(E)) if E > 1 else 1.0}
           for l in range(L)]
    return {"per_layer": per, "mean": _mean(per, ("top1_share", "top8_share", "entropy_bits", "entropy_norm")),
            "uniform": {"top1_share": 1 / E, "top8_share": top / E, "entropy_norm": 1.0}}


def _mean(rows: list[dict], keys) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) if rows else 0.0 for k in keys}


def temporal_reuse(counts: RoutingCounts) -> dict:
    """Fraction of a token's experts its predecessor also used, per layer."""
    k = max(1, counts.top_k)
    per = [{"layer": l, "reuse": float(counts.stay[l].sum() / (counts.pairs * k)) if counts.pairs else 0.0}
           for l in range(counts.single.shape[0])]
    return {"per_layer": per, "mean": _mean(per, ("reuse",))["reuse"], "pairs": counts.pairs,
            "uniform": k / counts.single.shape[1]}


def reuse_distance(ss: SequenceSet) -> dict:
    """Histogram of token distances to the same sequence's previous use of (layer, expert)."""
    L, E, k = ss.num_layers, ss.num_experts, ss.top_k
    edges = np.array(REUSE_BINS + (np.iinfo(np.int64).max,))
    hist = np.zeros(len(REUSE_BINS), np.int64)
    first = 0
    for a, b in _chunks(ss):
        x = np.asarray(ss.experts[a:b]).astype(np.int64)
        row = np.repeat(np.arange(b - a), L * k)                                  # row of each request
        sid = np.searchsorted(ss.offsets, np.arange(a, b), side="right") - 1      # sequence of each row
        key = ((sid[:, None, None] - sid[0]) * L + np.arange(L)[None, :, None]) * E + x
        order = np.argsort(key.ravel(), kind="stable")
        ks, ts = key.ravel()[order], row[order]
        same = ks[1:] == ks[:-1]
        gaps = (ts[1:] - ts[:-1])[same]
        first += len(ks) - int(same.sum())
        hist += np.histogram(gaps, bins=edges)[0]
    total = int(hist.sum()) + first
    labels = [_bin_label(lo, hi) for lo, hi in zip(REUSE_BINS, REUSE_BINS[1:] + (None,))] + ["first"]
    frac = [float(h / total) if total else 0.0 for h in hist] + [first / total if total else 0.0]
    return {"bins": labels, "fraction": frac, "requests": total}


def _bin_label(lo: int, hi: int | None) -> str:
    if hi is None:
        return f">={lo}"
    return str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}"


def split_sets(ss: SequenceSet) -> tuple[SequenceSet, SequenceSet, bool]:
    """Train and test parts of ``ss``; both are ``ss`` itself (in-sample) when either split
    would be empty (fewer than TEST_EVERY sequences)."""
    train = split_indices(ss.num_sequences, "train")
    test = split_indices(ss.num_sequences, "test")
    if len(train) < 1 or len(test) < 1:
        return ss, ss, True
    return ss.subset(train), ss.subset(test), False


def affinity_scores(cond_log1m: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Per token: log P(e2 not chosen at l+1) under noisy-OR over its experts at l.
    ``cond_log1m`` is ``log(1 - P(e2 | e))`` ``(E, E)``, ``current`` ``(tokens, k)``; lower = likelier."""
    return cond_log1m[current].sum(axis=1)


def cross_layer(train: RoutingCounts, test: SequenceSet, max_tokens: int | None = None) -> dict:
    """Precision of the affinity model (trained on ``train``) on the tokens of ``test``."""
    L, E, k = test.num_layers, test.num_experts, test.top_k
    n = test.num_tokens if max_tokens is None else min(test.num_tokens, max_tokens)
    log1m = np.log1p(-np.minimum(train.conditional(), 1 - 1e-9))
    pop_pred = np.argsort(-train.popularity()[1:], axis=1, kind="stable")[:, :k]      # (L-1, k)
    hits = np.zeros(max(0, L - 1))
    pop_hits = np.zeros(max(0, L - 1))
    rows = _chunk_rows(test)
    for a in range(0, n, rows):
        x = np.asarray(test.experts[a:min(n, a + rows)]).astype(np.int64)
        for l in range(L - 1):
            pred = np.argpartition(affinity_scores(log1m[l], x[:, l]), k - 1, axis=1)[:, :k]
            actual = _one_hot(x[:, l + 1][:, None, :], E)[:, 0]
            hits[l] += np.take_along_axis(actual, pred, axis=1).sum()
            pop_hits[l] += actual[:, pop_pred[l]].sum()
    per = [{"layer": l, "to": l + 1, "precision": float(hits[l] / (n * k)) if n else 0.0,
            "popularity_precision": float(pop_hits[l] / (n * k)) if n else 0.0} for l in range(L - 1)]
    mean = _mean(per, ("precision", "popularity_precision"))
    return {"per_layer": per, "precision": mean["precision"], "popularity_precision": mean["popularity_precision"],
            "uniform": k / E, "train_tokens": train.tokens, "test_tokens": n}


def unique_per_layer_step(trace) -> np.ndarray:
    """Distinct experts of every (decode step, layer) of a batched trace: ``(steps, L)``."""
    dec = np.flatnonzero(trace.phase == 0)
    B = int(np.diff(trace.step_offsets)[dec].max()) if len(dec) else 0
    rows = np.concatenate([np.arange(trace.step_offsets[s], trace.step_offsets[s + 1]) for s in dec])
    x = trace.experts[rows].reshape(len(dec), B, trace.num_layers, trace.top_k)
    x = np.sort(x.transpose(0, 2, 1, 3).reshape(len(dec), trace.num_layers, -1), axis=2)
    return 1 + (np.diff(x, axis=2) != 0).sum(axis=2)


def batch_dedup(ss: SequenceSet, counts: RoutingCounts, batch_sizes=BATCH_SIZES, seed: int = 0) -> list[dict]:
    """Mean distinct experts per layer-step for each batch size, against the two formulas."""
    E, k = ss.num_experts, ss.top_k
    p = counts.single / max(1, counts.tokens)
    out = []
    for B in batch_sizes:
        steps = max(1, ss.num_tokens // B)
        tr = batch_set(ss, np.arange(ss.num_sequences), batch_size=B, steps=steps, seed=seed)
        uniq = float(unique_per_layer_step(tr).mean())
        uniform = expected_unique_uniform(E, k, B)
        indep = float((1 - (1 - p) ** B).sum(axis=1).mean())
        out.append({"batch_size": B, "unique": uniq, "uniform_formula": uniform, "independent_formula": indep,
                    "dedup_savings": 1 - uniq / (B * k), "uniform_savings": 1 - uniform / (B * k),
                    **repeats(tr)})
    return out


def repeats(tr) -> dict:
    """How many of a batched trace's admissions repeat a sequence already decoded (the batch
    order wraps around when the sequences run out): ``sequences_admitted``, ``repeated``."""
    admitted, available = tr.meta["sequences_admitted"], tr.meta["sequences_available"]
    return {"sequences_admitted": admitted, "repeated": max(0, admitted - available)}


def repeat_warnings(stats: dict) -> list[str]:
    """A warning for each statistic whose batch repeated sequences: a sequence beside a copy of
    itself shares every expert, so dedup savings and hit rates come out higher than real."""
    rows = [(f"batch dedup at B={r['batch_size']}", r) for r in stats["batch_dedup"]]
    rows.append((f"LRU curve at B={stats['lru']['batch_size']}", stats["lru"]))
    return [f"{what}: the batch decoded {r['sequences_admitted']} sequences of only {stats['sequences']}, so "
            f"{r['repeated']} are repeats that share every expert with their original: savings are overstated"
            for what, r in rows if r.get("repeated")]


def stack_distance_histogram(trace) -> tuple[np.ndarray, int]:
    """LRU stack distances of a trace's deduplicated requests: ``hist[d]`` = requests that
    found d other distinct keys used since their key's previous use, and the number of first
    uses. Requests: per step, each layer's distinct experts in (layer, expert) order. A request
    hits an LRU cache of C slots iff its distance is below C."""
    L, E = trace.num_layers, trace.num_experts
    M = L * E
    last = np.full(M, -1, np.int64)       # request index of each key's latest use
    hist = np.zeros(M, np.int64)
    first = 0
    t = 0
    lay = np.arange(L, dtype=np.int64)[None, :, None] * E
    for s in range(trace.num_steps):
        keys = np.unique(trace.step(s).astype(np.int64) + lay)
        old = last[keys]
        newer = M - np.searchsorted(np.sort(last), old, side="right")    # keys used since, before this step
        earlier = np.tril(old[None, :] <= old[:, None], k=-1).sum(1)      # this step's earlier keys not in newer
        d = (newer + earlier)[old >= 0]
        hist += np.bincount(d, minlength=M)
        first += len(keys) - len(d)
        last[keys] = t + np.arange(len(keys))
        t += len(keys)
    return hist, first


def lru_curve(ss: SequenceSet, batch_size: int = 1, seed: int = 0, fractions=CAPACITY_FRACTIONS) -> dict:
    """LRU hit rate at every capacity, for ``batch_size`` sequences decoded side by side."""
    steps = max(1, ss.num_tokens // batch_size)
    tr = batch_set(ss, np.arange(ss.num_sequences), batch_size=batch_size, steps=steps, seed=seed)
    hist, first = stack_distance_histogram(tr)
    M = len(hist)
    hits = np.concatenate([[0], np.cumsum(hist)])          # hits[C] = requests with distance < C
    n = max(1, int(hist.sum()) + first)
    caps = sorted({max(1, int(round(f * M))) for f in fractions})
    grid = sorted({int(c) for c in np.unique(np.round(np.geomspace(1, M, 40)))} | set(caps))
    return {"batch_size": batch_size, "requests": n, "distinct_keys": M, "compulsory_miss_rate": first / n,
            **repeats(tr),
            "table": [{"capacity": c, "fraction": c / M, "hit_rate": float(hits[c] / n)} for c in caps],
            "curve": [{"capacity": c, "hit_rate": float(hits[c] / n)} for c in grid]}


def trace_stats(ss: SequenceSet, *, batch_sizes=BATCH_SIZES, lru_batch: int = 1, seed: int = 0) -> dict:
    """Every statistic above, as one JSON-able dict."""
    counts = routing_counts(ss)
    train, test, in_sample = split_sets(ss)
    xl = cross_layer(routing_counts(train), test)
    xl["in_sample"] = in_sample
    st = {
        "source": ss.meta.get("source", ""), "sequences": ss.num_sequences, "tokens": ss.num_tokens,
        "layers": ss.num_layers, "num_experts": ss.num_experts, "top_k": ss.top_k,
        "skew": skew(counts), "temporal": temporal_reuse(counts), "reuse_distance": reuse_distance(ss),
        "cross_layer": xl, "batch_dedup": batch_dedup(ss, counts, batch_sizes, seed),
        "lru": lru_curve(ss, lru_batch, seed),
    }
    st["warnings"] = repeat_warnings(st)
    return st


# ----------------------------------------------------------------------------------- plots
def write_stats_plots(stats: dict, out_dir: str | Path) -> list[Path]:
    """One PNG per statistic (matplotlib, Agg backend) into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    written = []

    def save(fig, name):
        fig.tight_layout()
        p = out / name
        try:
            write_with(p, lambda tmp: fig.savefig(tmp, format="png", dpi=110), "--plots")
        finally:
            plt.close(fig)
        written.append(p)

    sk = stats["skew"]
    layers = [r["layer"] for r in sk["per_layer"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("top1_share", "top-1 share"), ("top8_share", "top-8 share")):
        a1.plot(layers, [r[key] for r in sk["per_layer"]], marker="o", label=label)
        a1.axhline(sk["uniform"][key], ls=":", color=a1.lines[-1].get_color())
    a1.set(xlabel="layer", ylabel="share of routed slots", title="popularity skew (dotted: uniform)")
    a1.legend()
    a2.plot(layers, [r["entropy_norm"] for r in sk["per_layer"]], marker="o")
    a2.set(xlabel="layer", ylabel="entropy / log2 E", title="normalised entropy (1 = uniform)")
    save(fig, "skew.png")

    tp, rd = stats["temporal"], stats["reuse_distance"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.plot(layers, [r["reuse"] for r in tp["per_layer"]], marker="o", label="measured")
    a1.axhline(tp["uniform"], ls=":", color="gray", label="uniform k/E")
    a1.set(xlabel="layer", ylabel="fraction of experts re-used", title="re-use between consecutive tokens")
    a1.legend()
    a2.bar(rd["bins"], rd["fraction"])
    a2.set(xlabel="tokens since the sequence last used (layer, expert)", ylabel="fraction of requests",
           title="re-use distance")
    a2.tick_params(axis="x", labelrotation=45)
    save(fig, "reuse.png")

    xl = stats["cross_layer"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([r["to"] for r in xl["per_layer"]], [r["precision"] for r in xl["per_layer"]], marker="o",
            label="affinity P(l+1 | l)")
    ax.plot([r["to"] for r in xl["per_layer"]], [r["popularity_precision"] for r in xl["per_layer"]], marker="s",
            label="popularity")
    ax.axhline(xl["uniform"], ls=":", color="gray", label="uniform k/E")
    ax.set(xlabel="predicted layer", ylabel="precision of top-k guess", title="cross-layer predictability (held out)")
    ax.legend()
    save(fig, "cross_layer.png")

    bd = stats["batch_dedup"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bs = [r["batch_size"] for r in bd]
    ax.plot(bs, [r["unique"] for r in bd], marker="o", label="measured")
    ax.plot(bs, [r["independent_formula"] for r in bd], ls="--", label="independent tokens, measured skew")
    ax.plot(bs, [r["uniform_formula"] for r in bd], ls=":", label="uniform E(1-(1-k/E)^B)")
    ax.set(xscale="log", xlabel="batch size B", ylabel="distinct experts per layer-step", title="batch dedup")
    ax.legend()
    save(fig, "dedup.png")

    lru = stats["lru"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([r["capacity"] for r in lru["curve"]], [r["hit_rate"] for r in lru["curve"]], marker=".")
    ax.set(xscale="log", xlabel="cache capacity (experts)", ylabel="hit rate",
           title=f"LRU hit rate, batch {lru['batch_size']}, {lru['distinct_keys']} experts in all")
    save(fig, "lru.png")
    return written
