"""Trace-driven simulation: the expert-cache simulator (simulate.py), policy sweeps (sweep.py) and the
batching simulation (batching.py). Analysis code: the runtime never imports this package."""
