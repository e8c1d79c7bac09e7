"""From a ``simmoe calibrate engine`` document to a profile's ``engine`` section (no torch but to write).

The decode grids may have holes (points over the KV budget, out of memory or out of time):
a batch row with no measured point is dropped; a missing cell is extrapolated log-log along
context from the two nearest measured cells of its row (one: copied), and listed in
``filled``. The grid is then made non-decreasing along both axes (as the simulator reads it);
``errors`` holds, per measured point, table / measured - 1. A graphed style (``graphs``,
``offload-graphs``) carries its own grids (``styles.<style>.decode`` and ``dense_decode``,
from the document's ``decode_graphs`` tables), which price its dense op.
"""
from __future__ import annotations

import json
import statistics
import math
from pathlib import Path

import numpy as np

from simulator.engine_costs import monotone_grid
from simulator.engine_styles import GRAPHED_STYLES
from simulator.errors import InputError
from simulator.models import get_preset
from simulator.profile import ModelEngine, parse_profile

ENGINE_FORMAT = "simmoe-engine"


def _fill_row(ctx: list[int], row: list[float | None]) -> tuple[list[float], list[int]]:
    known = [j for j, v in enumerate(row) if v is not None]
    out, filled = list(row), []
    lx = np.log(np.asarray(ctx, float))
    for j, v in enumerate(row):
        if v is not None:
            continue
        near = sorted(known, key=lambda k: (abs(k - j), k > j))[:2]
        if len(near) == 1:
            out[j] = row[near[0]]
        else:
            a, b = sorted(near)
            slope = (math.log(row[b]) - math.log(row[a])) / (lx[b] - lx[a])
            out[j] = math.exp(math.log(row[a]) + max(0.0, slope) * (lx[j] - lx[a]))
        filled.append(j)
    return out, filled


def grid_section(table: dict) -> dict:
    """A profile ``EngineGrid`` from a measured decode table (``points[i][j]`` or None)."""
    batches, ctx = table["batch"], table["context"]
    rows, keep, filled, measured = [], [], [], []
    for i, b in enumerate(batches):
        row = [None if p is None else p["ms"] for p in table["points"][i]]
        if all(v is None for v in row):
            continue
        full, f = _fill_row(ctx, row)
        filled += [(len(rows), j) for j in f]
        rows.append(full)
        measured.append(row)
        keep.append(b)
    if not rows:
        raise ValueError("no decode point was measured")
    mono = monotone_grid(np.asarray(rows, float))
    errors = [[0.0 if m is None else float(t / m - 1) for t, m in zip(trow, mrow)] for trow, mrow in zip(mono, measured)]
    return {"batch": keep, "context": list(ctx), "ms": mono.tolist(), "errors": errors, "filled": filled,
            "max_abs_error": max(abs(e) for r in errors for e in r)}


def part_grid_section(table: dict, key: str) -> dict | None:
    """One part of the decode grid's time: ``gpu_ms`` (the GPU work alone, timed behind a
    blocker) or ``host_ms`` (the host's time in the call, the issue of its kernels), never
    over the point's own time; None when no point has it (a CPU run, an older document)."""
    pts = [p for row in table["points"] for p in row if p is not None]
    if not any(p.get(key) for p in pts):
        return None
    capped = {**table, "points": [[None if p is None or not p.get(key) else {"ms": min(p[key], p["ms"])}
                                   for p in row] for row in table["points"]]}
    return grid_section(capped)


def engine_section(doc: dict) -> dict:
    """The profile's ``engine[model]`` entry from one ``simmoe calibrate engine`` document."""
    t = doc["tables"]
    arch = get_preset(doc["model"]).arch
    out = {
        "decode": grid_section(t["decode"]),
        "decode_gpu": part_grid_section(t["decode"], "gpu_ms"),
        "decode_host": part_grid_section(t["decode"], "host_ms"),
        "dense_layers": len(arch.dense_layers) if arch else 0,
        "prefill": [[p["tokens"], p["ms"]] for p in t["prefill"]["points"]],
        "head": [[p["batch"], p["ms"]] for p in t["head"]["points"]],
        "styles": {},
        "source": {k: doc.get(k) for k in ("command", "tiny", "trials", "elapsed_s")}
                  | {k: doc["provenance"].get(k) for k in ("gpu", "host_cpu", "date", "torch", "transformers")},
    }
    probes = [q["dispatch_us"] for q in doc.get("host_probe") or [] if q.get("dispatch_us")]
    if probes:  # the host's dispatch speed while these tables were measured (before, after)
        out["source"]["host_probe_dispatch_us"] = sum(probes) / len(probes)
    for key in ("decode_gpu", "decode_host"):
        if out[key] is None:
            del out[key]
    if "dense_decode" in t:
        out["dense_decode"] = grid_section(t["dense_decode"])
    for style, e in t["experts"].items():
        pts = e["points"]
        if not pts:
            continue
        fit = e.get("fit")
        base, per = (fit["base_ms"], fit["per_expert_ms"]) if fit else (pts[0]["ms"], 0.0)
        if per < 0 or base < 0:  # a noisy line: the mean time per active expert, through 0
            base, per = 0.0, sum(p["ms"] for p in pts) / sum(p["active"] for p in pts)
        out["styles"][style] = {"base_ms": base, "per_expert_ms": per,
                                "max_abs_error": fit["max_abs_error"] if fit else None,
                                "points": [[p["batch"], p["active"], p["ms"]] for p in pts]}
        hf = e.get("host_fit")
        if (style.startswith("offload") or style in GRAPHED_STYLES) and hf and hf["base_ms"] >= 0 \
                and hf["per_expert_ms"] >= 0:
            # the call's host time as the engine charges it: per layer, per compute, per copy
            # (the executor's, or a graphed style's eager expert call between the replays)
            out["styles"][style].update(host_base_ms=hf["base_ms"], host_per_expert_ms=hf["per_expert_ms"],
                                        host_per_load_ms=e.get("host_per_load_ms"))
        gf = e.get("gpu_fit")
        if gf is not None:   # the call's GPU work alone (host ahead): what follows a layer's last copy
            gb, gp = gf["base_ms"], gf["per_expert_ms"]
            if gb < 0 or gp < 0:   # a noisy line: the mean per active expert, through 0
                gb, gp = 0.0, sum(p["gpu_ms"] for p in pts) / sum(p["active"] for p in pts)
            out["styles"][style].update(gpu_base_ms=gb, gpu_per_expert_ms=gp)
        if style in GRAPHED_STYLES:   # its dense op: the grids replayed from CUDA graphs
            if "decode_graphs" not in t:
                raise ValueError(f"style {style}: no decode_graphs table (measured with a graphed style)")
            out["styles"][style]["decode"] = grid_section(t["decode_graphs"])
            if "dense_decode_graphs" in t:
                out["styles"][style]["dense_decode"] = grid_section(t["dense_decode_graphs"])
    if t.get("in_situ"):
        situ = in_situ_factors(t["in_situ"], out)
        if situ["dense"] is not None:
            out["in_situ"] = situ
    ModelEngine.model_validate(out)
    return out


def merge_engine(profile_path: Path, engine_paths: list[Path], out: Path) -> dict:
    """The profile at ``profile_path`` with the engine tables of each document merged in
    (one per model, keyed by preset; a ``--tiny`` measurement as ``<preset>-tiny``; a model
    already there has its tables replaced, but keeps the expert styles the new document did
    not measure), validated; written to ``out``."""
    from calibrate.profile_writer import write_atomic

    prof = _read_json(profile_path, "profile")
    parse_profile(prof, str(profile_path))
    for p in engine_paths:
        doc = _read_json(p, "engine")
        if doc.get("format") != ENGINE_FORMAT:
            raise InputError(str(p), "format", f"not a simmoe engine measurement (expected format {ENGINE_FORMAT!r})")
        try:
            key = doc["model"] + ("-tiny" if doc.get("tiny") else "")  # a tiny model's tables are its own
            new = engine_section(doc)
            old = prof.setdefault("engine", {}).get(key) or {}
            # styles the new document did not measure stay (``--style offload`` adds one)
            fresh = set(new["styles"])
            new["styles"] = {**old.get("styles", {}), **new["styles"]}
            keep_style_factors(new, old, fresh)
            prof["engine"][key] = new
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(str(p), "tables", f"cannot use: {e}") from None
    parse_profile(prof, str(out))
    write_atomic(prof, out)
    return prof


def merge_in_situ(profile_doc: dict, model: str, step: dict, source: str = "in situ") -> dict:
    """``profile_doc`` (a profile's JSON) with ``engine[model].in_situ`` taken from in situ
    steps (:func:`calibrate.measurements.engine_step.measure_in_situ`) against its own tables:
    the factors of the styles the steps timed (and the per-expert loop's) new, the others' kept
    (``simmoe validate --in-situ``, on the model its rows run on). Validated; returns the new
    document."""
    doc = json.loads(json.dumps(profile_doc))
    sec = (doc.get("engine") or {}).get(model)
    if sec is None:
        raise InputError(source, f"engine.{model}", "no engine tables for the model to take the in situ steps against")
    old = {"in_situ": sec.get("in_situ")} if sec.get("in_situ") else {}
    sec["in_situ"] = in_situ_factors(step, sec)
    if sec["in_situ"]["dense"] is None:
        raise InputError(source, "in_situ", "the in situ steps gave no factor (every step without experts "
                                            "came out shorter than its head): nothing to project with")
    timed = {s for p in step["points"] for s in (p.get("styles") or {})} | {"offload"}
    keep_style_factors(sec, old, timed)
    parse_profile(doc, source)
    return doc


def keep_style_factors(new: dict, old: dict, fresh: set[str]) -> None:
    """A style kept from ``old`` (not in ``fresh``, the styles the new document timed) keeps
    its in situ factor too, taken against the same style table: ``in_situ.styles[style]``,
    and ``experts`` (the per-expert loop's, ``offload``) when the new steps did not give one. Without the old
    factors a kept style's host terms fell back to 1 (OLMoE's ``offload`` from 1.31)."""
    old_situ, situ = old.get("in_situ") or {}, new.get("in_situ")
    if situ is None or not old_situ:
        return
    kept = {s: f for s, f in (old_situ.get("styles") or {}).items() if s not in fresh and s in new["styles"]}
    if kept:
        situ["styles"] = {**kept, **(situ.get("styles") or {})}
    if situ.get("experts") is None and old_situ.get("experts") is not None and "offload" not in fresh:
        situ["experts"] = old_situ["experts"]


def _read_json(p: Path, what: str) -> dict:
    if not p.exists():
        raise InputError(str(p), what, "file not found")
    try:
        return json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(str(p), what, f"cannot read JSON: {e}") from None


def in_situ_factors(step: dict, section: dict) -> dict:
    """``{"dense", "experts", "points"}``: the factors of each point against the isolated tables
    of the profile's ``engine[model]`` section, and their medians."""
    from simulator.engine_costs import GridCost, curve_ms

    t = ModelEngine.model_validate(section)
    decode = GridCost(t.decode)
    dense_grid = GridCost(t.dense_decode) if t.dense_decode else None
    off = t.styles.get("offload")
    L, n = step["moe_layers"], step["layers"]
    rows = []
    for p in step["points"]:
        B, C = p["batch"], p["context"]
        head = curve_ms(t.head, B) if t.head else 0.0
        dense_layers = n - L
        iso_dense = L * decode.ms(B, C) + dense_layers * (dense_grid.ms(B, C) if dense_grid else 0.0)
        row = {"batch": B, "context": C, "dense": (p["null_ms"] - head) / iso_dense}
        if off is not None:
            iso_exp = L * (off.base_ms + off.per_expert_ms * p["active"])
            row["experts"] = (p["resident_ms"] - p["null_ms"]) / iso_exp
        for style, ms in (p.get("styles") or {}).items():   # a grouped style's own resident step
            st = t.styles.get(style)
            if st is None:
                continue
            around = p["null_ms"]
            if st.decode is not None:   # graphed: the head and the replayed tables, not the eager step
                around = head + L * GridCost(st.decode).ms(B, C) + dense_layers * (
                    GridCost(st.dense_decode).ms(B, C) if st.dense_decode else 0.0)
            row[f"experts:{style}"] = (ms - around) / (L * (st.base_ms + st.per_expert_ms * p["active"]))
        rows.append(row)
    def med(k):  # over the points where the factor is meaningful (a noisy CPU run can invert a difference)
        v = [r[k] for r in rows if r.get(k) is not None and r[k] > 0]
        return float(statistics.median(v)) if v else None
    styles = sorted({k.split(":", 1)[1] for r in rows for k in r if k.startswith("experts:")})
    by_style = {s: f for s in styles if (f := med(f"experts:{s}")) is not None}
    # the executor's pools, pageable (as the layer baseline meets it) and pinned
    copies = {k: {"bytes": c["bytes"], "ms": c["ms"]} for k in ("pageable_copy", "pinned_copy") if (c := step.get(k))}
    cpu = step.get("cpu_path")        # the executor's own CPU expert, by tokens
    cpu = {"cpu_path": [[t, ms] for t, ms in zip(cpu["tokens"], cpu["ms"])], "cpu_threads": cpu["threads"]} \
        if cpu and cpu.get("tokens") else {}
    route = step.get("route_wait")   # the router read behind queued copies (a fraction of their time)
    route = {"route_wait": route["fraction"]} if route else {}
    probes = [p["probe_dispatch_us"] for p in step["points"] if p.get("probe_dispatch_us")]   # the host meanwhile
    probe = {"probe_dispatch_us": float(np.median(probes))} if probes else {}
    return {"dense": med("dense"), "experts": med("experts"), **({"styles": by_style} if by_style else {}),
            **copies, **route, **cpu, **probe, "points": rows}
