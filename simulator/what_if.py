"""Hardware what-ifs: a profile with some of its terms scaled (a pure ``Profile -> Profile``).

A what-if names a few knobs (the scenario's ``what_if:`` key, ``--what-if KEY=VALUE`` on
``simmoe run`` and ``simmoe sweep``):

============================  =====================================================================
``pcie_GBps``                 the pinned host-to-device bandwidth becomes this (GB/s); every copy
                              curve's bandwidth moves by the same ratio (pageable: see below)
``pcie_scale``                the link's bandwidth times this (2 = twice as fast); not with pcie_GBps
``copy_latency_us``           the pinned host-to-device copy latency becomes this (us); every copy
                              curve's latency moves by the same ratio
``copy_latency_scale``        every copy latency times this; not with copy_latency_us
``gpu_compute_scale``         GPU time times this (0.5 = a GPU twice as fast): expert FFN tables and
                              the engine tables' GPU terms (the model's ``dense_ms_per_layer`` is a
                              scenario term: set ``engine.dense_ms_per_layer`` for it)
``cpu_compute_scale``         CPU expert times times this
``host_scale``                host overheads times this: issue costs, the synchronise, the pageable
                              tail, and the engine styles' host terms (per layer, per expert, per
                              copy); in-situ factors are ratios and stay
============================  =====================================================================

Copy curves are ``latency + bytes / bandwidth`` plus measured tables. A measured point of
``ms`` is split into a latency part ``min(ms, latency)`` and a transfer part (the rest); the
latency part is scaled by the latency factor and the transfer part divided by the bandwidth
factor. A pageable copy is staged through a host buffer: its time is taken as the host copy
plus the link, ``1/bw_pageable = 1/bw_host + 1/bw_pinned``, so a faster link speeds a pageable
copy less (``bw_host`` is what the profile's two curves imply; when the pageable curve is not
slower than the pinned one it scales like it).
"""
from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from .errors import InputError
from .profile import MAX_GBPS, CopyCurve, Profile, _Strict, copy_ms_from_curve

#: the largest factor a what-if may apply to a term (beyond it, the profile is a different machine)
MAX_SCALE = 1000.0


class WhatIf(_Strict):
    """The what-if knobs; every one is optional (the scenario's ``what_if:`` key)."""

    pcie_GBps: float | None = Field(None, gt=0, le=MAX_GBPS, description="pinned H2D bandwidth, GB/s")
    pcie_scale: float | None = Field(None, ge=1 / MAX_SCALE, le=MAX_SCALE, description="bandwidth factor")
    copy_latency_us: float | None = Field(None, gt=0, le=1e6, description="pinned H2D copy latency, us")
    copy_latency_scale: float | None = Field(None, ge=0, le=MAX_SCALE, description="copy latency factor")
    gpu_compute_scale: float | None = Field(None, ge=1 / MAX_SCALE, le=MAX_SCALE, description="GPU time factor")
    cpu_compute_scale: float | None = Field(None, ge=1 / MAX_SCALE, le=MAX_SCALE, description="CPU expert time factor")
    host_scale: float | None = Field(None, ge=0, le=MAX_SCALE, description="host overhead factor")

    @model_validator(mode="after")
    def _one_of_each(self):
        for a, b in (("pcie_GBps", "pcie_scale"), ("copy_latency_us", "copy_latency_scale")):
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise ValueError(f"give {a} or {b}, not both")
        return self

    def given(self) -> dict[str, float]:
        """The knobs set, in declaration order."""
        return {k: v for k, v in self.model_dump().items() if v is not None}

    def label(self) -> str:
        """``pcie_GBps=25, host_scale=0.5`` (empty when nothing is set)."""
        return ", ".join(f"{k}={v:g}" for k, v in self.given().items())


KNOBS = tuple(WhatIf.model_fields)


def parse_what_if_flags(values: tuple[str, ...] | list[str], flag: str = "--what-if") -> dict[str, float]:
    """``("pcie_GBps=25", "host_scale=0.5")`` -> ``{"pcie_GBps": 25.0, "host_scale": 0.5}`` (checked)."""
    out: dict[str, float] = {}
    for v in values:
        key, sep, num = v.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError("command line", flag, f"{v!r}: write KEY=VALUE, e.g. pcie_GBps=25 "
                                                   f"(keys: {', '.join(KNOBS)})")
        if key not in KNOBS:
            raise InputError("command line", flag, f"unknown what-if {key!r}; known: {', '.join(KNOBS)}")
        try:
            out[key] = float(num)
        except ValueError:
            raise InputError("command line", flag, f"{key}: {num!r} is not a number") from None
    check_what_if(out, "command line", flag)
    return out


def check_what_if(doc: Any, source: str, field: str = "what_if") -> WhatIf:
    """A what-if mapping validated: unknown keys, non-numbers, out-of-range values -> one line."""
    from pydantic import ValidationError

    from .profile import _validation_message

    if not isinstance(doc, dict):
        raise InputError(source, field, "must be a mapping of what-if keys to numbers, e.g. {pcie_GBps: 25}")
    try:
        return WhatIf.model_validate(doc)
    except ValidationError as err:
        sub, msg = _validation_message(err)
        if msg.startswith("Extra inputs are not permitted"):
            msg = f"unknown what-if key; known: {', '.join(KNOBS)}"
        if sub == "(document)":
            raise InputError(source, field, msg) from None
        if field.startswith("--"):          # a flag: name the knob in the message
            raise InputError(source, field, f"{sub}: {msg}") from None
        raise InputError(source, f"{field}.{sub}", msg) from None


# ------------------------------------------------------------------------- the scaling
def _scaled_table(curve: CopyCurve, lat_factor: float, bw_factor: float) -> list[tuple[int, float]]:
    lat_ms = curve.latency_us * 1e-3
    out = []
    for b, ms in curve.table:
        fixed = min(ms, lat_ms)
        out.append((b, max(1e-9, fixed * lat_factor + (ms - fixed) / bw_factor)))
    return out


def scale_curve(curve: CopyCurve, lat_factor: float, bw_factor: float) -> CopyCurve:
    """A copy curve whose latency is times ``lat_factor`` and bandwidth times ``bw_factor``."""
    if lat_factor == 1 and bw_factor == 1:
        return curve
    ci = {}
    if curve.latency_ci95_us is not None:
        ci["latency_ci95_us"] = [x * lat_factor for x in curve.latency_ci95_us]
    if curve.bandwidth_ci95_GBps is not None:
        ci["bandwidth_ci95_GBps"] = [x * bw_factor for x in curve.bandwidth_ci95_GBps]
    return curve.model_copy(update={"latency_us": curve.latency_us * lat_factor,
                                    "bandwidth_GBps": min(MAX_GBPS, curve.bandwidth_GBps * bw_factor),
                                    "table": _scaled_table(curve, lat_factor, bw_factor), **ci})


def pageable_factor(pinned_GBps: float, pageable_GBps: float, link_factor: float) -> float:
    """Bandwidth factor of a pageable copy when the link's is ``link_factor``: the staged copy is
    the host copy then the link (``1/pageable = 1/host + 1/pinned``)."""
    if pageable_GBps >= pinned_GBps:
        return link_factor
    host_inv = 1 / pageable_GBps - 1 / pinned_GBps
    return (1 / pageable_GBps) / (host_inv + 1 / (pinned_GBps * link_factor))


def _copy_factors(p: Profile, w: WhatIf) -> tuple[float, float]:
    pinned = p.copy_.h2d.pinned
    bw = w.pcie_scale if w.pcie_scale is not None else (
        w.pcie_GBps / pinned.bandwidth_GBps if w.pcie_GBps is not None else 1.0)
    lat = w.copy_latency_scale if w.copy_latency_scale is not None else (
        w.copy_latency_us / pinned.latency_us if w.copy_latency_us is not None and pinned.latency_us > 0 else 1.0)
    return lat, bw


def scaled_copy(p: Profile, lat: float, bw: float):
    """Every copy curve of ``p``: latency times ``lat``, link bandwidth times ``bw``."""
    sec = p.copy_
    directions = {}
    for name in ("h2d", "d2h"):
        d = getattr(sec, name)
        if d is None:
            continue
        upd = {"pinned": scale_curve(d.pinned, lat, bw)}
        if d.pageable is not None:
            pf = pageable_factor(d.pinned.bandwidth_GBps, d.pageable.bandwidth_GBps, bw)
            upd["pageable"] = scale_curve(d.pageable, lat, pf)
        directions[name] = d.model_copy(update=upd)
    return sec.model_copy(update=directions)


def _times(table: dict[str, list], f: float) -> dict[str, list]:
    return {k: [(t, max(1e-9, ms * f)) for t, ms in pts] for k, pts in table.items()}


#: an engine style's host terms (measured as the executor meets them), scaled with the host
HOST_STYLE_TERMS = ("host_base_ms", "host_per_expert_ms", "host_per_load_ms")


def scaled_engine(engine: dict, gpu: float, host: float, prefill: float | None = None) -> dict:
    """The engine tables' GPU terms times ``gpu`` (prefill times ``prefill``, default ``gpu``);
    the styles' per-layer host time times ``host``."""
    prefill = gpu if prefill is None else prefill
    if gpu == 1 and host == 1 and prefill == 1:
        return engine

    def grid(g):
        return None if g is None else g.model_copy(update={"ms": [[v * gpu for v in r] for r in g.ms]})
    out = {}
    for name, e in engine.items():
        styles = {s: st.model_copy(update={
            "base_ms": st.base_ms * host, "per_expert_ms": st.per_expert_ms * gpu, "points": [],
            **{k: getattr(st, k) * host for k in HOST_STYLE_TERMS if getattr(st, k, None) is not None}})
            for s, st in e.styles.items()}
        out[name] = e.model_copy(update={
            "decode": grid(e.decode), "decode_gpu": grid(e.decode_gpu), "dense_decode": grid(e.dense_decode),
            "prefill": [(t, ms * prefill) for t, ms in e.prefill], "head": [(b, ms * gpu) for b, ms in e.head],
            "styles": styles})
    return out


def scaled_pool_copies(engine: dict, old_copy, new_copy) -> dict:
    """The engine tables with each model's in situ pool copies (``in_situ.pageable_copy``,
    ``in_situ.pinned_copy``: an expert's copy from the executor's own pool, in ms) scaled as the
    profile's host-to-device curve of that memory kind moves at the pool's bytes, from
    ``old_copy`` to ``new_copy`` (a what-if link, a spec profile's): a measured pool copy is
    the H200's, and the link it crosses is the one the what-if changes."""
    def curve(sec, memory):
        return sec.h2d.pageable if memory == "pageable" and sec.h2d.pageable is not None else sec.h2d.pinned
    out = {}
    for name, e in engine.items():
        situ = e.in_situ
        upd = {}
        for memory in ("pageable", "pinned"):
            pc = None if situ is None else getattr(situ, f"{memory}_copy")
            if pc is not None:
                f = copy_ms_from_curve(curve(new_copy, memory), pc.bytes) / copy_ms_from_curve(curve(old_copy, memory), pc.bytes)
                upd[f"{memory}_copy"] = pc.model_copy(update={"ms": pc.ms * f})
        out[name] = e.model_copy(update={"in_situ": situ.model_copy(update=upd)}) if upd else e
    return out


def apply_what_if(p: Profile, w: WhatIf | dict | None) -> Profile:
    """``p`` with the what-if's terms scaled, renamed ``<name>+what-if`` and its provenance
    saying so (``what_if``: the knobs; ``what_if_of``: the profile it was made from). An empty
    what-if returns ``p`` itself."""
    if w is None:
        return p
    if isinstance(w, dict):
        w = check_what_if(w, "what_if")
    given = w.given()
    if not given:
        return p
    lat, bw = _copy_factors(p, w)
    gpu = w.gpu_compute_scale if w.gpu_compute_scale is not None else 1.0
    cpu = w.cpu_compute_scale if w.cpu_compute_scale is not None else 1.0
    host = w.host_scale if w.host_scale is not None else 1.0
    h = p.host
    hl = h.launch_us
    new_host = h.model_copy(update={
        "launch_us": hl.model_copy(update={"copy_": hl.copy_ * host, "expert": hl.expert * host,
                                           "dense": hl.dense * host}),
        "sync_us": h.sync_us * host, "pageable_tail_us": h.pageable_tail_us * host})
    compute = p.compute.model_copy(update={"gpu": _times(p.compute.gpu, gpu), "cpu": _times(p.compute.cpu, cpu)})
    prov = {**p.provenance, "what_if": given, "what_if_of": p.name}
    copy_ = scaled_copy(p, lat, bw)
    out = p.model_copy(update={
        "name": f"{p.name}+what-if", "provenance": prov, "copy_": copy_, "compute": compute,
        "host": new_host, "engine": scaled_pool_copies(scaled_engine(p.engine, gpu, host), p.copy_, copy_),
        "fit": {}, "measurements": {"what_if_of": p.name}})
    # checked again as a whole: a scaled term past a profile's bounds is one line, not a bad profile
    from .profile import parse_profile

    return parse_profile(out.to_json(), f"what_if on profile {p.name}")


def describe(p: Profile) -> str:
    """The profile as results name it: ``h200 (calibrated)``, ``h200 (calibrated) with
    pcie_GBps=25``, ``l40s-specs (from specs)``."""
    prov = p.provenance
    w = prov.get("what_if")
    base = prov.get("what_if_of", p.name)
    s = f"{base} ({source_kind(p)})"
    if w:
        s += " with " + ", ".join(f"{k}={v:g}" for k, v in w.items())
    return s


def source_kind(p: Profile) -> str:
    """Where a profile's numbers come from: ``from specs`` for profiles derived from public
    specifications (never measured), else the provenance's kind (calibrated, probe, ...)."""
    prov = p.provenance
    return str(prov.get("source") or prov.get("kind") or "?")


#: the knob each knob excludes
PARTNER = {"pcie_GBps": "pcie_scale", "pcie_scale": "pcie_GBps",
           "copy_latency_us": "copy_latency_scale", "copy_latency_scale": "copy_latency_us"}


def merge_what_if(base: Any, flags: dict[str, float]) -> Any:
    """The scenario's what-if mapping with the command line's knobs added; a flag replaces the
    scenario's knob and its exclusive partner (``pcie_GBps`` replaces ``pcie_scale``). A base
    that is not a mapping is left for the scenario's validation to report."""
    if base is None:
        base = {}
    if not isinstance(base, dict):
        return base
    out = {k: v for k, v in base.items() if k not in flags and PARTNER.get(k) not in flags}
    out.update(flags)
    return out
