"""Profiles derived from public specifications, never measured: ``<gpu>-specs``.

Each is the shipped calibrated ``h200`` profile with its terms scaled by the ratio of the
target GPU's published numbers to the H200's (docs/calibration.md, "Profiles from specs", gives
the numbers and their sources):

- **copies**: the bandwidth of every copy curve times (target link / H200 link), the
  theoretical per-direction rates (PCIe Gen4 x16 31.5 GB/s, Gen5 x16 63.0 GB/s, NVLink-C2C
  450 GB/s); pageable copies through the host-staging model of :mod:`simulator.what_if`; the
  copy latency stays the H200's;
- **expert FFN on the GPU**: each measured point is a fixed overhead plus work. The overhead
  (kernel launches: the same on any GPU) is what the fewest-token point takes beyond its
  roofline bound; the rest of every point is scaled by the ratio of the two GPUs' roofline
  bounds at its token count ``t``, ``max(weight bytes / memory bandwidth, 2 x matrices x
  hidden x ffn x t / peak FLOPS)`` (bf16 tensor FLOPS for 16- and 8-bit experts, FP32
  non-tensor FLOPS for fp32 ones: calibration runs fp32 at ``highest`` precision, no TF32);
  a point the base measured at its dearest so far stays the dearest so far;
- **engine tables** (the work around the experts): decode, LM head and per-expert dispatch
  times the memory-bandwidth ratio (decode is bandwidth-bound), prefill times the bf16 FLOPS
  ratio; the styles' per-layer host time unchanged; the executor's in situ pool copies as the
  copy curve of their memory kind moves at their bytes;
- **host**: the H200 VM's measured host terms and CPU expert timings, unchanged (an assumption:
  the same host; ``--what-if host_scale=...`` or ``cpu_compute_scale`` for another).

They are marked ``"kind": "from specs"`` and ``"source": "from specs"`` and shown as such by
``profile list``/``show``, in every summary and report. ``python -m simulator.spec_profiles``
rewrites them (tests check the shipped files are what this module derives).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .models import DTYPE_BYTES
from .profile import Profile, load_profile, parse_profile
from .what_if import scaled_copy, scaled_engine, scaled_pool_copies

BASE = "h200"
SOURCE = "from specs"


@dataclass(frozen=True)
class GpuSpec:
    name: str            # profile name
    gpu: str
    link: str
    link_GBps: float     # theoretical host-to-device rate per direction
    memory_GBps: float
    bf16_TFLOPS: float   # dense (no sparsity)
    fp32_TFLOPS: float   # non-tensor
    source: str


PCIE4, PCIE5, C2C = 31.5, 63.0, 450.0
SPECS = {s.name: s for s in [
    GpuSpec("rtx3090-specs", "NVIDIA GeForce RTX 3090", "PCIe Gen4 x16", PCIE4, 936, 71, 35.6,
            "NVIDIA Ampere GA102 GPU architecture whitepaper (bf16 tensor with FP32 accumulate, dense)"),
    GpuSpec("rtx4090-specs", "NVIDIA GeForce RTX 4090", "PCIe Gen4 x16", PCIE4, 1008, 165.2, 82.6,
            "NVIDIA Ada Lovelace GPU architecture whitepaper (bf16 tensor with FP32 accumulate, dense)"),
    GpuSpec("a100-pcie-specs", "NVIDIA A100 80GB PCIe", "PCIe Gen4 x16", PCIE4, 1935, 312, 19.5,
            "NVIDIA A100 Tensor Core GPU datasheet"),
    GpuSpec("l40s-specs", "NVIDIA L40S", "PCIe Gen4 x16", PCIE4, 864, 362, 91.6,
            "NVIDIA L40S datasheet (bf16 dense: half the 733 TFLOPS with sparsity)"),
    GpuSpec("h100-pcie-specs", "NVIDIA H100 PCIe", "PCIe Gen5 x16", PCIE5, 2000, 756, 51,
            "NVIDIA H100 Tensor Core GPU datasheet (bf16 dense: half the 1,513 TFLOPS with sparsity)"),
    GpuSpec("h200-specs", "NVIDIA H200 (SXM)", "PCIe Gen5 x16", PCIE5, 4800, 989, 67,
            "NVIDIA H200 Tensor Core GPU datasheet (bf16 dense: half the 1,979 TFLOPS with sparsity)"),
    GpuSpec("gh200-specs", "NVIDIA GH200 Grace Hopper (96 GB HBM3)", "NVLink-C2C", C2C, 4000, 989, 67,
            "NVIDIA GH200 Grace Hopper Superchip datasheet (NVLink-C2C 900 GB/s both ways: 450 GB/s each)"),
]}
#: the GPU the base profile was calibrated on, by the same kind of numbers
BASE_SPEC = SPECS["h200-specs"]

_KEY = re.compile(r"^(\d+)x(\d+)-(\w+)-(gated|plain)$")


def roofline_ms(shape_key: str, tokens: int, spec: GpuSpec) -> float:
    """The roofline bound of one expert FFN over ``tokens`` tokens on ``spec`` (ms)."""
    m = _KEY.match(shape_key)
    if not m:
        raise ValueError(f"cannot read the expert shape key {shape_key!r}")
    hidden, ffn, dtype, kind = int(m[1]), int(m[2]), m[3], m[4]
    matrices = 3 if kind == "gated" else 2
    weights = matrices * hidden * ffn * DTYPE_BYTES[dtype]
    flops = 2 * matrices * hidden * ffn * tokens
    peak = (spec.fp32_TFLOPS if dtype == "fp32" else spec.bf16_TFLOPS) * 1e12
    return max(weights / (spec.memory_GBps * 1e9), flops / peak) * 1e3


def scaled_expert_table(key: str, pts: list[tuple[int, float]], spec: GpuSpec,
                        base_spec: GpuSpec = BASE_SPEC) -> list[tuple[int, float]]:
    """One expert shape's measured ``[tokens, ms]`` on ``base_spec``'s GPU, moved to ``spec``'s:
    the fixed overhead kept, the work scaled by the roofline ratio."""
    t0, ms0 = pts[0]
    overhead = max(0.0, ms0 - roofline_ms(key, t0, base_spec))
    out: list[tuple[int, float]] = []
    base_most = most = 0.0
    for t, ms in pts:
        fixed = min(ms, overhead)
        v = fixed + (ms - fixed) * roofline_ms(key, t, spec) / roofline_ms(key, t, base_spec)
        # where the base's bound turns from memory to compute before the target's does, the
        # ratio drops: a point the base measured at its dearest so far stays the dearest
        if ms >= base_most:
            v = max(v, most)
        base_most, most = max(base_most, ms), max(most, v)
        out.append((t, v))
    return out


def derive(base: Profile, spec: GpuSpec, base_spec: GpuSpec = BASE_SPEC) -> Profile:
    """The profile ``spec`` would have, from ``base`` (calibrated on ``base_spec``'s GPU)."""
    gpu = {key: scaled_expert_table(key, pts, spec, base_spec) for key, pts in base.compute.gpu.items()}
    mem_ratio = base_spec.memory_GBps / spec.memory_GBps
    prov = {"kind": SOURCE, "source": SOURCE, "gpu": spec.gpu, "pcie": spec.link, "derived_from": base.name,
            "specs": {k: v for k, v in asdict(spec).items() if k not in ("name", "gpu", "source")},
            "spec_source": spec.source,
            "notes": f"Not measured: {base.name} ({base.provenance.get('gpu')}, calibrated) scaled to these public "
                     "numbers (simulator/spec_profiles.py, docs/calibration.md 'Profiles from specs'); host terms "
                     "and CPU expert times are the base host's."}
    copy_ = scaled_copy(base, 1.0, spec.link_GBps / base_spec.link_GBps)
    engine = scaled_engine(base.engine, mem_ratio, 1.0, prefill=base_spec.bf16_TFLOPS / spec.bf16_TFLOPS)
    out = base.model_copy(update={
        "name": spec.name, "provenance": prov,
        "copy_": copy_,
        "compute": base.compute.model_copy(update={"gpu": gpu}),
        "engine": scaled_pool_copies(engine, base.copy_, copy_),
        "fit": {}, "measurements": {}})
    return parse_profile(out.to_json(), f"spec profile {spec.name}")


def spec_documents() -> dict[str, dict]:
    """Every spec profile as the JSON document shipped in simulator/profiles/."""
    base = load_profile(BASE)
    return {name: derive(base, spec).to_json() for name, spec in SPECS.items()}


def write_all(folder: Path | None = None) -> list[Path]:
    folder = folder or Path(__file__).parent / "profiles"
    out = []
    for name, doc in spec_documents().items():
        p = folder / f"{name}.json"
        p.write_text(json.dumps(doc, indent=1) + "\n")
        out.append(p)
    return out


if __name__ == "__main__":
    for p in write_all():
        print(f"wrote {p}")
