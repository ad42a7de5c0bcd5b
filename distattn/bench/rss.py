"""This process's resident memory and its peak, resettable on Linux: what the CPU memory measurements read.

`ru_maxrss` never goes down, so a transient peak (a model being built, an
earlier point) would hide a smaller one; on Linux writing "5" to
/proc/self/clear_refs resets the kernel's peak counter (VmHWM) to the current
resident set. Elsewhere the peak falls back to `ru_maxrss`, which cannot be
reset, so measurements must then run in increasing size.
"""
from __future__ import annotations

import ctypes
import resource
import sys

__all__ = ["maxrss_bytes", "peak_bytes", "reset_peak", "status_bytes", "trim_heap"]


def status_bytes(key: str) -> int | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM, ...) in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def maxrss_bytes() -> int:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib if sys.platform == "darwin" else kib * 1024


def trim_heap() -> None:
    """Return glibc's free heap to the system, so the resident set is what is live."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak() -> tuple[int, str]:
    """Start a fresh peak; returns (the baseline in bytes, the source peaks will be read from)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss = status_bytes("VmRSS")
        if rss is not None:
            return rss, "vmhwm"
    except OSError:
        pass
    return maxrss_bytes(), "ru_maxrss"


def peak_bytes(source: str = "vmhwm") -> int:
    """The peak since `reset_peak` (VmHWM), or the lifetime peak (`ru_maxrss`)."""
    hwm = status_bytes("VmHWM") if source == "vmhwm" else None
    return hwm if hwm is not None else maxrss_bytes()
