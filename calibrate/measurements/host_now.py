"""Host terms measured now, beside a validation row.

The model's host-bound terms (the issue cost of the executor's calls, the blocking pageable copy,
the CPU-miss path) drift on a shared host: on the lent H100 VMs by 10-20% within seconds, and
more from one minute to the next, while calibration's and the executor's ways of meeting them
agree within a few percent when interleaved (``bench/probe_host_paths.py``, docs/validation.md).
A profile calibrated minutes earlier carries host terms that are no longer this host's, and a
host-bound row's error then measures the drift, not the model.

So ``simmoe validate`` also measures the host terms *now*: calibration's own probes
(:func:`calibrate.measurements.executor_costs.probe_steps`, :func:`~calibrate.measurements.executor_costs.cpu_bursts`),
one before each of the row's live replays, one after the last, and one every few seconds between
the steps of a long replay, on the validation's host pools. The medians replace the profile's host terms, and the row is simulated a second time
(``error_now_pct``). The GPU terms (copy curves, expert compute) stay the profile's, and the
probes never see the row's trace: this is calibration repeated beside the row, not a fit to it.
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch

from simulator.models import ModelSpec
from simulator.profile import Profile, parse_profile
from simulator.scenario import PolicySpec

from calibrate.measurements.executor_costs import _probe_model, cpu_bursts, cpu_executor, probe_costs, probe_steps
from calibrate.profile_writer import with_executor_copies

NOW_STEPS = 4            # probe steps per batch size (the first warms up)
CPU_TRIALS, CPU_BUDGET_S = 20, 0.1   # per token count, per sample


class HostProbe:
    """Samples of this host's terms for one model, on the validation's own host pools.

    ``pool(pinned)`` returns the validation's host expert pool of that memory kind."""

    def __init__(self, device: torch.device, model: ModelSpec, pool: Callable[[bool], list]):
        self.device, self.model, self.pool = device, model, pool
        self.pm = _probe_model(model)
        self.cuda = device.type == "cuda"
        self._cpu_ex = None
        self._key = 0

    def sample(self, policy: PolicySpec, cpu_tokens: list[int]) -> dict:
        """One measurement of the terms ``policy`` uses: issue costs (pinned probe) always, the
        pageable probe for a pageable row, the CPU path at ``cpu_tokens`` for a CPU-miss row."""
        out = probe_costs(probe_steps(self.device, self.pm, "pinned", self.pool(self.cuda), NOW_STEPS), "pinned")
        if policy.memory == "pageable":
            out |= probe_costs(probe_steps(self.device, self.pm, "pageable", self.pool(False), NOW_STEPS), "pageable")
        if policy.miss.kind == "cpu":
            if self._cpu_ex is None or self._cpu_ex.x.shape[0] < max(cpu_tokens):   # activations for the largest
                self._cpu_ex = cpu_executor(self.device, self.model, max(cpu_tokens), self.pool(self.cuda))
            burst = max(2, self.model.top_k)
            for t in cpu_tokens:
                times, self._key = cpu_bursts(self._cpu_ex, self._key, t, burst, CPU_TRIALS, CPU_BUDGET_S)
                out[f"cpu_ms@{t}"] = statistics.median(times)
        return out

    def close(self) -> None:
        self._cpu_ex = None


def cpu_probe_tokens(profile: Profile, shape_key: str, max_tokens: int) -> list[int]:
    """The CPU table's token counts a row can look up: those up to the first at or past
    ``max_tokens`` (the row's largest step)."""
    toks = [t for t, _ in profile.compute.cpu.get(shape_key, [])]
    upto = [t for t in toks if t < max_tokens]
    return upto + [t for t in toks if t >= max_tokens][:1] or toks[:1]


def profile_now(profile: Profile, model: ModelSpec, samples: list[dict]) -> tuple[Profile, dict]:
    """``profile`` with its host terms replaced by the medians of ``samples``, and the medians."""
    med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    doc = profile.to_json()
    launch = {"copy": med["load_us"], "expert": med["compute_us"], "dense": med["dense_us"]}
    doc["host"]["launch_us"] = launch
    if "pageable_copy_ms" in med:
        run = dict(med, expert_bytes=model.expert_bytes)
        with_executor_copies(doc["copy"], {}, {"now": run})
        doc["host"]["pageable_tail_us"] = max(0.0, med["pageable_compute_us"] - med["compute_us"])
    cpu = {int(k.split("@")[1]): v for k, v in med.items() if k.startswith("cpu_ms@")}
    if cpu:
        # probed points are replaced; the points past them keep their shape, scaled as the last
        # probed point moved (the table is fitted monotone as a whole, so they must not lag)
        table = dict(doc["compute"]["cpu"].get(model.shape_key, []))
        last = max(cpu)
        scale = cpu[last] / table[last] if last in table else 1.0
        table = {t: (cpu[t] if t in cpu else ms * scale if t > last else ms) for t, ms in (table | cpu).items()}
        doc["compute"]["cpu"][model.shape_key] = sorted([t, ms] for t, ms in table.items())
    doc["provenance"] = dict(doc["provenance"], host_terms="measured beside the validation row")
    return parse_profile(doc, f"profile {profile.name} with host terms measured now"), med
