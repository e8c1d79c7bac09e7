"""Hardware profiles and the cost model the engine reads its durations from.

A profile is a versioned JSON document (format ``simmoe-profile``, version 1)::

    {
      "format": "simmoe-profile", "version": 1, "name": "h100-pcie5-calibrated",
      "provenance": {"kind": "calibrated" | "probe" | "published measurements",
                     "gpu": ..., "pcie": ..., "driver": ..., "cuda": ..., "torch": ...,
                     "host_cpu": ..., "date": ..., "simmoe_version": ..., "notes": ...},
      "copy": {
        "h2d": {"pinned":   {"latency_us": 11.0, "bandwidth_GBps": 55.0,
                             "table": [[bytes, ms], ...]},
                "pageable": {...}},
        "d2h": {"pinned": {...}}                       # optional
      },
      "compute": {
        "gpu": {"768x3072-fp32-gated": [[tokens, ms], ...], ...},
        "cpu": {"768x3072-fp32-gated": [[tokens, ms], ...], ...}   # optional
      },
      "host": {"launch_us": {"copy": 6.0, "expert": 30.0, "dense": 5.0},
               "sync_us": 10.0, "pageable_blocks_host": true},
      "engine": {                                       # optional, per model preset
        "olmoe-1b-7b": {"decode": {"batch": [...], "context": [...], "ms": [[...], ...]},
                        "dense_decode": {...}, "dense_layers": 0,
                        "prefill": [[tokens, ms], ...], "head": [[batch, ms], ...],
                        "styles": {"hf-eager": {"base_ms": ..., "per_expert_ms": ...}, ...}}}
    }

Copy time for ``n`` bytes: the table's value at exactly ``n`` bytes if it has one (calibration
stores expert-sized copies measured back to back, as the executor issues them), else log-log
interpolation in ``table`` inside its range, else ``latency + bytes / bandwidth``. Expert compute time for ``t`` tokens: monotone
(PCHIP) interpolation over ``log(tokens)``, linear extrapolation in tokens past the table.
The ``engine`` tables (the non-expert work around the experts, measured on the real model by
``simmoe calibrate engine``) are read by :mod:`simulator.engine_costs`. The engine never evaluates these per event: :class:`CostModel` freezes them into per-size
and per-token lookup tables before the event loop starts.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InputError
from .safe_load import check_document, load_json

PROFILE_FORMAT = "simmoe-profile"
PROFILE_VERSION = 1
DEFAULT_PROFILE = "h100-pcie5"
MemoryKind = Literal["pinned", "pageable"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


#: physical bounds of a profile's numbers (a copy or expert far slower than a minute, or a
#: link faster than 100 TB/s, is a broken measurement)
MAX_US = 6e7
MAX_MS = 6e4
MAX_GBPS = 1e5
MAX_TABLE_BYTES = 1 << 44
MAX_TABLE_TOKENS = 1 << 24


class CopyCurve(_Strict):
    latency_us: float = Field(ge=0, le=MAX_US)
    bandwidth_GBps: float = Field(ge=1e-3, le=MAX_GBPS)
    latency_ci95_us: list[float] | None = None
    bandwidth_ci95_GBps: list[float] | None = None
    table: list[tuple[int, float]] = Field(default_factory=list, description="[bytes, ms] points")

    @field_validator("latency_ci95_us", "bandwidth_ci95_GBps")
    @classmethod
    def _ci_ok(cls, v):
        if v is not None and (len(v) != 2 or v[0] > v[1]):
            raise ValueError(f"a 95% interval is [low, high] with low <= high, got {v}")
        return v

    @field_validator("table")
    @classmethod
    def _table_ok(cls, v):
        for b, ms in v:
            if not 0 < b <= MAX_TABLE_BYTES or not 1e-9 <= ms <= MAX_MS:
                raise ValueError(f"table point [{b}, {ms}]: bytes must be in 1..{MAX_TABLE_BYTES} "
                                 f"and ms in [1e-9, {MAX_MS:g}]")
        if [b for b, _ in v] != sorted({b for b, _ in v}):
            raise ValueError("table bytes must be strictly increasing")
        return v


class CopyDirection(_Strict):
    pinned: CopyCurve
    pageable: CopyCurve | None = None


class CopySection(_Strict):
    h2d: CopyDirection
    d2h: CopyDirection | None = None
    copy_engines: int = Field(1, ge=1, le=64)


class ComputeSection(_Strict):
    gpu: dict[str, list[tuple[int, float]]]
    cpu: dict[str, list[tuple[int, float]]] = Field(default_factory=dict)

    @field_validator("gpu", "cpu")
    @classmethod
    def _tables_ok(cls, v):
        for key, pts in v.items():
            if not pts:
                raise ValueError(f"{key}: empty table")
            toks = [t for t, _ in pts]
            if toks != sorted(set(toks)) or toks[0] < 1 or toks[-1] > MAX_TABLE_TOKENS:
                raise ValueError(f"{key}: tokens must be in 1..{MAX_TABLE_TOKENS} and strictly increasing")
            if any(not 1e-9 <= ms <= MAX_MS for _, ms in pts):
                raise ValueError(f"{key}: times must be finite, in [1e-9, {MAX_MS:g}] ms")
        return v


class HostLaunch(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    copy_: float = Field(5.0, ge=0, le=MAX_US, alias="copy", description="host time to issue one copy, us")
    expert: float = Field(20.0, ge=0, le=MAX_US, description="host time to issue one expert FFN, us")
    dense: float = Field(5.0, ge=0, le=MAX_US, description="host time to issue a layer's dense work, us")


class HostSection(_Strict):
    launch_us: HostLaunch = Field(default_factory=HostLaunch)
    sync_us: float = Field(10.0, ge=0, le=MAX_US, description="host time of the end-of-step synchronise")
    pageable_blocks_host: bool = Field(
        True, description="a copy from pageable memory returns to the host only when done"
    )
    pageable_tail_us: float = Field(
        0.0, ge=0, le=MAX_US, description="extra host time of the call after a blocking pageable copy, us"
    )
    cpu_path_includes_transfers: bool = Field(
        False, description="compute.cpu times include moving activations to the host and back"
    )


def _axis_ok(name: str, v: list[int]) -> None:
    if not v or v[0] < 1 or v != sorted(set(v)):
        raise ValueError(f"{name} must be >= 1 and strictly increasing")


def _points_ok(pts: list, what: str) -> None:
    _axis_ok(what, [p[0] for p in pts])
    if any(not (p[-1] > 0) or not math.isfinite(p[-1]) for p in pts):
        raise ValueError(f"{what}: times must be positive and finite")


class EngineGrid(_Strict):
    """Non-expert ms per decoder layer over (batch, context): ``ms[i][j]`` at batch[i], context[j]."""

    batch: list[int]
    context: list[int]
    ms: list[list[float]]
    errors: list[list[float]] = Field(default_factory=list, description="per point: table / measured - 1")
    filled: list[tuple[int, int]] = Field(default_factory=list, description="[i, j] cells not measured, extrapolated")
    max_abs_error: float | None = None

    @model_validator(mode="after")
    def _grid_ok(self):
        _axis_ok("batch", self.batch)
        _axis_ok("context", self.context)
        if len(self.ms) != len(self.batch) or any(len(r) != len(self.context) for r in self.ms):
            raise ValueError(f"ms must be {len(self.batch)} rows of {len(self.context)} values")
        if any(not (v > 0) or not math.isfinite(v) for r in self.ms for v in r):
            raise ValueError("ms values must be positive and finite")
        return self


class EngineStyle(_Strict):
    """One layer's routed-expert call in an engine style: ``base_ms + per_expert_ms x active``."""

    base_ms: float = Field(ge=0)
    per_expert_ms: float = Field(ge=0)
    max_abs_error: float | None = None
    points: list[tuple[int, int, float]] = Field(default_factory=list, description="[batch, active, ms]")
    host_base_ms: float | None = Field(None, ge=0, description="host ms per MoE layer (after the router sync)")
    host_per_expert_ms: float | None = Field(None, ge=0, description="host ms per expert compute issued")
    host_per_load_ms: float | None = Field(None, ge=0, description="host ms per copy issued")
    gpu_base_ms: float | None = Field(None, ge=0, description="GPU ms of one call, host ahead (its fixed part)")
    gpu_per_expert_ms: float | None = Field(None, ge=0, description="GPU ms of one call per active expert, host ahead")
    decode: "EngineGrid | None" = Field(None, description="graphed styles: the non-expert decode table replayed "
                                                          "from CUDA graphs (replaces the model's eager one)")
    dense_decode: "EngineGrid | None" = Field(None, description="graphed styles: the dense layers' decode table "
                                                                "replayed from CUDA graphs")


class PoolCopy(_Strict):
    """One expert's copy from the executor's own pool (pageable or pinned), timed back to
    back a layer at a time, as the layer baseline meets it (``calibrate engine --in-situ``)."""

    bytes: int = Field(gt=0, description="the expert's bytes")
    ms: float = Field(gt=0, le=MAX_US, description="ms per copy, median over layers and passes")


class InSitu(_Strict):
    """How a whole decode step meets the isolated tables: factors on the decode table
    (``dense``) and on the style's expert host terms (``experts``), medians of ``points``;
    ``pageable_copy`` and ``pinned_copy`` price this model's expert copies of each kind."""

    dense: float = Field(gt=0, le=100)
    experts: float | None = Field(None, gt=0, le=100)
    styles: dict[str, float] = Field(default_factory=dict, description="a grouped style's own experts factor "
                                                                       "(its resident steps), by style")
    pageable_copy: PoolCopy | None = Field(None, description="an expert's copy from the executor's "
                                           "pageable pool (the profile's pageable curve is scaled to meet it)")
    pinned_copy: PoolCopy | None = Field(None, description="an expert's copy from a pinned pool of the "
                                         "executor's, back to back (the pinned curve is scaled to meet it)")
    route_wait: float | None = Field(None, ge=0, le=1, description="how long the router's read waits behind "
                                     "the copies queued before it, as a fraction of their time (none: 0, "
                                     "no wait)")
    cpu_path: list[tuple[int, float]] = Field(default_factory=list, description="[tokens, ms] of one CPU expert "
                                              "as the real-model executor runs it (in place of compute.cpu)")
    cpu_threads: int | None = Field(None, gt=0, description="torch threads cpu_path was timed with")
    probe_dispatch_us: float | None = Field(None, gt=0, le=MAX_US, description="the host-speed probe beside "
                                            "the in situ steps (us per op issued, median): the host's speed "
                                            "these terms were measured at")
    points: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("cpu_path")
    @classmethod
    def _cpu_path(cls, v: list[tuple[int, float]]) -> list[tuple[int, float]]:
        toks = [t for t, _ in v]
        if toks != sorted(set(toks)) or any(t < 1 for t in toks) or any(not 0 < ms <= MAX_US for _, ms in v):
            raise ValueError("cpu_path must be [tokens, ms] pairs, tokens >= 1 ascending, ms > 0")
        return v

    @field_validator("styles")
    @classmethod
    def _factors(cls, v: dict[str, float]) -> dict[str, float]:
        for k, f in v.items():
            if not (0 < f <= 100):
                raise ValueError(f"styles.{k}: {f} must be in (0, 100]")
        return v


class ModelEngine(_Strict):
    """The engine around the experts of one model (``simmoe calibrate engine``)."""

    decode: EngineGrid
    decode_gpu: EngineGrid | None = Field(None, description="the decode grid's GPU work alone (timed behind a "
                                          "blocker): what a layer costs after the copies it waits behind")
    decode_host: EngineGrid | None = Field(None, description="the decode grid's host part (the issue of its "
                                           "kernels): what the in situ factor scales")
    dense_decode: EngineGrid | None = None
    dense_layers: int = Field(0, ge=0, description="dense decoder layers per step (priced by dense_decode)")
    prefill: list[tuple[int, float]] = Field(default_factory=list, description="[tokens, ms] per layer")
    head: list[tuple[int, float]] = Field(default_factory=list, description="[batch, ms] per step")
    styles: dict[str, EngineStyle] = Field(default_factory=dict)
    source: dict[str, Any] = Field(default_factory=dict)
    in_situ: InSitu | None = Field(None, description="the tables against a whole step (calibrate engine --in-situ)")

    @model_validator(mode="after")
    def _tables_ok(self):
        if self.prefill:
            _points_ok(self.prefill, "prefill tokens")
        if self.head:
            _points_ok(self.head, "head batch")
        if self.dense_layers and self.dense_decode is None:
            raise ValueError("dense_layers given without a dense_decode table")
        return self


class DirectReadTerms(_Strict):
    """An expert computed on the GPU straight from mapped pinned host memory (zero-copy):
    ``latency + nbytes x (1 + per_token_factor x (tokens - 1)) / bandwidth``, never less than
    the expert's compute time from GPU memory (the kernel re-reads weight tiles per block of
    tokens: ``per_token_factor``)."""

    latency_us: float = Field(8.0, ge=0, le=MAX_US)
    bandwidth_GBps: float = Field(40.0, ge=1e-3, le=MAX_GBPS, description="zero-copy reads over PCIe")
    per_token_factor: float = Field(0.02, ge=0, le=1e3, description="extra weight bytes read per extra token, x nbytes")
    points: list[tuple[int, int, float]] = Field(default_factory=list, description="measured [tokens, bytes, ms]")


class DiskCurves(_Strict):
    """Read time of one request by size at queue depth 1 and at ``queue_depth`` requests in flight."""

    qd1: CopyCurve
    qdn: CopyCurve | None = None
    queue_depth: int = Field(4, ge=2, le=1024, description="requests in flight when qdn was measured")


def _disk_default(latency_us: float, gbps1: float, gbpsn: float) -> DiskCurves:
    return DiskCurves(qd1=CopyCurve(latency_us=latency_us, bandwidth_GBps=gbps1),
                      qdn=CopyCurve(latency_us=latency_us * 1.5, bandwidth_GBps=gbpsn / 4), queue_depth=4)


class DiskTerms(_Strict):
    """Reads from a file into host memory: through the page cache (``buffered``) or ``O_DIRECT``."""

    buffered: DiskCurves = Field(default_factory=lambda: _disk_default(90.0, 2.5, 3.0))
    direct: DiskCurves = Field(default_factory=lambda: _disk_default(80.0, 3.0, 6.5))
    device: str = ""


class TierSection(_Strict):
    """Terms of the tiers beyond host memory and plain copies (docs/tiers.md). Each part says
    whether it was measured (``source``) or is simmoe's default figure."""

    dequant: dict[str, CopyCurve] = Field(default_factory=lambda: {
        "int8": CopyCurve(latency_us=10.0, bandwidth_GBps=800.0),
        "fp8": CopyCurve(latency_us=10.0, bandwidth_GBps=800.0),
        "int4": CopyCurve(latency_us=12.0, bandwidth_GBps=450.0)},
        description="GPU dequantise time by quantised bytes, per stored dtype")
    dequant_host_us: dict[Literal["int8", "fp8", "int4"], Annotated[float, Field(ge=0, le=MAX_US)]] = Field(
        default_factory=dict, description="host time to issue one dequantise (us), per stored dtype, "
                                          "measured with it; none: one dense launch (host.launch_us)")
    direct: DirectReadTerms = Field(default_factory=DirectReadTerms)
    disk: DiskTerms = Field(default_factory=DiskTerms)
    source: dict[str, str] = Field(default_factory=lambda: {
        "dequant": "default", "direct": "default", "disk": "default"},
        description="per part: 'default' (simmoe's figure) or where it was measured")


class PeerLink(_Strict):
    """The GPUs' peer link (docs/multigpu.md). The default is NVLink 4's specification on an
    H200 (18 links, ~450 GB/s per direction), not a measurement, until calibrated (issue 17)."""

    bandwidth_GBps: float = Field(450.0, gt=0, description="per GPU, per direction")
    latency_us: float = Field(10.0, ge=0, description="per all-to-all (launch and synchronisation)")
    source: str = Field("spec default (NVLink 4, H200): not measured", description="where the figures come from")


class GpusSection(_Strict):
    peer: PeerLink = Field(default_factory=PeerLink)


class Profile(_Strict):
    format: Literal["simmoe-profile"]
    version: int
    name: str
    provenance: dict[str, Any]
    copy_: CopySection = Field(alias="copy")
    compute: ComputeSection
    host: HostSection = Field(default_factory=HostSection)
    fit: dict[str, Any] = Field(default_factory=dict, description="per-point fit errors")
    measurements: dict[str, Any] = Field(default_factory=dict, description="raw statistics")
    engine: dict[str, ModelEngine] = Field(default_factory=dict, description="per model preset: the engine around the experts")
    tiers: TierSection = Field(default_factory=TierSection, description="quantised, direct-read and disk terms")
    gpus: GpusSection | None = Field(None, description="several GPUs: the peer link (none: PeerLink's spec default)")

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    @field_validator("version")
    @classmethod
    def _version_ok(cls, v):
        if v != PROFILE_VERSION:
            raise ValueError(f"unsupported profile version {v} (this simmoe reads {PROFILE_VERSION})")
        return v

    def to_json(self) -> dict:
        return self.model_dump(by_alias=True, mode="json", exclude_none=True)


def builtin_profiles() -> list[str]:
    d = resources.files("simulator") / "profiles"
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".json"))


def _validation_message(err: ValidationError) -> tuple[str, str]:
    e = err.errors()[0]
    field = ".".join(str(x) for x in e["loc"]) or "(document)"
    msg = e["msg"].removeprefix("Value error, ")
    more = len(err.errors()) - 1
    return field, msg + (f" (+{more} more)" if more else "")


def parse_profile(doc: Any, source: str) -> Profile:
    if not isinstance(doc, dict):
        raise InputError(source, "(document)", "a profile must be a JSON object")
    if doc.get("format") != PROFILE_FORMAT:
        raise InputError(source, "format", f"not a simmoe profile (expected format {PROFILE_FORMAT!r})")
    check_document(doc, source)
    try:
        return Profile.model_validate(doc)
    except ValidationError as err:
        field, msg = _validation_message(err)
        raise InputError(source, field, msg) from None


def load_profile(name_or_path: str | Path | None = None, source: str = "--profile") -> Profile:
    """A built-in profile by name, or a profile JSON file by path; ``source`` names where the
    name came from in an unknown-name error (a flag, an argument)."""
    ref = str(name_or_path or DEFAULT_PROFILE)
    if ref in builtin_profiles():
        text = (resources.files("simulator") / "profiles" / f"{ref}.json").read_text()
        return parse_profile(json.loads(text), f"profile {ref}")
    p = Path(ref)
    if not p.exists():
        if p.suffix == "" and "/" not in ref:
            raise InputError(
                "command line", source,
                f"unknown profile {ref!r}; built in: {', '.join(builtin_profiles())}, or give a path",
            )
        raise InputError(str(p), "profile", "file not found")
    return parse_profile(load_json(p, "profile"), str(p))


def profile_summary(p: Profile) -> list[str]:
    """A profile in a few lines (``simmoe profile show``; ``--json`` prints everything)."""
    prov = p.provenance
    where = ", ".join(str(prov[k]) for k in ("gpu", "pcie", "date") if prov.get(k))
    lines = [f"{p.name}: {prov.get('kind', '?')}" + (f" ({where})" if where else "")]
    if prov.get("source") == "from specs":
        sp = prov.get("specs", {})
        lines.append(f"  NOT MEASURED: {prov.get('derived_from')}'s calibration scaled to public specs: link "
                     f"{sp.get('link_GBps')} GB/s, memory {sp.get('memory_GBps')} GB/s, bf16 {sp.get('bf16_TFLOPS')} "
                     f"TFLOPS, fp32 {sp.get('fp32_TFLOPS')} TFLOPS ({prov.get('spec_source')})")
    if prov.get("what_if"):
        lines.append(f"  what-if of {prov.get('what_if_of')}: "
                     + ", ".join(f"{k}={v:g}" for k, v in prov["what_if"].items()))
    for direction in ("h2d", "d2h"):
        curves = getattr(p.copy_, direction)
        for memory in ("pinned", "pageable"):
            c = getattr(curves, memory) if curves is not None else None
            if c is None:
                continue
            lines.append(f"  copy {direction} {memory}: {c.bandwidth_GBps:.1f} GB/s, {c.latency_us:.1f} us latency"
                         f" ({len(c.table)} measured sizes)")
    h = p.host
    lau = h.launch_us
    lines.append(f"  copy engines: {p.copy_.copy_engines}; host: issue copy {lau.copy_:.1f} us, expert "
                 f"{lau.expert:.1f} us, dense {lau.dense:.1f} us; sync {h.sync_us:.1f} us")
    for side, table in (("gpu", p.compute.gpu), ("cpu", p.compute.cpu)):
        for shape, pts in sorted((table or {}).items()):
            lines.append(f"  compute {side} {shape}: {len(pts)} token counts, {pts[0][0]}..{pts[-1][0]} tokens "
                         f"({pts[0][1]:.3f}..{pts[-1][1]:.3f} ms)")
    if p.engine:
        lines.append(f"  engine tables: {', '.join(sorted(p.engine))}")
    return lines


# --------------------------------------------------------------------------- cost model


def copy_ms_from_curve(curve: CopyCurve, nbytes: int) -> float:
    """Copy time of ``nbytes`` from one fitted/measured curve."""
    if nbytes <= 0:
        return 0.0
    tbl = curve.table
    for b, ms in tbl:          # a size measured as such (e.g. an expert-sized copy train)
        if b == nbytes:
            return ms
    if len(tbl) >= 2 and tbl[0][0] <= nbytes <= tbl[-1][0]:
        xs = np.log([b for b, _ in tbl])
        ys = np.log([ms for _, ms in tbl])
        return float(np.exp(np.interp(math.log(nbytes), xs, ys)))
    return curve.latency_us * 1e-3 + nbytes / (curve.bandwidth_GBps * 1e9) * 1e3


def isotonic(y: np.ndarray) -> np.ndarray:
    """Least-squares non-decreasing fit (pool adjacent violators): more tokens never cost less."""
    blocks: list[list[float]] = []  # [mean, weight]
    for v in y:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2 = blocks.pop()
            m1, w1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return np.concatenate([np.full(int(w), m) for m, w in blocks])


def compute_table_ms(points: list[tuple[int, float]], max_tokens: int) -> np.ndarray:
    """``out[t]`` = time for ``t`` tokens, ``t`` in 0..max_tokens (``out[0] = 0``)."""
    from scipy.interpolate import PchipInterpolator

    toks = np.array([t for t, _ in points], dtype=float)
    ms = isotonic(np.array([m for _, m in points], dtype=float))
    out = np.zeros(max_tokens + 1)
    t = np.arange(1, max_tokens + 1, dtype=float)
    if len(toks) == 1:
        out[1:] = ms[0] * np.maximum(1.0, t / toks[0])
        return out
    inside = t <= toks[-1]
    f = PchipInterpolator(np.log(toks), ms, extrapolate=False)
    vals = np.empty_like(t)
    vals[inside] = f(np.log(np.clip(t[inside], toks[0], toks[-1])))
    # past the table: linear in tokens through the last two points (never below the last)
    slope = max(0.0, (ms[-1] - ms[-2]) / (toks[-1] - toks[-2]))
    vals[~inside] = ms[-1] + slope * (t[~inside] - toks[-1])
    out[1:] = vals
    return out


@dataclass
class CostModel:
    """Durations (ms) the engine uses, frozen into lookups before the event loop.

    Built for one model shape and one profile; every query is a dict or array lookup.
    """

    profile: Profile
    shape_key: str
    expert_bytes: int
    activation_bytes_per_token: int
    max_tokens: int

    def __post_init__(self) -> None:
        gpu = self.profile.compute.gpu
        if self.shape_key not in gpu:
            raise InputError(
                f"profile {self.profile.name}", f"compute.gpu.{self.shape_key}",
                f"no expert compute table for this model's expert shape "
                f"(profile has: {', '.join(sorted(gpu)) or 'none'}); "
                f"calibrate it with: simmoe calibrate --model <preset>",
            )
        self.gpu_expert = compute_table_ms(gpu[self.shape_key], self.max_tokens)
        cpu = self.profile.compute.cpu.get(self.shape_key)
        self.cpu_expert = compute_table_ms(cpu, self.max_tokens) if cpu else None
        self._copy_cache: dict[tuple[int, str, str], float] = {}
        h = self.profile.host
        self.launch_copy = h.launch_us.copy_ * 1e-3
        self.launch_expert = h.launch_us.expert * 1e-3
        self.launch_dense = h.launch_us.dense * 1e-3
        self.sync = h.sync_us * 1e-3
        self.pageable_blocks_host = h.pageable_blocks_host
        self.pageable_tail = h.pageable_tail_us * 1e-3
        self.cpu_path_includes_transfers = h.cpu_path_includes_transfers

    def copy_ms(self, nbytes: int, memory: str = "pinned", direction: str = "h2d") -> float:
        key = (nbytes, memory, direction)
        v = self._copy_cache.get(key)
        if v is None:
            sec = self.profile.copy_.h2d if direction == "h2d" else (self.profile.copy_.d2h or self.profile.copy_.h2d)
            curve = sec.pageable if (memory == "pageable" and sec.pageable is not None) else sec.pinned
            v = self._copy_cache[key] = copy_ms_from_curve(curve, nbytes)
        return v

    def cpu_path_ms(self, tokens: int) -> float:
        """A CPU expert as the host sees it: the FFN on the CPU, and (unless the table includes
        them) the activations down and the result up."""
        dur = self.cpu_expert_ms(tokens)
        if not self.cpu_path_includes_transfers:
            nb = self.activation_bytes_per_token * tokens
            dur += self.copy_ms(nb, "pinned", "d2h") + self.copy_ms(nb, "pinned")
        return dur

    def dequant_ms(self, nbytes: int, dtype: str) -> float:
        """GPU time to dequantise ``nbytes`` of quantised expert (``dtype``: int8, fp8, int4)."""
        curve = self.profile.tiers.dequant.get(dtype)
        if curve is None:
            raise InputError(f"profile {self.profile.name}", f"tiers.dequant.{dtype}",
                             f"no dequantise timings for {dtype} (profile has: "
                             f"{', '.join(sorted(self.profile.tiers.dequant)) or 'none'}); "
                             "calibrate with: simmoe calibrate tiers")
        return copy_ms_from_curve(curve, nbytes)

    def dequant_host_ms(self, dtype: str) -> float | None:
        """Host time to issue one dequantise of ``dtype`` (its kernels' launches), where measured."""
        us = self.profile.tiers.dequant_host_us.get(dtype)
        return None if us is None else us * 1e-3

    def direct_ms(self, tokens: int, nbytes: int) -> float:
        """An expert over ``tokens`` tokens computed from mapped host memory (``nbytes`` read)."""
        d = self.profile.tiers.direct
        read = d.latency_us * 1e-3 + nbytes * (1.0 + d.per_token_factor * max(0, tokens - 1)) / (d.bandwidth_GBps * 1e6)
        gpu = self.expert_ms(tokens)
        return read if read > gpu else gpu

    def read_ms(self, nbytes: int, io: str, queue_depth: int) -> float:
        """One disk read of ``nbytes`` into host memory with ``queue_depth`` requests in flight:
        the qd1 curve at depth 1; between 1 and the measured depth N, linear in the depth
        between the two curves; past N, the qdn time x depth / N (the disk is saturated)."""
        c = getattr(self.profile.tiers.disk, io)
        one = copy_ms_from_curve(c.qd1, nbytes)
        if queue_depth <= 1 or c.qdn is None:
            return one
        n = c.queue_depth
        many = copy_ms_from_curve(c.qdn, nbytes)
        if queue_depth <= n:
            return one + (many - one) * (queue_depth - 1) / (n - 1)
        return many * queue_depth / n

    def expert_ms(self, tokens: int) -> float:
        if tokens <= self.max_tokens:
            return float(self.gpu_expert[tokens])
        return float(compute_table_ms(self.profile.compute.gpu[self.shape_key], tokens)[tokens])

    def require_cpu(self) -> None:
        if self.cpu_expert is None:
            raise InputError(
                f"profile {self.profile.name}", f"compute.cpu.{self.shape_key}",
                "the cpu miss policy needs CPU expert timings for this shape; "
                "calibrate with: simmoe calibrate --device cpu",
            )

    def cpu_expert_ms(self, tokens: int) -> float:
        self.require_cpu()
        if tokens <= self.max_tokens:
            return float(self.cpu_expert[tokens])
        return float(compute_table_ms(self.profile.compute.cpu[self.shape_key], tokens)[tokens])


@lru_cache(maxsize=32)
def _cached_profile(ref: str) -> Profile:
    return load_profile(ref)
