"""The Python front door: ``simmoe.run(scenario) -> Result``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from simulator.profile import Profile
from simulator.runner import RunResult, run_scenario
from simulator.scenario import Scenario, load_scenario, parse_scenario


@dataclass
class Result:
    """A finished run: the scenario, per-step records and the per-(policy, batch) summary."""

    raw: RunResult

    @property
    def scenario(self) -> Scenario:
        return self.raw.scenario

    @property
    def steps(self) -> pd.DataFrame:
        return self.raw.steps

    @property
    def summary(self) -> list[dict]:
        return self.raw.summary

    @property
    def decision(self) -> dict:
        """Per batch size: the best policy, its speed-up over the baseline, the CI verdict;
        thrashing warnings (see :mod:`simulator.decision`)."""
        return self.raw.decision

    @property
    def summary_df(self) -> pd.DataFrame:
        """One row per (policy, batch size); the same columns as a sweep's results."""
        from simulator.sweep import flatten_summary

        return pd.DataFrame([flatten_summary(r) for r in self.raw.summary])

    def save(self, out_dir: str | Path, fmt: str = "parquet"):
        from simulator.output import write_results

        return write_results(self.raw, out_dir, fmt)


def load(scenario: str | Path | dict | Scenario, **overrides: Any) -> tuple[Scenario, Path | None]:
    """A Scenario from a YAML path, a dict, or a Scenario; keyword overrides replace top-level keys."""
    if isinstance(scenario, Scenario):
        if overrides:
            return parse_scenario({**scenario.effective(), **overrides}), None
        return scenario, None
    if isinstance(scenario, dict):
        return parse_scenario({**scenario, **overrides}), None
    return load_scenario(scenario, overrides or None)


def run(scenario: str | Path | dict | Scenario, profile: str | Profile | None = None, **overrides: Any) -> Result:
    """Simulate a scenario: ``simmoe.run("scenarios/locality_high.yaml", batch_sizes=[1, 8])``."""
    sc, base = load(scenario, **overrides)
    return Result(run_scenario(sc, profile=profile, base_dir=base))


def serve(scenario: str | Path | dict | Scenario, profile: str | Profile | None = None, **overrides: Any):
    """Simulate a serving scenario (one with ``workload:``, docs/serving.md): a
    :class:`~simulator.serving.runner.ServingResult` with ``requests`` (one row per request),
    ``steps`` and ``summary``."""
    from simulator.errors import InputError
    from simulator.serving.runner import serve_scenario

    sc, base = load(scenario, **overrides)
    if sc.workload is None:
        raise InputError(f"scenario {sc.name}", "workload", "not a serving scenario (no workload: section); use simmoe.run")
    return serve_scenario(sc, profile=profile, base_dir=base)
