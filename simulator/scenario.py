"""The scenario: one immutable object from the YAML file to the results.

A scenario names a model, a hardware profile, a routing trace (synthetic, a saved trace, or
real recorded sequences), the batch sizes and the policies to compare. Every key is checked:
unknown keys, wrong types, out-of-range numbers and unknown policy names raise
:class:`~simulator.errors.InputError` with the file and the dotted field. The *effective*
scenario (defaults filled in, model preset expanded) is written next to every result.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, ValidationInfo, field_serializer, field_validator,
    model_validator,
)

from .errors import InputError
from .models import MAX_DENSE_MS, MAX_EXPERTS, MAX_LAYERS, PRESETS, ModelSpec
from .names import check_name
from .safe_load import load_yaml
from .policies import EVICTION_POLICIES, LOAD_MODES, MISS_POLICIES, PREFETCH_POLICIES
from .policies.placement import PLACEMENT_POLICIES
from .serving.spec import PhaseSpec, WorkloadSpec, check_workload
from .traces.synthetic import GENERATOR_VERSION, GENERATOR_VERSIONS, GENERATORS
from .what_if import WhatIf, merge_what_if


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


#: physical bounds of a scenario (beyond them a run is absurd, whatever the machine)
MAX_BATCH = 1 << 20             # tokens of one step of one sequence group
MAX_STEPS = 10**7
MAX_PROMPT = 1 << 20
MAX_LIST = 1000                 # batch sizes, policies
MAX_SEED = 2**63 - 1
#: a GPU cache larger than this is not a GPU (the largest hold ~0.2 TiB)
MAX_CACHE_BYTES = 1 << 44
#: host memory for experts beyond this is not a host (the largest hold a few TiB)
MAX_HOST_BYTES = 1 << 48


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def parse_bytes(v: str) -> int:
    m = _SIZE.match(v)
    if not m or len(m.group(1)) > 20:
        raise ValueError(f"{v!r} is not a size (write e.g. 64, '4 GiB' or '500MB')")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _known(kind: str, table: dict, name: str) -> str:
    if name not in table:
        raise ValueError(f"unknown {kind} policy {name!r}; known: {', '.join(table)}")
    return name


class SequencesSpec(_Strict):
    """Real recorded sequences, batched B side by side (see ``simulator.traces.real``)."""

    path: str
    format: str = "auto"
    max_sequences: int | None = Field(None, gt=0, le=10**9)
    prefill: bool = False
    split: Literal["all", "train", "test"] = "all"
    download: str | None = Field(None, max_length=500,
                                 description="where to get the trace; the error for a missing path says it")


KNOBS = ("zipf", "temporal", "batch_locality", "batch_pool", "cross_layer", "locality")
MAX_CONTEXT = 10_000_000  # tokens; past this a context is a typo


class TraceSpec(_Strict):
    generator: str | None = Field(None, description="synthetic generator name")
    path: str | None = Field(None, description="a saved .npz trace, used as is")
    sequences: SequencesSpec | None = None
    steps: int = Field(64, gt=0, le=MAX_STEPS, description="decode steps per run")
    prefill_tokens: int = Field(0, ge=0, le=MAX_PROMPT)
    prompt_tokens: int | None = Field(None, ge=0, le=MAX_CONTEXT,
                                      description="context the decode starts from (default: prefill_tokens)")
    zipf: float = Field(0.0, ge=0, le=100)
    temporal: float = Field(0.0, ge=0, le=1)
    batch_locality: float = Field(0.0, ge=0, le=1)
    batch_pool: int | None = Field(None, gt=0, le=MAX_BATCH)
    cross_layer: float = Field(0.0, ge=0, le=1)
    locality: float = Field(0.0, ge=0, le=1, description="item_copy: share of a later item's experts copied")
    generator_version: int = Field(
        GENERATOR_VERSION, description="synthetic sampler version: 3 (default: no random key per expert when "
                                       "experts > 8 x top_k), 2 (vectorised, Gumbel keys) or 1 (simmoe 0.1's draw "
                                       "order); 1 and 2 reproduce their traces bit for bit")

    @field_validator("generator_version")
    @classmethod
    def _version_known(cls, v):
        if v not in GENERATOR_VERSIONS:
            raise ValueError(f"unknown generator version {v}; known: {', '.join(map(str, GENERATOR_VERSIONS))}")
        return v

    @field_validator("generator")
    @classmethod
    def _gen_known(cls, v):
        if v is not None and v not in GENERATORS:
            raise ValueError(f"unknown generator {v!r}; known: {', '.join(GENERATORS)}")
        return v

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("generator", "path", "sequences") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of generator, path, sequences")
        if self.prompt_tokens is not None and self.prefill_tokens and self.prompt_tokens != self.prefill_tokens:
            raise ValueError(f"prompt_tokens ({self.prompt_tokens}) differs from prefill_tokens "
                             f"({self.prefill_tokens}): the prefill step is the prompt")
        if self.generator:
            allowed = GENERATORS[self.generator]
            for knob in KNOBS:
                val = getattr(self, knob)
                if val and knob not in allowed:
                    raise ValueError(f"generator {self.generator!r} has no knob {knob!r} "
                                     f"(it takes: {', '.join(sorted(allowed)) or 'none'}; 'mixed' takes all but locality)")
        return self

    @property
    def knobs(self) -> dict:
        return {k: getattr(self, k) for k in KNOBS}


def checked_capacity(v, max_bytes: int, holder: str):
    """A capacity in experts (a positive int) or bytes (``'4 GiB'``, kept as ``'<n>B'``), at
    most ``max_bytes`` of the ``holder``'s memory."""
    if isinstance(v, str):
        v = parse_bytes(v)
        if v <= 0:
            raise ValueError("capacity must be positive")
        if v > max_bytes:
            raise ValueError(f"{v:,} bytes is more than any {holder} holds (at most {max_bytes:,})")
        return f"{v}B"
    if v is not None and v <= 0:
        raise ValueError("capacity must be a positive number of experts")
    return v


class CacheSpec(_Strict):
    kind: str = "none"
    capacity: StrictInt | str | None = Field(None, description="experts (int) or bytes ('4 GiB')")
    scope: Literal["global", "per-layer"] = "global"
    staging: StrictInt | None = Field(None, gt=0, le=MAX_EXPERTS * MAX_LAYERS,
                                      description="static-hot: slots left for non-hot experts")

    @field_validator("kind")
    @classmethod
    def _kind(cls, v):
        return _known("cache", EVICTION_POLICIES, v)

    @field_validator("capacity")
    @classmethod
    def _cap(cls, v):
        return checked_capacity(v, MAX_CACHE_BYTES, "GPU")

    @model_validator(mode="after")
    def _needs_capacity(self):
        if self.kind != "none" and self.capacity is None:
            raise ValueError(f"cache kind {self.kind!r} needs a capacity")
        return self

    def slots(self, expert_bytes: int) -> int | None:
        if self.capacity is None:
            return None
        if isinstance(self.capacity, str):
            return int(self.capacity[:-1]) // expert_bytes
        return int(self.capacity)


class PrefetchSpec(_Strict):
    kind: str = "none"
    budget: StrictInt | None = Field(None, gt=0, le=MAX_EXPERTS, description="most experts prefetched per layer")
    accuracy: float = Field(0.8, ge=0, le=1, description="'predicted': chance each expert is right")
    options: dict[str, Any] = Field(default_factory=dict, description="extra options of the policy")

    @field_validator("kind")
    @classmethod
    def _kind(cls, v):
        return _known("prefetch", PREFETCH_POLICIES, v)

    @field_validator("options")
    @classmethod
    def _options_known(cls, v, info: ValidationInfo):
        kind = info.data.get("kind")
        if kind in PREFETCH_POLICIES:
            PREFETCH_POLICIES[kind].check_options(v)
        return v


class MissSpec(_Strict):
    kind: str = "copy"
    max_tokens: StrictInt | None = Field(None, gt=0, le=1 << 40,
                                         description="cpu, direct: only misses with this many tokens or fewer")
    choices: list[Literal["copy", "direct", "cpu"]] | None = Field(
        None, min_length=1, description="cheapest: the choices it picks from (default all three)")

    @field_validator("kind")
    @classmethod
    def _kind(cls, v):
        return _known("miss", MISS_POLICIES, v)

    @model_validator(mode="after")
    def _options_fit(self):
        if self.choices is not None and self.kind != "cheapest":
            raise ValueError(f"choices is an option of miss kind 'cheapest', not {self.kind!r}")
        if self.max_tokens is not None and self.kind not in ("cpu", "direct"):
            raise ValueError(f"max_tokens is an option of miss kinds 'cpu' and 'direct', not {self.kind!r}")
        return self


class HostTierSpec(_Strict):
    """Host memory as a cache of experts over a disk tier (docs/tiers.md)."""

    kind: str = "lru"
    capacity: StrictInt | str = Field(description="experts (int) or bytes ('64 GiB') of host memory for experts")
    lookahead: StrictInt = Field(0, ge=0, le=MAX_LAYERS,
                                 description="read the prefetch policy's picks for the layer this many ahead from disk")

    @field_validator("kind")
    @classmethod
    def _kind(cls, v):
        return _known("cache", EVICTION_POLICIES, v)

    @field_validator("capacity")
    @classmethod
    def _cap(cls, v):
        return checked_capacity(v, MAX_HOST_BYTES, "host")

    def slots(self, stored_bytes: int) -> int:
        if isinstance(self.capacity, str):
            return int(self.capacity[:-1]) // stored_bytes
        return int(self.capacity)


class DiskSpec(_Strict):
    io: Literal["buffered", "direct"] = Field("direct", description="page cache, or O_DIRECT into pinned host slots")
    queue_depth: StrictInt = Field(1, ge=1, le=1024, description="reads in flight (disk lanes)")


class ServingPolicySpec(PhaseSpec):
    prefill_prefetch: PrefetchSpec | None = Field(None, description="prefetch of steps with prefill tokens "
                                                                   "(default: the policy's prefetch)")


class PolicySpec(_Strict):
    name: str
    load: str = "dedup"
    cache: CacheSpec = Field(default_factory=CacheSpec)
    prefetch: PrefetchSpec = Field(default_factory=PrefetchSpec)
    miss: MissSpec = Field(default_factory=MissSpec)
    memory: Literal["pinned", "pageable"] = "pinned"
    serving: ServingPolicySpec = Field(default_factory=ServingPolicySpec,
                                       description="phase-aware knobs of a serving run (docs/serving.md)")
    expert_dtype: Literal["int8", "fp8", "int4"] | None = Field(
        None, description="experts below the GPU (host, disk) stored quantised; dequantised on the GPU")
    host: HostTierSpec | None = Field(None, description="host memory as a cache over a disk tier")
    disk: DiskSpec | None = Field(None, description="how the disk tier is read (needs host)")

    @field_validator("load")
    @classmethod
    def _load(cls, v):
        return _known("load", LOAD_MODES, v)

    @field_validator("miss", mode="before")
    @classmethod
    def _miss_str(cls, v):
        return {"kind": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _prefetch_needs_cache(self):
        if self.prefetch.kind != "none" and self.cache.kind == "none":
            raise ValueError("prefetch needs a cache to hold what it fetches (cache.kind is 'none')")
        if self.disk is not None and self.host is None:
            raise ValueError("disk needs a host tier (give host: {kind, capacity})")
        if self.host is not None and self.host.lookahead and self.prefetch.kind == "none":
            raise ValueError("host.lookahead reads the prefetch policy's picks: give a prefetch kind")
        m = self.miss
        reads_direct = m.kind == "direct" or (m.kind == "cheapest" and "direct" in (m.choices or ("direct",)))
        if self.memory == "pageable" and reads_direct:
            raise ValueError("direct host reads need pinned (mapped) memory, not pageable")
        return self

    @property
    def tiered(self) -> bool:
        """Anything beyond plain copies from host memory: quantised copies, a disk tier, or a
        miss policy other than copy and cpu."""
        return self.expert_dtype is not None or self.host is not None or self.miss.kind in ("direct", "cheapest")


_SHAPE_KEYS = {"num_layers", "num_experts", "top_k", "hidden", "ffn", "gated", "shared_experts"}


class EngineSpec(_Strict):
    style: Literal["twin", "hf-eager", "grouped", "graphs", "offload", "offload-grouped", "offload-graphs"] = Field(
        "twin", description="what runs around the experts: simmoe's twin, or a real engine priced by the profile's "
                            "engine tables (grouped styles issue a layer's ready experts in one call)")
    dense_ms_per_layer: float | None = Field(None, ge=0, le=MAX_DENSE_MS, description="overrides the model's (and, in any style, the engine tables)")
    warmup_steps: StrictInt = Field(0, ge=0, le=MAX_STEPS, description="first steps left out of the statistics")


MAX_GPUS = 64


class GpusSpec(_Strict):
    """Several GPUs, simulated (docs/multigpu.md)."""

    count: StrictInt = Field(1, ge=1, le=MAX_GPUS, description="GPUs, each with its own cache, copy and compute stream")
    placement: str = Field("round-robin", description="expert-parallel: which GPU holds each expert")
    mode: Literal["expert-parallel", "replicate"] = Field(
        "expert-parallel", description="tokens sent to the GPU holding their expert, or experts copied to "
                                       "the GPU of the tokens (tokens split evenly)")
    peer_GBps: float | None = Field(None, gt=0, le=100_000, description="peer link bandwidth per direction "
                                                                        "(default: the profile's gpus.peer)")
    peer_latency_us: float | None = Field(None, ge=0, le=1e6, description="per all-to-all (default: the profile's)")
    shared_pcie: StrictBool = Field(False, description="host copies (and direct reads) of all GPUs share one host link")
    shared_host: StrictBool = Field(True, description="one host CPU (CPU experts) and one staging of pageable copies "
                                                      "for all GPUs; false: one each (an idealisation to compare with)")
    peer_fetch: StrictBool = Field(False, description="replicate: a miss whose expert sits in a peer GPU's cache is "
                                                      "fetched over the peer link when that ends sooner")

    @field_validator("placement")
    @classmethod
    def _placement(cls, v):
        return _known("placement", PLACEMENT_POLICIES, v)

    @model_validator(mode="after")
    def _placement_needs_ep(self):
        if self.mode == "replicate" and "placement" in self.model_fields_set:
            raise ValueError("placement applies to mode expert-parallel; replicate copies experts to every GPU")
        if self.peer_fetch and self.mode != "replicate":
            raise ValueError("peer_fetch applies to mode replicate (expert-parallel GPUs hold distinct experts)")
        return self


class Scenario(_Strict):
    name: str
    description: str = ""
    model: ModelSpec
    profile: str | None = Field(None, description="built-in profile name or path; default h100-pcie5")
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED)
    replications: StrictInt = Field(3, ge=1, le=1000)
    batch_sizes: list[StrictInt] = Field(min_length=1, max_length=MAX_LIST)
    trace: TraceSpec
    policies: list[PolicySpec] = Field(min_length=1, max_length=MAX_LIST)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    baseline: str | None = Field(None, description="policy the decision summary's speed-up is relative to "
                                                   "(default: the fastest policy without a cache)")
    workload: WorkloadSpec | None = Field(None, description="serving: request arrivals, lengths, scheduler, "
                                                           "SLO (docs/serving.md); each batch size is a max batch")
    what_if: WhatIf | None = Field(None, description="hardware what-if: the profile's terms scaled "
                                                     "(simulator.what_if; e.g. {pcie_GBps: 25})")
    gpus: GpusSpec | None = Field(None, description="several GPUs, simulated (docs/multigpu.md)")

    @field_serializer("what_if")
    def _what_if_given(self, w):
        return None if w is None else w.given()   # the knobs set, not every knob as null

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return check_name(v)   # it names the results folder: never a path

    @field_validator("model", mode="before")
    @classmethod
    def _resolve_model(cls, v):
        if isinstance(v, str):
            if v not in PRESETS:
                raise ValueError(f"unknown model preset {v!r}; known: {', '.join(PRESETS)}")
            return PRESETS[v]
        if isinstance(v, dict) and "preset" in v:
            v = dict(v)
            name = v.pop("preset")
            if name not in PRESETS:
                raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
            base = PRESETS[name].model_dump()
            unknown = set(v) - set(base)
            if unknown:
                raise ValueError(f"unknown model key {sorted(unknown)[0]!r}")
            base.update(v)
            if "arch" not in v and set(v) & _SHAPE_KEYS:
                base["arch"] = None  # the public architecture no longer describes the changed shape
            if "name" not in v:
                base["name"] = name + ("+custom" if v else "")
            return base
        return v

    @field_validator("batch_sizes")
    @classmethod
    def _bs(cls, v):
        for b in v:
            if b <= 0:
                raise ValueError(f"batch size {b} must be positive")
            if b > MAX_BATCH:
                raise ValueError(f"batch size {b} is more than {MAX_BATCH:,} tokens per step")
        if len(set(v)) != len(v):
            raise ValueError("batch sizes repeat")
        return v

    @field_validator("policies")
    @classmethod
    def _names(cls, v):
        seen: set[str] = set()
        dup = {p.name for p in v if p.name in seen or seen.add(p.name)}
        if dup:
            raise ValueError(f"policy name {sorted(dup)[0]!r} used twice")
        return v

    @property
    def dense_ms(self) -> float:
        d = self.engine.dense_ms_per_layer
        return self.model.dense_ms_per_layer if d is None else d

    def effective(self) -> dict:
        """The scenario with every default filled in (written next to results)."""
        doc = self.model_dump(mode="json")
        if self.gpus is None:               # one GPU: the effective scenario as before
            doc.pop("gpus")
        if self.workload is None:           # a plain (lockstep) run's effective scenario as before
            doc.pop("workload")
            for p in doc["policies"]:
                if p["serving"] == _DEFAULT_SERVING:
                    p.pop("serving")
        return doc


_DEFAULT_SERVING = ServingPolicySpec().model_dump(mode="json")


def _error_from_pydantic(err: ValidationError, source: str) -> InputError:
    e = err.errors()[0]
    loc = [str(x) for x in e["loc"]]
    # policies.0.cache -> policies[0].cache; drop pydantic's union-branch tags
    parts: list[str] = []
    for x in loc:
        if x.isdigit() and parts:
            parts[-1] += f"[{x}]"
        elif x in ("str", "int", "function-after[_cap(), union[int,str]]") or x.startswith(("function-", "union[", "int", "str")) and parts:
            continue
        else:
            parts.append(x)
    field = ".".join(parts) or "(document)"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "missing":
        msg = "required key missing"
    return InputError(source, field, msg)


def check_bounds(sc: Scenario, source: str) -> Scenario:
    """The bounds that depend on two fields: the baseline names a policy, a cache holds no more
    slots than the model has experts (in all layers; per layer for ``per-layer``), a prefetch
    budget no more than a layer's experts, and the warm-up leaves at least one step to measure."""
    m = sc.model
    for i, pol in enumerate(sc.policies):
        c = pol.cache
        slots = c.slots(m.expert_bytes)
        most = m.num_experts if c.scope == "per-layer" else m.num_layers * m.num_experts
        where = "per layer" if c.scope == "per-layer" else "in all layers"
        if slots is not None and slots > most:
            size = f" ({most * m.expert_bytes:,} bytes)" if isinstance(c.capacity, str) else ""
            raise InputError(source, f"policies[{i}].cache.capacity",
                             f"{slots:,} expert slots, but model {m.name} has only {most:,} experts {where}"
                             f"{size}: give at most that")
        check_tiers(pol, m, source, f"policies[{i}]")
        if pol.prefetch.budget is not None and pol.prefetch.budget > m.num_experts:
            raise InputError(source, f"policies[{i}].prefetch.budget",
                             f"{pol.prefetch.budget} is more than the {m.num_experts} experts of a layer")
    check_workload(sc, source)
    check_gpus(sc, source)
    names = [p.name for p in sc.policies]
    if sc.baseline is not None and sc.baseline not in names:
        raise InputError(source, "baseline", f"{sc.baseline!r} is not a policy of this scenario; known: {', '.join(names)}")
    if sc.trace.path is None and sc.engine.warmup_steps >= sc.trace.steps:
        raise InputError(source, "engine.warmup_steps",
                         f"{sc.engine.warmup_steps} leaves none of the trace's {sc.trace.steps} steps "
                         "to measure (give fewer than trace.steps)")
    return sc


#: host cache kinds one host memory runs for several GPUs' planners (simulator.multigpu): they
#: order residents by their own calls (LRU, FIFO) or keep nothing (none); LFU, static-hot and
#: Belady read one planner's request clock or stream
SHARED_HOST_KINDS = ("lru", "fifo", "none")


def check_gpus(sc: Scenario, source: str) -> None:
    """What the several-GPU simulation (:mod:`simulator.multigpu`) times: lockstep runs (not
    serving workloads) in every engine style, pinned or pageable copies and the tiers; a disk
    tier's one host memory is shared by the GPUs' planners (kinds that order residents by their
    own calls); peer fetch moves the GPU cache's full experts, so not with quantised copies or a
    disk tier."""
    g = sc.gpus
    if g is None:
        return
    if sc.workload is not None:
        raise InputError(source, "gpus", "a serving workload is not simulated on several GPUs yet")
    if g.mode == "expert-parallel" and g.count > sc.model.num_experts:
        raise InputError(source, "gpus.count", f"{g.count} GPUs, but model {sc.model.name} has only "
                                               f"{sc.model.num_experts} experts per layer to place")
    for i, pol in enumerate(sc.policies):
        if g.peer_fetch and g.count > 1 and (pol.expert_dtype is not None or pol.host is not None):
            raise InputError(source, f"policies[{i}]", "peer_fetch copies a peer's full-precision expert: not "
                                                       "simulated with expert_dtype or a host/disk tier yet")
        if pol.host is not None and g.count > 1 and pol.host.kind not in SHARED_HOST_KINDS:
            raise InputError(source, f"policies[{i}].host.kind",
                             f"{pol.host.kind!r}: one host memory shared by several GPUs is simulated with "
                             "host kinds lru, fifo and none (the others read one planner's request stream)")


def check_tiers(pol: PolicySpec, m: ModelSpec, source: str, where: str) -> None:
    """The tier keys' bounds that depend on the model (docs/tiers.md)."""
    from .models import DTYPE_BYTES
    from .tiers import QUANT_BITS, stored_bytes

    if pol.expert_dtype is not None and QUANT_BITS[pol.expert_dtype] >= 8 * DTYPE_BYTES[m.dtype]:
        raise InputError(source, f"{where}.expert_dtype",
                         f"{pol.expert_dtype} is no smaller than the model's {m.dtype} experts: nothing to gain")
    h = pol.host
    if h is not None:
        sb = stored_bytes(m, pol.expert_dtype)
        slots, most = h.slots(sb), m.num_layers * m.num_experts
        if slots < 1:
            raise InputError(source, f"{where}.host.capacity", f"holds no {sb:,}-byte expert")
        if slots > most:
            raise InputError(source, f"{where}.host.capacity",
                             f"{slots:,} host expert slots, but model {m.name} has only {most:,} experts in all layers")
        if h.lookahead >= m.num_layers:
            raise InputError(source, f"{where}.host.lookahead",
                             f"{h.lookahead} layers ahead, but model {m.name} has {m.num_layers} MoE layers")


def parse_scenario(doc: Any, source: str = "scenario") -> Scenario:
    if not isinstance(doc, dict):
        raise InputError(source, "(document)", "a scenario must be a YAML mapping")
    try:
        sc = Scenario.model_validate(doc)
    except ValidationError as err:
        raise _error_from_pydantic(err, source) from None
    except ValueError as err:       # a policy's check_options on a value pydantic cannot wrap
        raise InputError(source, "policies", str(err)) from None
    return check_bounds(sc, source)


def load_scenario(path: str | Path, overrides: dict | None = None) -> tuple[Scenario, Path]:
    """Read a scenario YAML (safely: :mod:`simulator.safe_load`). Relative paths inside it are
    taken from its folder. Returns the scenario and the folder its relative paths are resolved
    against."""
    p = Path(path)
    doc = load_yaml(p, "scenario")
    if isinstance(doc, dict) and overrides:
        overrides = dict(overrides)
        if "what_if" in overrides:   # flags add to (and win over) the scenario's what-ifs
            overrides["what_if"] = merge_what_if(doc.get("what_if"), overrides["what_if"])
        doc = {**doc, **overrides}
    return parse_scenario(doc, str(p)), p.resolve().parent
