"""Core attention disaggregation: the attention-server side (dispatch plans, batched tasks, serve loop).

The planner lives in :mod:`distattn.sched.cad`; the scheme that trainers call is
``distattn.get_scheme("cad")`` (:mod:`distattn.schemes.cad`).
"""
from distattn.cad.dispatch import BlobExchange, RankPlan, Roles
from distattn.cad.server import Meta, run_backward, run_forward, serve, stop_servers

__all__ = ["BlobExchange", "Meta", "RankPlan", "Roles", "run_backward", "run_forward", "serve",
           "stop_servers"]
