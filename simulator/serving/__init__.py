"""Serving workloads: requests arrive, a continuous-batching scheduler builds each engine step,
phase-aware policies place prefill and decode experts (docs/serving.md).

Modules: ``spec`` (the ``workload:`` and per-policy ``serving:`` keys), ``workload`` (requests
and their routing), ``scheduler`` (continuous batching, apart from the engine), ``phase``
(prefill placement, upload budget), ``planner`` (the planner over a growing trace),
``runner`` (scheduler + planner + engine), ``metrics`` (per-request latency summaries),
``sweep`` (arrival-rate search for the SLO).
"""
