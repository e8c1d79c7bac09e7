"""simmoe: project the speed of Mixture-of-Experts inference with offloaded experts.

Python API::

    import simmoe
    result = simmoe.run("scenarios/locality_high.yaml")     # or a Scenario / dict
    result.summary_df          # one row per (policy, batch size)
    result.steps               # one row per simulated step
    served = simmoe.serve("scenarios/serving_olmoe.yaml", replications=1)   # a serving scenario
    served.requests            # one row per request: TTFT, TPOT, end-to-end latency

The API is imported on first use, so the command line (``simmoe --help``) starts without
pandas, scipy or the simulator.
"""
from simulator import __version__

__all__ = ["run", "serve", "load", "sweep", "Result", "__version__"]


def __getattr__(name: str):
    if name in ("run", "serve", "load", "Result"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'simmoe' has no attribute {name!r}")


def sweep(*args, **kwargs):
    """Run a sweep (see :func:`simulator.sweep.sweep`)."""
    from simulator.sweep import sweep as _sweep

    return _sweep(*args, **kwargs)
