"""Block softmax attention with document masks, returning (out, lse), and its backward.

Local math only. The queries and keys of a block are described by *runs*:
contiguous ranges of global tokens inside one document (`distattn.layout.Run`).
`plan_calls` turns a pair of run lists into kernel calls that are either fully
visible rectangles or causal squares, so:
- blocks that the causal or document mask makes empty are skipped, not masked;
- half-visible zigzag blocks cost half a block;
- no backend needs an additive mask.

Partial results are merged in fp32 (`merge.py`). Tensors are packed THD:
q [Tq, H, D], k/v [Tk, Hkv, D]; lse is [Tq, H] fp32 (-inf for rows with no key).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from distattn.kernels.backends import Backend, select_backend
from distattn.kernels.merge import merge_into
from distattn.profile.labels import region


@dataclass(frozen=True)
class BlockCall:
    """One kernel call on local buffer slices q[q0:q1] x k[k0:k1]."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool  # a causal square: q1-q0 == k1-k0 and both start at the same global token

    @property
    def pairs(self) -> int:
        """(query, key) pairs actually computed: the cost measure of the block."""
        n, m = self.q1 - self.q0, self.k1 - self.k0
        return n * (n + 1) // 2 if self.causal else n * m


def plan_calls(q_runs: Sequence, k_runs: Sequence, causal: bool) -> list[BlockCall]:
    """Decompose the masked block q_runs x k_runs into rectangles and causal squares.

    A run needs `local_start`, `start`, `length`, `doc`. Query i may see key j iff
    both are in the same document and (not causal or j <= i).
    """
    calls: list[BlockCall] = []
    for a in q_runs:
        qs, qe, qo = a.start, a.start + a.length, a.local_start - a.start
        for b in k_runs:
            if a.doc != b.doc or a.length == 0 or b.length == 0:
                continue
            ks, ke, ko = b.start, b.start + b.length, b.local_start - b.start
            if not causal or ke - 1 <= qs:
                calls.append(BlockCall(qs + qo, qe + qo, ks + ko, ke + ko, False))
                continue
            if ks > qe - 1:
                continue  # every key lies after every query
            if ks < qs:  # keys before the first query: visible to all rows
                calls.append(BlockCall(qs + qo, qe + qo, ks + ko, qs + ko, False))
            s = max(qs, ks)
            e = min(ke, qe)
            calls.append(BlockCall(s + qo, e + qo, s + ko, e + ko, True))
            if e < qe:  # rows past the last key see the whole diagonal part
                calls.append(BlockCall(e + qo, qe + qo, s + ko, e + ko, False))
    return _coalesce(calls)


def _coalesce(calls: list[BlockCall]) -> list[BlockCall]:
    """Fuse rectangles that are adjacent in both buffers, to make fewer, larger calls."""
    rect = sorted((c for c in calls if not c.causal), key=lambda c: (c.q0, c.q1, c.k0))
    fused: list[BlockCall] = []
    for c in rect:  # same rows, adjacent keys
        p = fused[-1] if fused else None
        if p is not None and (p.q0, p.q1) == (c.q0, c.q1) and p.k1 == c.k0:
            fused[-1] = BlockCall(p.q0, p.q1, p.k0, c.k1, False)
        else:
            fused.append(c)
    fused.sort(key=lambda c: (c.k0, c.k1, c.q0))
    out: list[BlockCall] = []
    for c in fused:  # same keys, adjacent rows
        p = out[-1] if out else None
        if p is not None and (p.k0, p.k1) == (c.k0, c.k1) and p.q1 == c.q0:
            out[-1] = BlockCall(p.q0, c.q1, p.k0, p.k1, False)
        else:
            out.append(c)
    out.extend(c for c in calls if c.causal)
    return out


def total_pairs(calls: Sequence[BlockCall]) -> int:
    return sum(c.pairs for c in calls)


def _view(x: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
    """THD slice -> [1, H, T, D] view."""
    return x[i0:i1].transpose(0, 1).unsqueeze(0)


def default_scale(head_dim: int, softmax_scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Clear errors for the shape mistakes users make most."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"attention expects packed [tokens, heads, head_dim] tensors; got q{tuple(q.shape)} "
                         f"k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k{tuple(k.shape)} v{tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k head_dim differ: {q.shape[2]} vs {k.shape[2]}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"GQA needs q heads % kv heads == 0: {q.shape[1]} q heads, {k.shape[1]} kv heads")


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, calls: Sequence[BlockCall],
                  scale: float, out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                  backend: Backend | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over k/v restricted to `calls`, merged into fp32 (out, lse).

    Pass existing accumulators to merge this block into earlier partials (ring steps).
    """
    be = backend or select_backend(q.device)
    if out is None:
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    with region("compute/attn_fwd"):
        for c in calls:
            o, l = be.forward(_view(q, c.q0, c.q1), _view(k, c.k0, c.k1), _view(v, c.k0, c.k1), c.causal,
                              scale)
            merge_into(out[c.q0:c.q1], lse[c.q0:c.q1], o[0].transpose(0, 1), l[0].transpose(0, 1))
    return out, lse


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, calls: Sequence[BlockCall], scale: float,
                   dq: torch.Tensor | None = None, dk: torch.Tensor | None = None,
                   dv: torch.Tensor | None = None, backend: Backend | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the block given the FINAL out and lse of the queries.

    With the global lse, each block's softmax probabilities are exact, so block
    gradients simply add up. Accumulates into fp32 dq/dk/dv (allocated if None).
    `out` and `dout` are in q's dtype.
    """
    be = backend or select_backend(q.device)
    f32 = torch.float32
    dq = torch.zeros(q.shape, dtype=f32, device=q.device) if dq is None else dq
    dk = torch.zeros(k.shape, dtype=f32, device=k.device) if dk is None else dk
    dv = torch.zeros(v.shape, dtype=f32, device=v.device) if dv is None else dv
    with region("compute/attn_bwd"):
        for c in calls:
            lse_c = lse[c.q0:c.q1].t().unsqueeze(0).contiguous()
            gq, gk, gv = be.backward(_view(dout, c.q0, c.q1), _view(q, c.q0, c.q1), _view(k, c.k0, c.k1),
                                     _view(v, c.k0, c.k1), _view(out, c.q0, c.q1), lse_c, c.causal, scale)
            dq[c.q0:c.q1] += gq[0].transpose(0, 1)
            dk[c.k0:c.k1] += gk[0].transpose(0, 1)
            dv[c.k0:c.k1] += gv[0].transpose(0, 1)
    return dq, dk, dv
