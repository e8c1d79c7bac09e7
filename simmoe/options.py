"""Click options shared by several commands (click only: imported at start-up)."""
from __future__ import annotations

import click


def host_state_option(fn):
    """``--host-state fast|any`` for the commands that time a real model (calibrate engine,
    validate --executor model)."""
    return click.option(
        "--host-state", type=click.Choice(["fast", "any"]),
        help="fast: time work only while the host runs at its fast speed (a shared VM's host switches "
             "between two, 1.3-1.7x apart, every second or so): wait for it before each trial or step, "
             "re-run a trial that ended slow, and report steps that ended slow apart; any: time "
             "whatever the host's state [default: any; see docs/validation.md].")(fn)


def cpus_option(fn):
    """``--cpus LIST``: pin the run (and torch's threads) to these host CPUs."""
    return click.option(
        "--cpus", help="Pin the run to these host CPUs, e.g. 2-9, with as many torch threads (calibrate and "
                       "validate on the same ones: a host-bound step moves when its thread moves between cores, "
                       "and CPU expert compute scales with the threads).")(fn)
