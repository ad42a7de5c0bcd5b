"""Planning before a run: per-rank memory and the longest context that fits.

`memory`: a whole training step of the trainer's GPT (`distattn plan memory`).
`attention`: one attention layer's forward + backward, as `distattn sweep` runs it.
"""
from distattn.plan.attention import AttentionMemory, predict_attention_peak
from distattn.plan.memory import MemoryPlan, longest_context, predict_memory

__all__ = ["AttentionMemory", "MemoryPlan", "longest_context", "predict_attention_peak", "predict_memory"]
