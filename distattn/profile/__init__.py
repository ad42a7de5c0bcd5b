"""Profiling: labelled traces, compute/communication overlap, per-rank timelines.

`labels` is imported by the communication layer and the kernels, so this
package's import stays light: the trace analysis (`trace`), reports (`report`),
timeline plots (`timeline`) and the `distattn profile` runner (`run`) are
imported only where used.
"""
from distattn.profile.labels import COMM, COMM_WAIT, COMPUTE, comm_op, profiler_active, region

__all__ = ["COMM", "COMM_WAIT", "COMPUTE", "comm_op", "profiler_active", "region"]
