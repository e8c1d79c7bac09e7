"""simmoe's ``layer`` baseline against transformers + accelerate's offload itself.

Each row: the preset's real model built at full size (random weights) in one experts
implementation (``hf-eager`` or ``grouped``), its routing recorded with every expert resident,
then its experts offloaded by accelerate (:mod:`calibrate.executors.accelerate`) and its decode
steps timed; the projection is simmoe's ``layer`` load mode (every expert of a layer copied
from pageable memory at each forward, nothing cached) in that engine style, on the routing
recorded. ``bench/accelerate_baseline.py`` is the command.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

from simulator.engine_costs import require_style
from simulator.profile import Profile, load_profile
from simulator.traces import Trace

STYLES = ("hf-eager", "grouped")


def project_layer_baseline(spec, trace: Trace, prompt: int, profile: Profile, profile_name: str, style: str,
                           warm: int) -> float:
    """Median projected step (ms) of accelerate's offload, as simmoe's ``layer`` baseline in
    ``style``, after ``warm`` steps."""
    from calibrate.executors.accelerate import layer_baseline_policy
    from calibrate.validation.model_rows import project, row_scenario

    require_style(profile, spec.name, style, f"profile {profile_name}")
    sc = row_scenario("accelerate-baseline", spec, layer_baseline_policy(spec.num_experts), trace, prompt,
                      profile_name, style)
    return statistics.median(project(sc, trace, profile)[warm:])


def accelerate_rows(model: str, *, style: str = "grouped", batches=(1, 4, 16), prompt: int = 256, steps: int = 6,
                    warmup: int = 2, profile: str = "h200", device: str = "cuda", layers: int | None = None,
                    tiny: bool = False, project: bool = True, seed: int = 0,
                    say: Callable[[str], None] | None = None) -> dict:
    """Live accelerate offload per batch, and (``project``) simmoe's projection of it."""
    from calibrate.executors.accelerate import offload_experts, time_decode
    from calibrate.executors.model import record_routing
    from calibrate.models.build import build_model

    if style not in STYLES:
        raise ValueError(f"style {style!r}: accelerate runs transformers' own experts ({', '.join(STYLES)})")
    prof = load_profile(profile) if project else None
    if project:   # before the build: a profile without the tables is one line, not minutes later
        from calibrate.models.build import tiny_spec
        from simulator.models import get_preset
        spec = tiny_spec(get_preset(model)) if tiny else get_preset(model)
        require_style(prof, spec.name, style, f"profile {profile}")
    t0 = time.perf_counter()
    built = build_model(model, style=style, device=device, layers=layers, tiny=tiny, seed=seed)
    traces = {b: record_routing(built, batch=b, steps=warmup + steps, prompt_tokens=prompt, seed=seed, device=device)
              for b in batches}
    nbytes = offload_experts(built, device)
    if say:
        say(f"built {built.spec.name} ({len(built.decoder_layers)} layers) in {time.perf_counter() - t0:.0f} s; "
            f"each step copies {nbytes / 1e9:.2f} GB of experts")
    rows = []
    for b in batches:
        live = time_decode(built, batch=b, prompt=prompt, steps=steps, warmup=warmup, seed=seed, device=device)
        row = {"batch": b, "prompt": prompt, "live_median_ms": live["median_ms"], "live_steps_ms": live["steps_ms"],
               "GB_per_step": nbytes / 1e9, "GBps": nbytes / 1e9 / (live["median_ms"] / 1e3)}
        if project:
            sim = project_layer_baseline(built.spec, traces[b], prompt, prof, profile, style, warmup)
            row.update(sim_median_ms=sim, error_pct=(sim - live["median_ms"]) / live["median_ms"] * 100)
        rows.append(row)
        if say:
            tail = f", projected {row['sim_median_ms']:.1f} ({row['error_pct']:+.1f}%)" if project else ""
            say(f"B={b} prompt {prompt}: {live['median_ms']:.1f} ms a step ({row['GBps']:.1f} GB/s){tail}")
    return {"model": built.spec.name, "style": style, "device": device, "profile": profile if project else None,
            "layers": len(built.decoder_layers), "steps": steps, "warmup": warmup, "rows": rows,
            "elapsed_s": time.perf_counter() - t0}
