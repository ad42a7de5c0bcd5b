"""Attention-aware packing of documents onto dp ranks and micro-batches: the public names.

The design (cost model, bins, the per-step plan and its guarantees) is described
in :mod:`distattn.sched.packer`, which holds the planner; ``pack_stream`` is a
dp rank's batch stream, ``pack_stats`` the imbalance analysis, and
``distattn.plan.cli`` the ``distattn plan batch`` command.
"""
from __future__ import annotations

from distattn.plan.cli import add_plan_parser
from distattn.sched.pack_stats import (balanced_loads, compare, lognormal_lengths, plan_stats,
                                       token_packing_loads)
from distattn.sched.pack_stream import BalancedBatchStream, build_balanced_stream
from distattn.sched.packer import STATE_VERSION, BalancedPacker, Piece, StepPlan, ffd_fits, seq_pairs

__all__ = [
    "Piece", "StepPlan", "BalancedPacker", "BalancedBatchStream", "build_balanced_stream",
    "ffd_fits", "token_packing_loads", "balanced_loads", "lognormal_lengths", "compare", "plan_stats",
    "add_plan_parser", "seq_pairs", "STATE_VERSION",
]
