"""simmoe: project the speed of Mixture-of-Experts inference with offloaded experts.

Python API::

    import simmoe
    result = simmoe.run("scenarios/locality_high.yaml")     # or a Scenario / dict
    result.summary_df          # one row per (policy, batch size)
    result.steps               # one row per simulated step
"""
from simulator import __version__

from .api import Result, load, run



def sweep(*args, **kwargs):
    """Run a sweep (see :func:`simulator.sweep.sweep`)."""
    from simulator.sweep import sweep as _sweep

    return _sweep(*args, **kwargs)


__all__ = ["run", "load", "sweep", "Result", "__version__"]
