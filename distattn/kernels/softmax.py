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
    # a causal square: q1-q0 == k1-k0, and both slices hold the same global tokens of one
    # document in the same increasing order (so local order is global order: row i sees key j <= i)
    causal: bool

    @property
    def pairs(self) -> int:
        """(query, key) pairs actually computed: the cost measure of the block."""
        n, m = self.q1 - self.q0, self.k1 - self.k0
        return n * (n + 1) // 2 if self.causal else n * m


def plan_calls(q_runs: Sequence, k_runs: Sequence, causal: bool) -> list[BlockCall]:
    """Decompose the masked block q_runs x k_runs into rectangles and causal squares.

    A run needs `local_start`, `start`, `length`, `doc`. Query i may see key j iff
    both are in the same document and (not causal or j <= i).

    Under a causal mask, a stretch of query runs that the key buffer also holds
    (same global ranges, same order, contiguous in both buffers, one document) is
    planned as ONE causal square over the stretch: since both buffers list those
    tokens in increasing global order, local order is global order and the
    kernel's causal mask is the exact mask. A zigzag rank's two chunks against
    themselves are one call, not a square, a rectangle and a square.
    """
    calls: list[BlockCall] = []
    done: set[tuple[int, int]] = set()  # (query run, key run) pairs a fused square covers
    if causal:
        for (qa, qb), (ka, kb) in _shared_stretches(q_runs, k_runs):
            if qb - qa < 2:
                continue  # one run: the plain decomposition below gives the same single square
            q0, k0 = q_runs[qa].local_start, k_runs[ka].local_start
            n = sum(r.length for r in q_runs[qa:qb])
            calls.append(BlockCall(q0, q0 + n, k0, k0 + n, True))
            done.update((i, j) for i in range(qa, qb) for j in range(ka, kb))
    for i, a in enumerate(q_runs):
        qs, qe, qo = a.start, a.start + a.length, a.local_start - a.start
        for j, b in enumerate(k_runs):
            if a.doc != b.doc or a.length == 0 or b.length == 0 or (i, j) in done:
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


def _stretches(runs: Sequence) -> list[tuple[int, int]]:
    """Index ranges [a, b) of maximal stretches of non-empty runs that are contiguous in
    the buffer, in one document and in increasing global order."""
    out: list[tuple[int, int]] = []
    a = None
    for i, r in enumerate(runs):
        if r.length == 0:
            if a is not None:
                out.append((a, i))
                a = None
            continue
        if a is not None:
            p = runs[i - 1]
            if r.doc == p.doc and r.local_start == p.local_start + p.length and r.start >= p.start + p.length:
                continue
            out.append((a, i))
        a = i
    if a is not None:
        out.append((a, len(runs)))
    return out


def _shared_stretches(q_runs: Sequence, k_runs: Sequence) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Query stretches whose exact run sequence also appears, contiguously, in the key buffer."""
    k_at: dict[tuple[int, int], list[int]] = {}
    for j, b in enumerate(k_runs):
        if b.length:
            k_at.setdefault((b.start, b.length), []).append(j)
    k_end = {j: b for a, b in _stretches(k_runs) for j in range(a, b)}  # run -> end of its stretch
    found = []
    for qa, qb in _stretches(q_runs):
        for ka in k_at.get((q_runs[qa].start, q_runs[qa].length), ()):
            kb = ka + (qb - qa)
            if kb <= k_end[ka] and all(
                    (k_runs[ka + t].start, k_runs[ka + t].length, k_runs[ka + t].doc)
                    == (q_runs[qa + t].start, q_runs[qa + t].length, q_runs[qa + t].doc)
                    for t in range(qb - qa)):
                found.append(((qa, qb), (ka, kb)))
                break
    return found


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


def prefers_head_major(device: torch.device) -> bool:
    """Whether the kernels run faster on K/V stored head-major ([H, T, D] under a [T, H, D] view).

    aten's CPU flash kernel streams every K/V block of one head past each query block: with
    each head's K/V rows contiguous its forward ran ~10% and its backward ~4% faster than on
    packed [T, H, D] (8K queries x 4K keys, 8 heads x 64, fp32, one thread); q, out and dout
    made no measurable difference."""
    return device.type == "cpu"


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
    Without them, a first call that covers every query row becomes the accumulator
    itself (no zero-filled buffer, no merge).
    """
    be = backend or select_backend(q.device, dtype=q.dtype, head_dim=q.shape[-1])
    with region("compute/attn_fwd"):
        for c in calls:
            o, l = be.forward(_view(q, c.q0, c.q1), _view(k, c.k0, c.k1), _view(v, c.k0, c.k1), c.causal,
                              scale)
            o, l = o[0].transpose(0, 1), l[0].transpose(0, 1)
            if out is None and c.q0 == 0 and c.q1 == q.shape[0]:
                out = o.to(torch.float32).contiguous()
                lse = l.to(torch.float32).contiguous()
                continue
            if out is None:
                out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
                lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
            merge_into(out[c.q0:c.q1], lse[c.q0:c.q1], o, l)
    if out is None:  # no call: every row saw no key
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse


def _call_backward(be: Backend, dout, q, k, v, out, lse, c: BlockCall, scale: float):
    lse_c = lse[c.q0:c.q1].t().unsqueeze(0).contiguous()
    gq, gk, gv = be.backward(_view(dout, c.q0, c.q1), _view(q, c.q0, c.q1), _view(k, c.k0, c.k1),
                             _view(v, c.k0, c.k1), _view(out, c.q0, c.q1), lse_c, c.causal, scale)
    return gq[0].transpose(0, 1), gk[0].transpose(0, 1), gv[0].transpose(0, 1)


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
    be = backend or select_backend(q.device, dtype=q.dtype, head_dim=q.shape[-1])
    f32 = torch.float32
    dq = torch.zeros(q.shape, dtype=f32, device=q.device) if dq is None else dq
    dk = torch.zeros(k.shape, dtype=f32, device=k.device) if dk is None else dk
    dv = torch.zeros(v.shape, dtype=f32, device=v.device) if dv is None else dv
    with region("compute/attn_bwd"):
        for c in calls:
            gq, gk, gv = _call_backward(be, dout, q, k, v, out, lse, c, scale)
            dq[c.q0:c.q1] += gq
            dk[c.k0:c.k1] += gk
            dv[c.k0:c.k1] += gv
    return dq, dk, dv


KVGrad = tuple[BlockCall, torch.Tensor, torch.Tensor]


def block_backward_parts(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, calls: Sequence[BlockCall], scale: float,
                         dq: torch.Tensor | None = None, backend: Backend | None = None
                         ) -> tuple[torch.Tensor, list[KVGrad]]:
    """`block_backward` that adds into fp32 `dq` but hands back each call's (call, dk, dv)
    ([k1-k0, Hkv, D] in the kernel's dtype) for the caller to add where its dK/dV
    accumulator lives once it has one (`add_kv_parts`): a ring adds them into the
    accumulator that arrives from its neighbour, with no zero-filled buffer between.

    Returns (dq, parts). Without a `dq`, a first call that covers every query row
    becomes dq itself (no zero-filled buffer)."""
    be = backend or select_backend(q.device, dtype=q.dtype, head_dim=q.shape[-1])
    parts: list[KVGrad] = []
    with region("compute/attn_bwd"):
        for c in calls:
            gq, gk, gv = _call_backward(be, dout, q, k, v, out, lse, c, scale)
            if dq is None and c.q0 == 0 and c.q1 == q.shape[0]:
                dq = gq.to(torch.float32).contiguous()
            else:
                if dq is None:
                    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
                dq[c.q0:c.q1] += gq
            parts.append((c, gk, gv))
    if dq is None:
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    return dq, parts


def add_kv_parts(dk: torch.Tensor, dv: torch.Tensor, parts: Sequence[KVGrad], fresh: bool = False) -> None:
    """Add `block_backward_parts` results into fp32 dk/dv; `fresh`: their content is garbage
    (a reused buffer), so rows no part covers are zeroed and the first part is copied."""
    if fresh:
        covered = len(parts) == 1 and parts[0][0].k0 == 0 and parts[0][0].k1 == dk.shape[0]
        if not covered:
            dk.zero_()
            dv.zero_()
    for i, (c, gk, gv) in enumerate(parts):
        if fresh and i == 0 and covered:
            dk.copy_(gk)
            dv.copy_(gv)
        else:
            dk[c.k0:c.k1] += gk
            dv[c.k0:c.k1] += gv
