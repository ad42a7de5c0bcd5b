"""Scheduling: cost model of attention work and planners that balance it (see cost.py, cad.py)."""
