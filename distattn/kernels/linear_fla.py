"""The chunked local part of linear attention on flash-linear-attention's kernels (CUDA, optional).

`linear.chunk_forward` / `chunk_backward` compute every run of a rank's buffer from zero state;
the schemes add the states that cross ranks (`lasp2`, `lasp1`). On CUDA with flash-linear-attention
installed (`pip install fla-core`, imported as `fla`), that part is one varlen call of
`chunk_simple_gla`: a per-head constant decay is its `g_gamma` (log lambda), no decay passes none,
scale is 1 (feature maps and scale are ours), and each run is one sequence of `cu_seqlens`. Its
backward is fla's, reached through autograd. Elsewhere, or with DISTATTN_LINEAR_KERNEL=torch,
ours runs.

Layouts: ours is grouped, q [A, R, T, d_k] and k, v [A, 1, T, d] (one state per KV head shared by
its R query heads); fla's is [1, T, heads, d] with as many K/V heads as query heads, so K/V are
expanded over R (their gradients sum back through the expand).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Sequence

import torch

from distattn.layout import Run

log = logging.getLogger("distattn")
ENV = "DISTATTN_LINEAR_KERNEL"
KERNELS = ("auto", "torch", "fla")


@functools.lru_cache(maxsize=None)
def _fla_simple_gla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:  # not installed, or no Triton/CUDA to import it with
        return None
    return chunk_simple_gla


def use_fla(device: torch.device) -> bool:
    """Whether the local chunked part runs on fla: CUDA, installed, and not turned off."""
    want = os.environ.get(ENV, "auto")
    if want not in KERNELS:
        raise ValueError(f"{ENV}={want!r} is not a linear-attention kernel; use one of {', '.join(KERNELS)}")
    if want == "torch":
        return False
    ok = device.type == "cuda" and _fla_simple_gla() is not None
    if want == "fla" and not ok:
        raise ValueError(f"{ENV}=fla needs flash-linear-attention (pip install fla-core) and tensors on "
                         f"CUDA; tensors are on {device.type}, installed: {_fla_simple_gla() is not None}. "
                         f"Set {ENV}=auto or torch")
    if ok:
        _log_once(device.type)
    return ok


@functools.lru_cache(maxsize=None)
def _log_once(device: str) -> None:
    log.info("linear attention on %s: flash-linear-attention chunk_simple_gla", device)


def _cu(runs: Sequence[Run], t: int) -> list[int] | None:
    """Run boundaries when the runs tile the buffer in order, else None."""
    cu, at = [0], 0
    for r in runs:
        if r.local_start != at:
            return None
        at += r.length
        cu.append(at)
    return cu if at == t else None


def _to_fla(x: torch.Tensor, rep: int) -> torch.Tensor:
    """Grouped [A, r, T, d] (r = R, or 1 expanded to `rep`) -> [1, T, A * rep, d]."""
    a, _, t, d = x.shape
    return x.expand(a, rep, t, d).permute(2, 0, 1, 3).reshape(1, t, a * rep, d)


def _call(q, k, v, runs: Sequence[Run], loglam):
    a, r, t, _ = q.shape
    cu = _cu(runs, t)
    if cu is None:
        raise ValueError("fla path: runs must tile the local buffer in order")
    gamma = None if loglam is None else loglam.to(torch.float32).repeat_interleave(r)
    kw = {} if gamma is None else {"g_gamma": gamma}
    o, _ = _fla_simple_gla()(_to_fla(q, r), _to_fla(k, r), _to_fla(v, r), scale=1.0,
                             cu_seqlens=torch.tensor(cu, dtype=torch.long, device=q.device), **kw)
    return o[0].reshape(t, a, r, -1).permute(1, 2, 0, 3)


def runs_tile(runs: Sequence[Run], t: int) -> bool:
    return _cu(runs, t) is not None


def fla_chunk_forward(q, k, v, runs: Sequence[Run], loglam) -> torch.Tensor:
    """Grouped output of every run from zero state: [A, R, T, d_v] fp32."""
    with torch.no_grad():
        return _call(q, k, v, runs, loglam).to(torch.float32)


def fla_chunk_backward(q, k, v, do, runs: Sequence[Run], loglam):
    """Grouped dq, dk, dv of `fla_chunk_forward` (fla's forward replayed under autograd)."""
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    with torch.enable_grad():
        o = _call(*xs, runs, loglam)
        return torch.autograd.grad(o, xs, do.to(o.dtype))


__all__ = ["fla_chunk_backward", "fla_chunk_forward", "runs_tile", "use_fla"]
