"""Quantised experts, as simmoe stores them below the GPU (simulator/tiers.py), and the host
memory that the tiers read: shared by calibration (which times :func:`dequantise`) and the live
executor (which runs it).

Layout of one quantised expert (``stored_bytes``): the values in groups of
:data:`~simulator.tiers.QUANT_GROUP` (int8 / fp8 one byte each, int4 two per byte, low nibble
first, offset by 8), padded to whole groups, then one fp16 scale per group.
"""
from __future__ import annotations

import mmap

import numpy as np
import torch

from simulator.tiers import QUANT_GROUP

FP8 = getattr(torch, "float8_e4m3fn", None)
QMAX = {"int8": 127.0, "fp8": 448.0, "int4": 7.0}


def quantise(flat: torch.Tensor, dtype: str) -> torch.Tensor:
    """One expert's flat weights as the uint8 bytes of its quantised form (on ``flat``'s device)."""
    groups = -(-flat.numel() // QUANT_GROUP)
    x = torch.zeros(groups * QUANT_GROUP, dtype=torch.float32, device=flat.device)
    x[:flat.numel()] = flat.float()
    xg = x.view(groups, QUANT_GROUP)
    scale = xg.abs().amax(1).clamp_min(1e-12) / QMAX[dtype]
    v = xg / scale[:, None]
    if dtype == "int8":
        data = v.round().clamp(-127, 127).to(torch.int8).view(torch.uint8)
    elif dtype == "fp8":
        data = v.to(FP8).view(torch.uint8)
    else:
        q = (v.round().clamp(-8, 7) + 8).to(torch.uint8)
        data = q[:, 0::2] | (q[:, 1::2] << 4)
    return torch.cat([data.reshape(-1), scale.to(torch.float16).view(torch.uint8)])


def dequantise(raw: torch.Tensor, dtype: str, out: torch.Tensor) -> torch.Tensor:
    """The quantised bytes ``raw`` (as :func:`quantise` writes them) into ``out`` (the expert's
    flat weights in the model's dtype), on their device: the dequantise step the GPU runs
    after a quantised copy."""
    numel = out.numel()
    groups = -(-numel // QUANT_GROUP)
    nd = groups * QUANT_GROUP * (4 if dtype == "int4" else 8) // 8
    data, scales = raw[:nd], raw[nd:nd + 2 * groups].view(torch.float16).to(out.dtype)
    if dtype == "int8":
        vals = data.view(torch.int8).view(groups, QUANT_GROUP).to(out.dtype)
    elif dtype == "fp8":
        vals = data.view(FP8).view(groups, QUANT_GROUP).to(out.dtype)
    else:
        d = data.view(groups, QUANT_GROUP // 2)
        vals = torch.stack((d & 15, d >> 4), -1).view(groups, QUANT_GROUP).to(out.dtype) - 8
    vals = vals * scales[:, None]
    out.copy_(vals.view(-1)[:numel])
    return out


def aligned_host(nbytes: int, pinned: bool) -> tuple[torch.Tensor, object]:
    """A page-aligned host buffer (O_DIRECT reads need it) as a uint8 tensor; ``pinned``:
    page-locked and mapped for the GPU with ``cudaHostRegister``. Returns the tensor and the
    mapping that owns its memory (keep it alive)."""
    mm = mmap.mmap(-1, max(1, nbytes))
    t = torch.from_numpy(np.frombuffer(mm, dtype=np.uint8, count=nbytes))
    if pinned:
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 2)   # cudaHostRegisterMapped
        if int(rc) != 0:
            raise RuntimeError(f"cudaHostRegister of {nbytes:,} bytes failed (error {int(rc)})")
    return t, mm


def unregister(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


class _CudaArray:
    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


def mapped_view(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor over pinned host memory (``host``, page-locked and mapped): kernels that
    read it read host memory over PCIe (zero-copy). With unified addressing the device pointer
    of mapped pinned memory is its host pointer."""
    nbytes = host.numel() * host.element_size()
    with torch.cuda.device(device):
        return torch.as_tensor(_CudaArray(host.data_ptr(), nbytes), device=device).view(host.dtype)

