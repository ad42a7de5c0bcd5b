"""Planning before a run: per-rank memory and the longest context that fits."""
from distattn.plan.memory import MemoryPlan, longest_context, predict_memory

__all__ = ["MemoryPlan", "longest_context", "predict_memory"]
