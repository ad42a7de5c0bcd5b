"""Stand-in kernels for the CUDA self-test's tests on CPU: one wrong, one crashing, one raising,
one exact but slow (the real CPU kernel is the exact, fast one)."""
from __future__ import annotations

import os
import time

from distattn.kernels.backends import CpuFlash


class Wrong(CpuFlash):
    name = "wrong"

    def forward(self, q, k, v, causal, scale):
        out, lse = super().forward(q, k, v, causal, scale)
        return out * 1.05, lse


class Crash(CpuFlash):
    name = "crash"

    def backward(self, *args):
        os.abort()  # what a kernel's segmentation fault does to its process


class Raises(CpuFlash):
    name = "raises"

    def forward(self, q, k, v, causal, scale):
        if q.shape[2] != k.shape[2]:
            raise RuntimeError("rectangles are not supported")
        return super().forward(q, k, v, causal, scale)


class SlowExact(CpuFlash):
    name = "slow"

    def forward(self, q, k, v, causal, scale):
        time.sleep(0.05)
        return super().forward(q, k, v, causal, scale)
