"""``simmoe calibrate tiers``: measure the terms of the tiers beyond host memory into a profile."""
from __future__ import annotations

import datetime
import socket
from pathlib import Path

import click

from simulator.errors import InputError

STAGES = ("dequant", "direct", "disk")


@click.command("tiers")
@click.option("--device", "-d", default="cuda", show_default=True, help="cuda, cuda:N or cpu.")
@click.option("--stage", "stages", multiple=True, type=click.Choice(STAGES),
              help="What to measure; repeat [default: dequant, direct on CUDA, disk with --disk-dir].")
@click.option("--disk-dir", type=click.Path(path_type=Path, file_okay=False),
              help="A folder on the disk to measure (a test file is written there and removed).")
@click.option("--disk-file-mib", type=click.IntRange(16, 1 << 20), default=512, show_default=True,
              help="Size of the test file (larger than the disk's cache gives honest figures).")
@click.option("--depth", type=click.IntRange(2, 256), default=4, show_default=True,
              help="Queue depth of the qdn curves (threads reading at once).")
@click.option("--model", "-m", "model", default="deepseek-v2-lite", show_default=True,
              help="Model preset whose expert the direct-read stage computes.")
@click.option("--trials", "-n", type=click.IntRange(3, 10_000), default=10, show_default=True)
@click.option("--quick", is_flag=True, help="Small sizes and 3 trials (a test of the code: seconds).")
@click.option("--base", default="h100-pcie5", show_default=True,
              help="Profile (name or path) whose other sections the output keeps.")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Profile file to write.")
def tiers_cmd(device, stages, disk_dir, disk_file_mib, depth, model, trials, quick, base, out):
    """Measure dequantise kernels, direct (zero-copy) host reads and disk reads.

    \b
    dequant: the dequantise step (int8, fp8, int4 -> bf16) by stored bytes, on --device;
    direct:  an expert FFN computed from mapped pinned host memory, by tokens (CUDA only);
    disk:    reads of a file on --disk-dir by size, buffered (page cache dropped before each
             read) and O_DIRECT, at queue depth 1 and --depth.
    The output is the --base profile with its `tiers` section measured where a stage ran
    (`tiers.source` says which parts are measured and where). A disk figure is the disk of
    the machine that ran this, not necessarily the GPU host's.
    """
    import torch

    from calibrate.measurements import tiers as m
    from calibrate.measurements.timing import Timer
    from calibrate.profile_writer import check_writable, write_atomic
    from simulator.models import PRESETS
    from simulator.profile import load_profile, parse_profile

    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise InputError("command line", "--device", f"{device!r}: no CUDA GPU here; use --device cpu")
    dev = torch.device(device)
    chosen = set(stages) or ({"dequant"} | ({"direct"} if dev.type == "cuda" else set())
                             | ({"disk"} if disk_dir else set()))
    if "disk" in chosen and disk_dir is None:
        raise InputError("command line", "--disk-dir", "the disk stage needs a folder on the disk to measure")
    if "direct" in chosen and dev.type != "cuda":
        raise InputError("command line", "--stage", "direct host reads are a GPU path: use --device cuda")
    if disk_dir is not None and not disk_dir.is_dir():
        raise InputError(str(disk_dir), "--disk-dir", "not a folder")
    if model not in PRESETS:
        raise InputError("command line", "--model", f"unknown preset {model!r}; known: {', '.join(PRESETS)}")
    check_writable(out)
    doc = load_profile(base, "--base").to_json()
    trials = 3 if quick else trials
    timer = Timer(dev)
    where = f"{socket.gethostname()} {device} {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    tiers, raw = doc["tiers"], doc.setdefault("measurements", {}).setdefault("tiers", {})
    if "dequant" in chosen:
        sizes = [1 << 16, 1 << 18, 1 << 20] if quick else m.DEQUANT_SIZES
        tiers["dequant"], raw["dequant"] = m.dequant_sweep(timer, sizes, trials=trials)
        if timer.device.type == "cuda":   # on the CPU the call's host time is its work, not its issue
            tiers["dequant_host_us"] = {k: v["host_us"] for k, v in raw["dequant"].items()}
        else:
            tiers.pop("dequant_host_us", None)   # the base profile's belongs to its own dequant curves
        issue = tiers.get("dequant_host_us", {})
        tiers["source"]["dequant"] = f"measured on {where}"
        click.echo("dequant: " + ", ".join(f"{k} {v['bandwidth_GBps']:.0f} GB/s + {v['latency_us']:.0f} us"
                                            + (f" (issue {issue[k]:.0f} us)" if k in issue else "")
                                            for k, v in tiers["dequant"].items()))
    if "direct" in chosen:
        tiers["direct"], raw["direct"] = m.direct_sweep(timer, PRESETS[model], trials=trials)
        tiers["source"]["direct"] = f"measured on {where} ({model} expert)"
        d = tiers["direct"]
        click.echo(f"direct: {d['bandwidth_GBps']:.1f} GB/s, {d['latency_us']:.1f} us, per-token factor "
                   f"{d['per_token_factor']:.3f}")
    if "disk" in chosen:
        sizes = [64 << 10, 1 << 20, 4 << 20] if quick else m.DISK_SIZES
        try:
            part, raw["disk"] = m.disk_sweep(disk_dir, sizes=sizes, depth=depth, trials=trials,
                                             file_bytes=(32 << 20) if quick else disk_file_mib << 20)
        except OSError as e:
            raise InputError(str(disk_dir), "--disk-dir", f"disk reads failed: {e}") from None
        tiers["disk"] = dict(part, device=f"{disk_dir} on {socket.gethostname()}")
        tiers["source"]["disk"] = f"measured on {where} ({disk_dir})"
        for io in ("buffered", "direct"):
            c1, cn = part[io]["qd1"], part[io]["qdn"]
            click.echo(f"disk {io}: qd1 {c1['bandwidth_GBps']:.2f} GB/s + {c1['latency_us']:.0f} us; qd{depth} "
                       f"{cn['bandwidth_GBps'] * depth:.2f} GB/s in all")
    parse_profile(doc, str(out))
    write_atomic(doc, out)
    click.echo(f"wrote {out}")
