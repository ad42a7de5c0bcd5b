"""What every benchmark shares: the timing loop (per-rank main-thread CPU time and wall time)
and the random q, k, v, dout it feeds the schemes."""
from __future__ import annotations

import time
from typing import Callable

import torch

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


def random_qkvdo(n: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    """Full-length q [n, H, D], k, v [n, Hkv, D] and dout [n, H, D], drawn in fp32 then cast."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(n, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(n, kv_heads, head_dim, generator=g).to(dtype)
    do = torch.randn(n, heads, head_dim, generator=g).to(dtype)
    return q, k, v, do
