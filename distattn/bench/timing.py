"""The timing loop every benchmark shares: per-rank main-thread CPU time and wall time."""
from __future__ import annotations

import time
from typing import Callable

from distattn.comm import Comm


def timed_steps(step: Callable[[], object], iters: int, group) -> tuple[list[float], list[float]]:
    """Run `step` `iters` times after a barrier each; return (cpu seconds, wall seconds) per run.

    CPU is `time.thread_time()` of the calling thread: on a machine where ranks
    share cores it measures this rank's work, not time spent descheduled.
    """
    cpus, walls = [], []
    for _ in range(iters):
        Comm(group).barrier()
        c0, w0 = time.thread_time(), time.perf_counter()
        step()
        cpus.append(time.thread_time() - c0)
        walls.append(time.perf_counter() - w0)
    return cpus, walls
