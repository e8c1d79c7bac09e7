"""Where a calibration ran: GPU, PCIe link, driver, CUDA and torch versions, host CPU, date.

PCIe generation and width come from ``nvidia-smi`` (queried by the GPU's PCI bus id), else
from the kernel's PCI sysfs entry; ``pcie`` is the link's maximum, ``pcie_current`` what it
ran at when queried (an idle GPU may train its link down). Anything that cannot be found
reads ``unknown``.
"""
from __future__ import annotations

import datetime
import platform
import re
import subprocess
from pathlib import Path

import torch

from simulator import __version__

UNKNOWN = "unknown"
PCIE_GT_PER_GEN = {"2.5": 1, "5.0": 2, "8.0": 3, "16.0": 4, "32.0": 5, "64.0": 6}


def slug(text: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "device"


def host_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or UNKNOWN


def host_identity() -> dict:
    """Which machine this is: its name and the kernel's boot id (a fresh VM on the same
    hardware gets a new one). A validation reports whether it ran where its profile was made:
    host-bound costs (pageable copies, the CPU path, issue costs) move from host to host."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = UNKNOWN
    return {"hostname": platform.node() or UNKNOWN, "boot_id": boot}


def _pci_address(props) -> tuple[str, str] | None:
    """(nvidia-smi bus id, sysfs address) of a CUDA device, if torch exposes it."""
    try:
        dom, bus, dev = props.pci_domain_id, props.pci_bus_id, props.pci_device_id
    except AttributeError:
        return None
    return f"{dom:08X}:{bus:02X}:{dev:02X}.0", f"{dom:04x}:{bus:02x}:{dev:02x}.0"


def _nvidia_smi(gpu_id: str) -> dict:
    """Driver and PCIe link of the GPU with this PCI bus id or UUID, from nvidia-smi."""
    fields = "driver_version,pcie.link.gen.max,pcie.link.width.max,pcie.link.gen.current,pcie.link.width.current"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-i", gpu_id],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        driver, gmax, wmax, gcur, wcur = [v.strip() for v in out.strip().splitlines()[0].split(",")]
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {}
    return {"driver": driver, "pcie": f"Gen{gmax} x{wmax}", "pcie_current": f"Gen{gcur} x{wcur}"}


def _sysfs_pcie(address: str) -> dict:
    d = Path("/sys/bus/pci/devices") / address

    def link(which: str) -> str:
        speed = (d / f"{which}_link_speed").read_text().split()[0]
        width = (d / f"{which}_link_width").read_text().strip()
        return f"Gen{PCIE_GT_PER_GEN.get(speed, '?')} x{width}"
    try:
        return {"pcie": link("max"), "pcie_current": link("current")}
    except (OSError, IndexError):
        return {}


def _driver_from_proc() -> str:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return UNKNOWN
    m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", text)
    return m.group(1) if m else text.splitlines()[0].strip()


def gpu_info(device: torch.device) -> dict:
    props = torch.cuda.get_device_properties(device)
    info = {"gpu": props.name, "gpu_memory_GiB": round(props.total_memory / 2**30, 1),
            "driver": UNKNOWN, "pcie": UNKNOWN, "pcie_current": UNKNOWN}
    addr = _pci_address(props)
    if addr:
        info["pci_bus_id"] = addr[0]
        info.update(_sysfs_pcie(addr[1]))
    ident = addr[0] if addr else (f"GPU-{props.uuid}" if getattr(props, "uuid", None) else None)
    if ident:
        info.update(_nvidia_smi(ident))
    if info["driver"] == UNKNOWN:
        info["driver"] = _driver_from_proc()
    return info


def collect(device: torch.device) -> dict:
    """Provenance of a calibration on ``device`` (``cuda:N`` or ``cpu``)."""
    prov = {
        "kind": "calibrated", "device": str(device),
        "torch": torch.__version__, "cuda": torch.version.cuda or "none",
        "host_cpu": host_cpu(), "cpu_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "simmoe_version": __version__, "python": platform.python_version(),
        **host_identity(),
    }
    if device.type == "cuda":
        prov.update(gpu_info(device))
        prov["float32_matmul_precision"] = torch.get_float32_matmul_precision()  # "highest": no TF32
    else:
        prov["gpu"] = "none (device cpu)"
        prov["notes"] = ("device cpu: compute.gpu holds expert timings on the host CPU and the copy curve is "
                         "host-to-host memcpy of pageable memory (stored as h2d.pinned); a stand-in for tests "
                         "and CPU-only what-ifs, not a GPU projection")
    return prov


def default_slug(prov: dict) -> str:
    """Profile name / file stem for a provenance: the GPU, or ``cpu-<host cpu>``."""
    if prov["device"].startswith("cuda"):
        return slug(prov["gpu"])
    return slug(f"cpu {prov['host_cpu']}")
