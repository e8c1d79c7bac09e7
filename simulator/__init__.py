"""simmoe's simulator: the pure model of expert offloading (no torch).

traces/    routing traces and synthetic generators
policies/  load modes, eviction, prefetch, miss handling (decide what, never when)
planner    applies policies to a trace: the operations each layer-step issues
engine     SimPy model of the host, compute stream and copy engine timing those operations
profile    hardware profiles and the cost model
scenario   the scenario schema
runner     scenario -> per-step records -> metrics
"""
__version__ = "0.1.0"
