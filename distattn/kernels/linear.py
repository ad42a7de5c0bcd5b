"""Chunked causal linear attention on one rank's tokens, with optional per-head decay.

The target, per head and document (t, s are positions in the document):

    o_t = sum_{s <= t} lam^(t - s) * (phi(q_t) . phi(k_s)) * v_s

with lam in (0, 1] a per-head constant (lam = 1: plain linear attention;
Lightning / RetNet decay otherwise) and phi a feature map ("identity" or
"elu1" = elu(x) + 1). There is no normalisation and no softmax scale.

How it is computed (Lightning style, no cumsum over tokens). A segment of L
tokens is cut into blocks of `block` tokens plus one shorter tail block (the tail
is never dropped). Inside a block the output is a masked matmul,
((Q K^T) * D) V with D[i, j] = lam^(i-j) for i >= j, else 0. Across blocks a
d_k x d_v state carries the past: block b contributes
M_b = (K_b * lam^(B-1-j))^T V_b, the state entering block b is
S_b = lam^B S_{b-1} + M_{b-1}, and block b adds (Q_b * lam^(i+1)) S_b. Only the
block scan over the states is sequential; states are fp32 whatever the input
dtype. Powers of lam are always non-negative (exp(n log lam)), so long
segments underflow to 0 instead of overflowing.

Everything here is local math: schemes (`lasp2`, `lasp1`) move the states
between ranks. A run (see `distattn.layout.Run`) is processed as a segment that
starts from zero state; a scheme adds the contribution of the state entering
the run afterwards, which is linear: (Q * lam^(j+1)) P over the run. The same
split holds in backward (`run_state_backward`, `apply_state_grad_q`,
`state_grad`), which is what lets LASP-2 overlap the intra-run work with its
all-gather.

Internal layout ("grouped"): q is [A, R, T, d_k] and k, v are [A, 1, T, d] in
fp32. With GQA and a decay that is uniform inside every group of query heads
sharing a KV head, A = kv heads and R = q heads per kv head: states are kept per
KV head (R times less state traffic). A per-head decay that differs inside a
group gives A = q heads, R = 1 and repeats K/V. See `HeadPlan`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from distattn.layout import Run, as_cu_seqlens
from distattn.profile.labels import region

__all__ = [
    "DEFAULT_BLOCK",
    "FEATURE_MAPS",
    "HeadPlan",
    "check_linear_shapes",
    "check_block",
    "check_feature_map",
    "normalize_decay",
    "plan_heads",
    "feature_map",
    "feature_map_backward",
    "group_inputs",
    "group_q",
    "group_kv",
    "ungroup_q",
    "ungroup_kv",
    "segment_forward",
    "segment_backward",
    "chunk_forward",
    "chunk_backward",
    "run_state",
    "run_state_backward",
    "apply_state",
    "apply_state_grad_q",
    "state_grad",
    "decay_pow",
    "local_runs",
    "linear_attention_local",
    "reference_linear_attention",
]

from distattn.kernels.linear_heads import (  # noqa: F401  (re-exported: the kernels' public names)
    DEFAULT_BLOCK, F32, FEATURE_MAPS, HeadPlan, check_block, check_feature_map, check_linear_shapes,
    feature_map, feature_map_backward, group_inputs, group_kv, group_q, normalize_decay, plan_heads,
    ungroup_kv, ungroup_q)


# ----------------------------------------------------------------------------- decay helpers


def decay_pow(loglam: torch.Tensor | None, exps: torch.Tensor) -> torch.Tensor | None:
    """lam^exps as [A, n] (exps >= 0, any float dtype); None when there is no decay."""
    if loglam is None:
        return None
    return torch.exp(loglam[:, None] * exps.to(F32)[None, :])


def _ramp(loglam, n: int, first: int, step: int, device) -> torch.Tensor | None:
    """lam^(first + step*i), i in [0, n), shaped [A, 1, n, 1] to scale token rows."""
    if loglam is None:
        return None
    e = first + step * torch.arange(n, device=device, dtype=F32)
    return decay_pow(loglam, e)[:, None, :, None]


def _scalar_pow(loglam, n: int) -> torch.Tensor | None:
    """lam^n per state head, shaped [A, 1, 1, 1]."""
    if loglam is None:
        return None
    return torch.exp(loglam * float(n)).view(-1, 1, 1, 1)


def _scale(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return x if w is None else x * w


_TRIL: dict[tuple[int, str], torch.Tensor] = {}


def _block_mask(loglam, b: int, device) -> torch.Tensor:
    """D[i, j] = lam^(i-j) for i >= j else 0: [A, 1, 1, b, b] (or [b, b] without decay)."""
    if loglam is None:
        key = (b, str(device))
        m = _TRIL.get(key)
        if m is None:
            m = torch.ones(b, b, dtype=F32, device=device).tril_()
            if len(_TRIL) > 64:
                _TRIL.clear()
            _TRIL[key] = m
        return m
    i = torch.arange(b, device=device, dtype=F32)
    diff = i[:, None] - i[None, :]
    d = torch.exp(loglam[:, None, None] * diff.clamp(min=0)[None]) * (diff >= 0)
    return d[:, None, None]


# ----------------------------------------------------------------------------- one block size


def _sum_r(x: torch.Tensor) -> torch.Tensor:
    """Sum over the query-heads-per-state-head axis (a no-op when it has one entry)."""
    return x if x.shape[1] == 1 else x.sum(1, keepdim=True)


def _blocks(x: torch.Tensor, b: int) -> torch.Tensor:
    a, r, n, d = x.shape
    return x.reshape(a, r, n // b, b, d)


def _scan_fwd(m: torch.Tensor, s0: torch.Tensor | None, lam_b) -> tuple[torch.Tensor, torch.Tensor]:
    """States entering every block and the state after the last: m [A, 1, nb, dk, dv].

    A plain loop over blocks: each step is one d x d multiply-add per head
    (torch's cumsum along a strided block axis is several times slower).
    """
    nb = m.shape[2]
    s_in = torch.empty_like(m)
    s = torch.zeros_like(m[:, :, 0]) if s0 is None else s0
    for b in range(nb):
        s_in[:, :, b] = s
        s = s + m[:, :, b] if lam_b is None else torch.addcmul(m[:, :, b], s, lam_b)
    return s_in, s


def _scan_bwd(ds: torch.Tensor, g_end: torch.Tensor | None, lam_b) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. the state after every block, and w.r.t. the state entering block 0.

    ds[b] is the local gradient of the state entering block b; g_end the gradient
    of the state after the last block (from later tokens).
    """
    nb = ds.shape[2]
    g = torch.empty_like(ds)
    acc = torch.zeros_like(ds[:, :, 0]) if g_end is None else g_end
    for b in range(nb - 1, -1, -1):
        g[:, :, b] = acc
        acc = acc + ds[:, :, b] if lam_b is None else torch.addcmul(ds[:, :, b], acc, lam_b)
    return g, acc


def _fwd_group(q, k, v, loglam, b: int, s0, need_state: bool):
    """Output of a segment whose length is a multiple of b, and the state after it."""
    a, r, n, _ = q.shape
    nb = n // b
    dev = q.device
    qb, kb, vb = _blocks(q, b), _blocks(k, b), _blocks(v, b)
    s = torch.matmul(qb, kb.transpose(-1, -2)).mul_(_block_mask(loglam, b, dev))
    o = torch.matmul(s, vb)
    del s
    s_out = None
    if nb > 1 or s0 is not None or need_state:
        kw = _scale(kb, _ramp(loglam, b, b - 1, -1, dev)[:, :, None] if loglam is not None else None)
        m = torch.matmul(kw.transpose(-1, -2), vb)  # [A, 1, nb, dk, dv]
        s_in, s_out = _scan_fwd(m, s0, _scalar_pow(loglam, b))
        qw = _scale(qb, _ramp(loglam, b, 1, 1, dev)[:, :, None] if loglam is not None else None)
        if s0 is None:  # block 0 enters with zero state
            o[:, :, 1:] += torch.matmul(qw[:, :, 1:], s_in[:, :, 1:])
        else:
            o += torch.matmul(qw, s_in)
    return o.reshape(a, r, n, -1), s_out


def _bwd_group(q, k, v, do, loglam, b: int, s0, g_end):
    """dq, dk, dv of a segment whose length is a multiple of b, and d(state entering it)."""
    a, r, n, _ = q.shape
    nb = n // b
    dev = q.device
    qb, kb, vb, dob = _blocks(q, b), _blocks(k, b), _blocks(v, b), _blocks(do, b)
    mask = _block_mask(loglam, b, dev)
    p = torch.matmul(qb, kb.transpose(-1, -2)).mul_(mask)  # [A, R, nb, b, b]
    dv = _sum_r(torch.matmul(p.transpose(-1, -2), dob))
    del p
    dp = torch.matmul(dob, vb.transpose(-1, -2)).mul_(mask)
    dq = torch.matmul(dp, kb)
    dk = _sum_r(torch.matmul(dp.transpose(-1, -2), qb))
    del dp
    up = _ramp(loglam, b, 1, 1, dev)  # lam^(i+1)
    down = _ramp(loglam, b, b - 1, -1, dev)  # lam^(b-1-j)
    up = up[:, :, None] if up is not None else None
    down = down[:, :, None] if down is not None else None
    lam_b = _scalar_pow(loglam, b)
    kw = _scale(kb, down)
    qw = _scale(qb, up)
    # states entering each block (recomputed: d x d per block, cheap)
    m = torch.matmul(kw.transpose(-1, -2), vb)
    s_in, _ = _scan_fwd(m, s0, lam_b)
    dq += _scale(torch.matmul(dob, s_in.transpose(-1, -2)), up)
    ds = _sum_r(torch.matmul(qw.transpose(-1, -2), dob))  # local d(state entering b)
    g, ds0 = _scan_bwd(ds, g_end, lam_b)
    dk += _scale(torch.matmul(vb, g.transpose(-1, -2)), down)
    dv += torch.matmul(kw, g)
    return (dq.reshape(a, r, n, -1), dk.reshape(a, 1, n, -1), dv.reshape(a, 1, n, -1), ds0)


# ----------------------------------------------------------------------------- segments


def segment_forward(q, k, v, loglam, block: int = DEFAULT_BLOCK, s0=None, need_state: bool = False):
    """Grouped output of one segment (full blocks, then the tail), and its final state.

    q [A, R, L, dk], k [A, 1, L, dk], v [A, 1, L, dv] fp32; s0 [A, 1, dk, dv] or None.
    """
    n = q.shape[2]
    full = (n // block) * block
    if full == n or full == 0:
        return _fwd_group(q, k, v, loglam, block if full else n, s0, need_state)
    o1, s = _fwd_group(q[:, :, :full], k[:, :, :full], v[:, :, :full], loglam, block, s0, True)
    o2, s = _fwd_group(q[:, :, full:], k[:, :, full:], v[:, :, full:], loglam, n - full, s, need_state)
    return torch.cat((o1, o2), dim=2), s


def segment_backward(q, k, v, do, loglam, block: int = DEFAULT_BLOCK, s0=None, g_end=None):
    """dq, dk, dv of one segment and d(state entering it); g_end = d(state after it)."""
    n = q.shape[2]
    full = (n // block) * block
    if full == n or full == 0:
        return _bwd_group(q, k, v, do, loglam, block if full else n, s0, g_end)
    head = slice(0, full)
    tail = slice(full, n)
    s_mid = run_state(k[:, :, head], v[:, :, head], loglam)[:, None]
    if s0 is not None:
        s_mid = s_mid + _scale(s0, _scalar_pow(loglam, full))
    dq2, dk2, dv2, g_mid = _bwd_group(q[:, :, tail], k[:, :, tail], v[:, :, tail], do[:, :, tail],
                                      loglam, n - full, s_mid, g_end)
    dq1, dk1, dv1, ds0 = _bwd_group(q[:, :, head], k[:, :, head], v[:, :, head], do[:, :, head],
                                    loglam, block, s0, g_mid)
    return (torch.cat((dq1, dq2), 2), torch.cat((dk1, dk2), 2), torch.cat((dv1, dv2), 2), ds0)


# ----------------------------------------------------------------------------- whole-run state terms


def _state_region(fn):
    """Label a state term `compute/linear_state` in profiler traces (no cost otherwise)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with region("compute/linear_state"):
            return fn(*args, **kwargs)
    return wrapper


@_state_region
def run_state(k, v, loglam) -> torch.Tensor:
    """State a run leaves behind from zero: sum_j lam^(L-1-j) k_j^T v_j -> [A, dk, dv]."""
    n = k.shape[2]
    w = _ramp(loglam, n, n - 1, -1, k.device)
    return torch.matmul(_scale(k[:, 0], None if w is None else w[:, 0]).transpose(-1, -2), v[:, 0])


@_state_region
def run_state_backward(k, v, g, loglam) -> tuple[torch.Tensor, torch.Tensor]:
    """dk, dv ([A, 1, L, d]) of `run_state` given g = d loss / d state [A, dk, dv]."""
    n = k.shape[2]
    w = _ramp(loglam, n, n - 1, -1, k.device)
    g = g[:, None]
    dk = _scale(torch.matmul(v, g.transpose(-1, -2)), w)
    dv = torch.matmul(_scale(k, w), g)
    return dk, dv


@_state_region
def apply_state(q, s, loglam) -> torch.Tensor:
    """Output of a run's queries against the state entering it: (q * lam^(j+1)) s -> [A, R, L, dv]."""
    w = _ramp(loglam, q.shape[2], 1, 1, q.device)
    return torch.matmul(_scale(q, w), s[:, None])


@_state_region
def apply_state_grad_q(do, s, loglam) -> torch.Tensor:
    """d q of `apply_state`: (do s^T) * lam^(j+1)."""
    w = _ramp(loglam, do.shape[2], 1, 1, do.device)
    return _scale(torch.matmul(do, s[:, None].transpose(-1, -2)), w)


@_state_region
def state_grad(q, do, loglam) -> torch.Tensor:
    """d loss / d (state entering a run) through the run's own outputs: sum_R (q*lam^(j+1))^T do."""
    w = _ramp(loglam, q.shape[2], 1, 1, q.device)
    return torch.matmul(_scale(q, w).transpose(-1, -2), do).sum(1)


# ----------------------------------------------------------------------------- runs of a buffer


def _fla(q, runs) -> bool:
    """flash-linear-attention's kernel for this buffer (CUDA, installed, runs tiling the buffer)."""
    if q.device.type != "cuda":
        return False
    from distattn.kernels.linear_fla import runs_tile, use_fla
    return use_fla(q.device) and runs_tile(runs, q.shape[2])


def chunk_forward(q, k, v, runs: Sequence[Run], loglam, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Grouped output of every run of a local buffer, each from zero state."""
    with region("compute/linear_fwd"):
        if _fla(q, runs):
            from distattn.kernels.linear_fla import fla_chunk_forward
            return fla_chunk_forward(q, k, v, runs, loglam)
        return _chunk_forward(q, k, v, runs, loglam, block)


def _chunk_forward(q, k, v, runs: Sequence[Run], loglam, block: int) -> torch.Tensor:
    a, r, t, _ = q.shape
    if len(runs) == 1 and runs[0].local_start == 0 and runs[0].length == t:
        return segment_forward(q, k, v, loglam, block)[0]
    o = torch.empty((a, r, t, v.shape[-1]), dtype=F32, device=q.device)
    for run in runs:
        sl = slice(run.local_start, run.local_start + run.length)
        o[:, :, sl] = segment_forward(q[:, :, sl], k[:, :, sl], v[:, :, sl], loglam, block)[0]
    return o


def chunk_backward(q, k, v, do, runs: Sequence[Run], loglam, block: int = DEFAULT_BLOCK):
    """Grouped dq, dk, dv of `chunk_forward` (every run from zero state, no later tokens)."""
    with region("compute/linear_bwd"):
        if _fla(q, runs):
            from distattn.kernels.linear_fla import fla_chunk_backward
            return fla_chunk_backward(q, k, v, do, runs, loglam)
        return _chunk_backward(q, k, v, do, runs, loglam, block)


def _chunk_backward(q, k, v, do, runs: Sequence[Run], loglam, block: int):
    t = q.shape[2]
    if len(runs) == 1 and runs[0].local_start == 0 and runs[0].length == t:
        return segment_backward(q, k, v, do, loglam, block)[:3]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for run in runs:
        sl = slice(run.local_start, run.local_start + run.length)
        g = segment_backward(q[:, :, sl], k[:, :, sl], v[:, :, sl], do[:, :, sl], loglam, block)
        dq[:, :, sl], dk[:, :, sl], dv[:, :, sl] = g[:3]
    return dq, dk, dv


def local_runs(n_tokens: int, cu_seqlens=None) -> list[Run]:
    """Runs of a whole packed sequence held by one device: one per document."""
    cu = as_cu_seqlens(cu_seqlens, n_tokens)
    return [Run(a, a, b - a, d, a) for d, (a, b) in enumerate(zip(cu[:-1], cu[1:]))]


# ----------------------------------------------------------------------------- single device


class _LocalLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, runs, plan: HeadPlan, fmap, block):
        loglam = plan.loglam(q.device)
        qg, kg, vg = group_inputs(q, k, v, plan, fmap)
        out = ungroup_q(chunk_forward(qg, kg, vg, runs, loglam, block), q.dtype)
        ctx.save_for_backward(q, k, v)
        ctx.runs, ctx.plan, ctx.fmap, ctx.block = runs, plan, fmap, block
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        plan, fmap = ctx.plan, ctx.fmap
        loglam = plan.loglam(q.device)
        qg, kg, vg = group_inputs(q, k, v, plan, fmap)
        dq, dk, dv = chunk_backward(qg, kg, vg, group_q(dout, plan), ctx.runs, loglam, ctx.block)
        dq = feature_map_backward(q, ungroup_q(dq, F32), fmap)
        dk = feature_map_backward(k, ungroup_kv(dk, plan), fmap)
        dv = ungroup_kv(dv, plan)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def linear_attention_local(q, k, v, *, cu_seqlens=None, decay=None, feature_map: str | None = None,
                           block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Causal linear attention of a whole packed sequence on one device (differentiable).

    q [T, H, dk], k [T, Hkv, dk], v [T, Hkv, dv]; the state resets at every
    document start of `cu_seqlens`. Returns [T, H, dv] in q's dtype.
    """
    check_linear_shapes(q, k, v)
    check_block(block)
    fmap = check_feature_map(feature_map)
    plan = plan_heads(q.shape[1], k.shape[1], decay)
    return _LocalLinear.apply(q, k, v, local_runs(q.shape[0], cu_seqlens), plan, fmap, block)


# ----------------------------------------------------------------------------- reference


def reference_linear_attention(q, k, v, cu_seqlens=None, decay=None,
                               feature_map: str | None = None) -> torch.Tensor:
    """Dense ((phi(Q) phi(K)^T) * D) V with D the causal decay + document mask (O(T^2), tests only).

    Computed in fp64 from the given inputs; differentiable through autograd.
    Returns [T, H, dv] fp64.
    """
    check_linear_shapes(q, k, v)
    t, h, _ = q.shape
    hkv = k.shape[1]
    name = check_feature_map(feature_map)

    def phi(x):
        x = x.to(torch.float64)
        return F.elu(x) + 1.0 if name == "elu1" else x

    qf, kf, vf = phi(q), phi(k), v.to(torch.float64)
    if hkv != h:
        kf = kf.repeat_interleave(h // hkv, dim=1)
        vf = vf.repeat_interleave(h // hkv, dim=1)
    lam = normalize_decay(decay, h)
    lam = torch.ones(h, dtype=torch.float64) if lam is None else lam
    lam = lam.to(q.device)
    idx = torch.arange(t, device=q.device)
    cu = torch.as_tensor(as_cu_seqlens(cu_seqlens, t), device=q.device)
    doc = torch.searchsorted(cu[1:], idx, right=True)
    diff = (idx[:, None] - idx[None, :]).to(torch.float64)
    keep = (diff >= 0) & (doc[:, None] == doc[None, :])
    dmask = torch.where(keep[None], lam[:, None, None] ** diff.clamp(min=0)[None],
                        torch.zeros((), dtype=torch.float64, device=q.device))
    s = torch.einsum("thd,shd->hts", qf, kf) * dmask
    return torch.einsum("hts,she->the", s, vf)
