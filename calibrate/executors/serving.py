"""Live serving: the serving scheduler drives the real-model executor step by step.

The same :class:`~simulator.serving.scheduler.Scheduler`, :class:`~simulator.serving.runner.Driver`
(routing rows per token), :class:`~simulator.serving.planner.ServingPlanner` and policy
objects as the simulated run; :class:`ServingExecutor` runs each scheduled step on the built
model (:class:`~calibrate.executors.model.ModelExecutor`'s offloaded experts execute the plan)
and the scheduler's clock advances by the measured step time. With the same step times (e.g.
every request arriving at once, when the schedule does not depend on time) the decisions are
the simulator's, step for step (tests/test_serving_live.py).

A step is one forward over the step's requests side by side: row ``b`` holds request ``b``'s
new tokens (a prefill chunk, or one decode token), right-padded to the step's longest; each
request keeps its own KV cache (per decoder layer), gathered left-padded into one
``DynamicCache`` before the forward (``attention_mask`` hides the padding, ``position_ids``
continue each request's positions) and its new entries split off after. The padded rows are
not routed: the MoE layers see only the real tokens, in the trace's order. The gather is
outside the timed forward (a paged-attention engine does not copy the cache).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from calibrate.executors.model import ModelExecutor, ModelStep
from simulator.serving.planner import ServingPlanner
from simulator.serving.runner import request_table
from simulator.serving.scheduler import DECODE


class ServingExecutor(ModelExecutor):
    """A :class:`ModelExecutor` over a serving planner's steps, a KV cache per request."""

    def __init__(self, built, policy, planner: ServingPlanner, *, device: str = "cpu", seed: int = 0, host=None,
                 dispatch: str = "loop", probe: bool = False):
        super().__init__(built, policy, planner.trace, device=device, seed=seed, host=host, planner=planner,
                         dispatch=dispatch, probe=probe)
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.vocab = built.arch.vocab
        self.seed = seed
        self._rows: torch.Tensor | None = None
        self.n_layers = len(built.decoder_layers)
        self.keep_logits = False           # True: each produced token's logits, per request
        self.logits: dict[int, list[torch.Tensor]] = {}
        self._prompt: dict[int, int] = {}

    def _run_layer(self, l, hidden, top_k_index, top_k_weights, act_fn):
        rows = self._rows
        out = torch.zeros_like(hidden)
        out[rows] = super()._run_layer(l, hidden[rows], top_k_index[rows], top_k_weights[rows], act_fn)
        return out

    def _ids(self, rid: int, row0: int, n: int) -> list[int]:
        g = np.random.Generator(np.random.PCG64([self.seed, rid]))
        return g.integers(0, self.vocab, size=row0 + n).tolist()[row0:]

    def _batch(self, plan):
        from transformers import DynamicCache

        items = plan.items
        B, T = len(items), max(it.count for it in items)
        past = [self.kv[it.rid][0][0].shape[2] if it.rid in self.kv else 0 for it in items]
        P = max(past)
        ids = torch.zeros((B, T), dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        mask = torch.zeros((B, P + T), dtype=torch.long)
        rows = []
        for b, (it, p) in enumerate(zip(items, past)):
            ids[b, :it.count] = torch.tensor(self._ids(it.rid, it.row0, it.count))
            pos[b] = p + torch.arange(T)
            mask[b, P - p:P] = 1
            mask[b, P:P + it.count] = 1
            rows.extend(b * T + t for t in range(it.count))
        cache = DynamicCache()
        if P:
            for i in range(self.n_layers):
                ks, vs = [], []
                ref_k, ref_v = next(self.kv[it.rid][i] for it in items if it.rid in self.kv)
                for it, p in zip(items, past):
                    k, v = self.kv[it.rid][i] if p else (ref_k[:, :, :0], ref_v[:, :, :0])
                    pad = P - p
                    ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                    vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
                cache.update(torch.cat(ks), torch.cat(vs), i)
        dev = self.device
        return ids.to(dev), pos.to(dev), mask.to(dev), cache, torch.tensor(rows, device=dev), P

    def run_plan(self, plan, s: int):
        """Run scheduled step ``s``; returns (ModelStep, the planner's Decisions)."""
        decisions = self.prepare_step(s)
        ids, pos, mask, cache, rows, P = self._batch(plan)
        self._rows = rows
        probe = None
        if self.probe:   # the host's speed before the step, as a validation row's steps have it
            from calibrate.measurements.host_speed import host_probe
            probe = host_probe(self.device)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = self.b.model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache,
                                  use_cache=True).logits
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            torch.cuda.synchronize(self.device)
        ms = (time.perf_counter() - t0) * 1e3
        for b, it in enumerate(plan.items):
            if self.keep_logits and (it.kind == DECODE or it.row0 + it.count == self._prompt[it.rid]):
                self.logits.setdefault(it.rid, []).append(logits[b, it.count - 1].float().cpu())
            new = [(cache.layers[i].keys[b:b + 1, :, P:P + it.count], cache.layers[i].values[b:b + 1, :, P:P + it.count])
                   for i in range(self.n_layers)]
            old = self.kv.get(it.rid)
            self.kv[it.rid] = new if old is None else [(torch.cat([ok, nk], 2), torch.cat([ov, nv], 2))
                                                        for (ok, ov), (nk, nv) in zip(old, new)]
        st = ModelStep(step=s, latency_ms=ms, executed=dict(self._executed))
        st.probe = probe
        return st, decisions

    def drop(self, rid: int) -> None:
        self.kv.pop(rid, None)


def serve_live(sc, policy, max_batch: int, replication: int, built, *, device: str = "cpu", base_dir=None,
               requests=None, host=None, keep_logits: bool = False, dispatch: str = "loop", probe: bool = False):
    """One policy at one max batch, live: ``(requests table, steps list of (plan items,
    ModelStep, Decisions), executor)``; the scheduler's clock runs on the measured step times.
    ``keep_logits``: the executor keeps each produced token's logits (``executor.logits``).
    ``dispatch``: the executor's (``loop``: engine style offload; ``grouped``: offload-grouped).
    ``probe``: the host-speed probe before each step (``ModelStep.probe``; outside its time)."""
    from simulator.runner import derive_seed
    from simulator.serving.runner import make_driver, setup_run

    if sc.model != built.spec:
        raise ValueError(f"scenario model {sc.model.name} is not the built model {built.spec.name}")
    run = setup_run(sc, policy, max_batch, replication, base_dir=base_dir, requests=requests)
    reqs, sched, planner = run.requests, run.sched, run.planner
    ex = ServingExecutor(built, policy, planner, device=device, seed=derive_seed(sc.seed, replication, 13), host=host,
                         dispatch=dispatch, probe=probe)
    ex.keep_logits = keep_logits
    ex._prompt = {r.rid: r.prompt for r in reqs}
    drive = make_driver(run)
    steps = []
    for plan, s in drive.steps():
        step, dec = ex.run_plan(plan, s)
        drive.finish(plan, step.latency_ms)
        live = {r.req.rid for r in sched.running}
        for it in plan.items:
            if it.rid not in live:
                ex.drop(it.rid)
        steps.append((plan.items, step, dec))
    return request_table(sched, sc.workload.slo), steps, ex


def compare(sc, policy_name: str, *, max_batch: int | None = None, replication: int = 0, device: str = "cuda",
            tiny: bool = False, layers: int | None = None, profile=None, base_dir=None, built=None,
            host=None) -> dict:
    """Live vs projected per-request latency of one policy: the scenario's requests served live
    on the built model (the scheduler on measured step times) and simulated (on projected
    ones); TTFT, TPOT and end-to-end mean and p90 of both, and the relative errors (one policy
    side by side; ``simmoe validate`` of a serving scenario is the whole comparison:
    :mod:`calibrate.validation.serving`)."""
    from calibrate.models.build import build_model
    from simulator.profile import load_profile
    from simulator.serving.runner import serve_one

    if built is None:
        built = build_model(sc.model.name, tiny=tiny, layers=layers, device=device, style=_style(sc))
    if built.spec != sc.model:
        sc = sc.model_copy(update={"model": built.spec})
    idx = [p.name for p in sc.policies].index(policy_name)
    pol = sc.policies[idx]
    b = max_batch or sc.batch_sizes[0]
    live, _, _ = serve_live(sc, pol, b, replication, built, device=device, base_dir=base_dir, host=host)
    prof = profile if profile is not None and not isinstance(profile, str) else load_profile(profile or sc.profile)
    sim = serve_one(sc, pol, b, replication, prof, index=idx, base_dir=base_dir).requests
    from calibrate.validation.serving import latency_stats

    out = {"policy": policy_name, "max_batch": b, "requests": len(live), "device": device}
    ls, ps = latency_stats(live), latency_stats(sim)
    for col, stats in ls.items():
        for q, lv in stats.items():
            pv = ps[col][q]
            out[f"{col}_{q}"] = {"live": lv, "projected": pv, "error": (pv - lv) / lv if lv else None}
    return out


def _style(sc) -> str:
    return sc.engine.style if sc.engine.style in ("hf-eager", "grouped", "graphs") else "hf-eager"


def main(argv=None) -> None:
    """``python -m calibrate.executors.serving SCENARIO --policy NAME [--device cuda]``: one
    policy's requests live and projected, side by side (JSON on stdout)."""
    import argparse
    import json

    from simulator.scenario import load_scenario

    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("scenario")
    ap.add_argument("--policy", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-batch", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--profile")
    a = ap.parse_args(argv)
    sc, base = load_scenario(a.scenario)
    print(json.dumps(compare(sc, a.policy, max_batch=a.max_batch, device=a.device, tiny=a.tiny, layers=a.layers,
                             profile=a.profile, base_dir=base), indent=1))


if __name__ == "__main__":
    main()
