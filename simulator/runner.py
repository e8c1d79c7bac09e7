"""From a scenario to results: for every batch size and replication, one trace; for every
policy, one planner and one engine over that trace (policies are compared on the same
routing). Per-step records become a DataFrame; :mod:`simulator.metrics` summarises them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .decision import decide
from .engine import Engine
from .errors import InputError
from .metrics import summarise
from .planner import Planner
from .profile import CostModel, Profile, load_profile
from .scenario import PolicySpec, Scenario
from .traces import Trace, generate, load_trace


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from the scenario seed and the run's coordinates (stable across runs)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def build_trace(sc: Scenario, batch_size: int, replication: int, base_dir: Path | None) -> Trace:
    t, m = sc.trace, sc.model
    seed = derive_seed(sc.seed, replication, batch_size)
    if t.generator:
        return generate(
            num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k,
            batch_size=batch_size, steps=t.steps, seed=seed, generator=t.generator,
            prefill_tokens=t.prefill_tokens, version=t.generator_version, **t.knobs,
        )
    if t.path:
        p = Path(t.path)
        if base_dir is not None and not p.is_absolute():
            p = base_dir / p
        tr = load_trace(p)
        b = int(np.diff(tr.step_offsets).max())
        if batch_size != b:
            raise InputError(str(p), "batch_sizes", f"this trace was saved with batch {b}; set batch_sizes: [{b}]")
        _check_trace_fits(tr, sc, str(p))
        return tr
    from .traces.real import batch_sequences  # real recorded sequences (issue: real traces)

    tr = batch_sequences(t.sequences, model=m, batch_size=batch_size, steps=t.steps,
                         seed=seed, replication=replication, base_dir=base_dir)
    _check_trace_fits(tr, sc, t.sequences.path)
    return tr


def _check_trace_fits(tr: Trace, sc: Scenario, src: str) -> None:
    m = sc.model
    if (tr.num_layers, tr.num_experts, tr.top_k) != (m.num_layers, m.num_experts, m.top_k):
        raise InputError(src, "model", (
            f"trace has {tr.num_layers} layers, {tr.num_experts} experts, top-{tr.top_k}; "
            f"model {m.name} has {m.num_layers}, {m.num_experts}, top-{m.top_k}"))
    if sc.engine.warmup_steps >= tr.num_steps:
        raise InputError(f"scenario {sc.name}", "engine.warmup_steps",
                         f"{sc.engine.warmup_steps} leaves none of the trace's {tr.num_steps} steps to measure")


def cost_model(sc: Scenario, profile: Profile, max_tokens: int) -> CostModel:
    m = sc.model
    return CostModel(profile, m.shape_key, m.expert_bytes, m.activation_bytes_per_token, max(1, max_tokens))


def simulate(sc: Scenario, policy: PolicySpec, trace: Trace, cost: CostModel, seed: int,
             timeline: list | None = None) -> pd.DataFrame:
    """One policy over one trace: a DataFrame of per-step records."""
    if sc.gpus is not None:                 # several GPUs, simulated (docs/multigpu.md)
        from .multigpu import simulate_gpus

        return simulate_gpus(sc, policy, trace, cost, seed, timeline=timeline)
    planner = Planner(sc.model, policy, trace, seed=seed, cost=cost, dense_ms=sc.dense_ms)
    dense = sc.dense_ms
    if sc.engine.style != "twin":
        from .engine_costs import DenseCost

        dense = DenseCost.for_trace(sc, cost.profile, trace, source=f"scenario {sc.name}")
    engine = Engine(cost, policy.memory, dense, timeline=timeline)
    recs = engine.run(planner)
    rows = []
    for r in recs:
        row = {"step": r.step, "phase": r.phase, "start_ms": r.start_ms, "latency_ms": r.latency_ms,
               "compute_ms": r.compute_ms, "transfer_ms": r.transfer_ms, "stall_ms": r.stall_ms,
               "cpu_ms": r.cpu_ms, "host_ms": r.host_ms}
        row.update(r.decisions.as_dict())
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["preloaded_experts"] = len(planner.preloaded)
    df.attrs["slots"] = planner.total_slots
    df.attrs["host_slots"] = planner.host_slots
    return df


@dataclass
class RunResult:
    scenario: Scenario
    profile: Profile
    steps: pd.DataFrame
    summary: list[dict]
    meta: dict = field(default_factory=dict)
    decision: dict = field(default_factory=dict)


def unsupported_policies(sc: Scenario, profile: Profile) -> dict[str, str]:
    """Policy name -> why the profile cannot time it (a CPU miss policy on a profile without CPU
    expert timings for the model's shape). Those policies are skipped with a warning."""
    key = sc.model.shape_key
    if key in profile.compute.cpu:
        return {}
    return {p.name: f"profile {profile.name} has no CPU expert timings for {key} (compute.cpu.{key}); "
                    f"calibrate with: simmoe calibrate --device cpu"
            for p in sc.policies if p.miss.kind == "cpu"}


def resolve_profile(sc: Scenario, profile: Profile | str | None) -> Profile:
    """The profile a run uses: the one given (or the scenario's), with the scenario's what-if
    applied (:mod:`simulator.what_if`)."""
    from .what_if import apply_what_if

    if not isinstance(profile, Profile):
        profile = load_profile(profile or sc.profile)
    return apply_what_if(profile, sc.what_if)


def run_scenario(sc: Scenario, *, profile: Profile | str | None = None, base_dir: Path | None = None,
                 progress: Callable[[int, int, str], None] | None = None) -> RunResult:
    """Run every (batch size, replication, policy) of a scenario; policies the profile cannot
    time are skipped (``result.skipped``, a warning in the decision), unless that is all of them."""
    from .what_if import describe, source_kind

    if sc.workload is not None:
        raise InputError(f"scenario {sc.name}", "workload", "a serving scenario: run it with simmoe run, "
                                                            "simmoe.serve() or simulator.serving.runner.serve_scenario")
    profile = resolve_profile(sc, profile)
    skipped = unsupported_policies(sc, profile)
    if len(skipped) == len(sc.policies):
        raise InputError(f"profile {profile.name}", f"compute.cpu.{sc.model.shape_key}",
                         f"every policy of the scenario needs it: {next(iter(skipped.values()))}")
    policies = [p for p in sc.policies if p.name not in skipped]
    frames = []
    total = len(sc.batch_sizes) * sc.replications * len(policies)
    done = 0
    slots: dict[tuple[str, int], int] = {}
    for b in sc.batch_sizes:
        for rep in range(sc.replications):
            trace = build_trace(sc, b, rep, base_dir)
            cost = cost_model(sc, profile, trace.max_step_tokens)
            for pol in policies:
                if progress:
                    progress(done, total, f"{pol.name} B={b} rep {rep + 1}/{sc.replications}")
                try:
                    df = simulate(sc, pol, trace, cost, seed=derive_seed(sc.seed, rep, b, 7))
                except ValueError as e:
                    raise InputError(f"scenario {sc.name}", f"policies[{pol.name}]", str(e)) from None
                slots[(pol.name, b)] = df.attrs["slots"], df.attrs["host_slots"]
                df.insert(0, "replication", rep)
                df.insert(0, "batch_size", b)
                df.insert(0, "policy", pol.name)
                frames.append(df)
                done += 1
    if progress:
        progress(done, total, "done")
    steps = pd.concat(frames, ignore_index=True)
    summary = summarise(steps, sc, expert_bytes=sc.model.expert_bytes)
    for row in summary:
        row["gpu_slots"], row["host_slots"] = slots[(row["policy"], row["batch_size"])]
    if sc.gpus is not None:
        from .multigpu import gpu_summary

        measured = steps[steps["step"] >= sc.engine.warmup_steps]
        for row in summary:
            row["gpus"] = gpu_summary(measured[(measured["policy"] == row["policy"])
                                               & (measured["batch_size"] == row["batch_size"])], sc)
    decision = decide(summary, sc)
    decision["skipped"] = [{"policy": n, "reason": r} for n, r in skipped.items()]
    decision["warnings"] += [f"policy {n} skipped: {r}" for n, r in skipped.items()]
    return RunResult(scenario=sc, profile=profile, steps=steps, summary=summary, decision=decision,
                     meta={"profile": profile.name, "profile_kind": source_kind(profile),
                           "profile_source": describe(profile)})
