"""All-gather attention (Llama 3 context parallelism; the softmax side of LASP-2H).

Forward: every rank all-gathers the K/V of the whole group into one full-length
buffer (rank 0's rows, then rank 1's, ...) and attends its local queries to it.
The buffer's rows are described by runs, so the causal and any document mask
are planned once (`plan_calls`) and empty blocks are never computed; zigzag or
doc_zigzag layouts balance the causal work across ranks.

Head pieces (`head_stride`): K/V is gathered `head_stride` KV heads at a time.
Piece i holds KV heads [i*hs, (i+1)*hs) and serves query heads
[i*hs*rep, (i+1)*hs*rep) (rep = H / Hkv). The gather of piece i+1 is posted
before piece i is computed, so the network runs while the kernel does, and only
two pieces of full-length K/V are alive at once. With one piece (the default)
nothing can overlap: the transfer must finish before any key is available.

Backward re-gathers K/V in the same pieces with the same overlap, computes dq
locally and a full-length fp32 dK/dV for each piece, and reduce-scatters it so
each rank receives the sum for its own rows. The reduce-scatter of piece i runs
while piece i+1 is computed. dK/dV travels in fp32: it is a sum of W partials.

Traffic per rank (s = bytes per element, row = 2*Hkv*D elements, sizes = the
layout's per-rank token counts, padded to max(sizes) on the gather wire):
  forward   all_gather_uneven  (W-1) * max(sizes) * row * s
  backward  all_gather_uneven  (W-1) * max(sizes) * row * s
            reduce_scatter     sum_{j != rank} sizes[j] * row * 4
Head pieces split these bytes into more calls; the totals do not change.
Extra memory: two pieces of full-length K/V (double buffer) plus, in backward,
up to two pieces of full-length fp32 dK/dV.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from distattn.comm import Comm, Handle
from distattn.kernels.softmax import (block_backward, block_forward, check_shapes, default_scale,
                                      plan_calls)
from distattn.layout import Run
from distattn.schemes.base import (AttnShape, CommVolume, Scheme, concat_runs, make_comm, register,
                                   total_tokens)


def head_pieces(heads: int, kv_heads: int, head_stride: int | None) -> list[tuple[slice, slice]]:
    """(kv head slice, q head slice) of every gathered piece, in order."""
    hs = kv_heads if head_stride is None else head_stride
    rep = heads // kv_heads
    return [(slice(h, h + hs), slice(h * rep, (h + hs) * rep)) for h in range(0, kv_heads, hs)]


class AllGatherPlan:
    """Kernel calls of my queries against the gathered buffer, and the head pieces."""

    def __init__(self, my_rank: int, peer_runs: Sequence[list[Run]], causal: bool,
                 pieces: list[tuple[slice, slice]]):
        self.rank = my_rank
        self.world = len(peer_runs)
        self.sizes = [sum(r.length for r in runs) for runs in peer_runs]
        self.n_tokens = sum(self.sizes)
        self.calls = plan_calls(peer_runs[my_rank], concat_runs(list(peer_runs)), causal)
        self.pieces = pieces


def _post_gather(comm: Comm, k: torch.Tensor, v: torch.Tensor, heads: slice,
                 sizes: list[int]) -> Handle:
    kv = torch.stack((k[:, heads], v[:, heads]), dim=1)  # [T_local, 2, hs, D]: one message
    return comm.all_gather_uneven(kv, sizes, async_op=True)


def _gathered(handle: Handle) -> torch.Tensor:
    """The full-length [N, 2, hs, D] buffer: every rank's rows in rank order."""
    parts = handle.wait()
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def allgather_forward(comm: Comm, q, k, v, plan: AllGatherPlan, scale: float):
    """fp32 (out, lse) of local q over the whole group's K/V, gathered piece by piece."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    pending = _post_gather(comm, k, v, plan.pieces[0][0], plan.sizes)
    for i, (_, qh) in enumerate(plan.pieces):
        kv = _gathered(pending)
        if i + 1 < len(plan.pieces):  # the next piece travels while this one is computed
            pending = _post_gather(comm, k, v, plan.pieces[i + 1][0], plan.sizes)
        block_forward(q[:, qh], kv[:, 0], kv[:, 1], plan.calls, scale, out[:, qh], lse[:, qh])
    return out, lse


def allgather_backward(comm: Comm, dout, q, k, v, out, lse, plan: AllGatherPlan, scale: float):
    """dq and this rank's dk, dv (all fp32): re-gather K/V, reduce-scatter dK/dV."""
    f32 = torch.float32
    dq = torch.zeros(q.shape, dtype=f32, device=q.device)
    dk = torch.zeros(k.shape, dtype=f32, device=k.device)
    dv = torch.zeros(v.shape, dtype=f32, device=v.device)

    def land(handle: Handle, kh: slice) -> None:
        mine = handle.wait()  # [T_local, 2, hs, D]: this rank's rows, summed over the group
        dk[:, kh] = mine[:, 0]
        dv[:, kh] = mine[:, 1]

    scatter: tuple[Handle, slice] | None = None
    pending = _post_gather(comm, k, v, plan.pieces[0][0], plan.sizes)
    for i, (kh, qh) in enumerate(plan.pieces):
        kv = _gathered(pending)
        if i + 1 < len(plan.pieces):
            pending = _post_gather(comm, k, v, plan.pieces[i + 1][0], plan.sizes)
        g = torch.zeros((plan.n_tokens, *kv.shape[1:]), dtype=f32, device=kv.device)
        block_backward(dout[:, qh], q[:, qh], kv[:, 0], kv[:, 1], out[:, qh], lse[:, qh],
                       plan.calls, scale, dq=dq[:, qh], dk=g[:, 0], dv=g[:, 1])
        del kv
        if scatter is not None:  # the previous piece's reduce-scatter ran during this compute
            land(*scatter)
        scatter = (comm.reduce_scatter(g, sizes=plan.sizes, async_op=True), kh)
    assert scatter is not None
    land(*scatter)
    return dq, dk, dv


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, comm: Comm, plan: AllGatherPlan, scale: float):
        with comm.ledger.tag("fwd"):
            out, lse = allgather_forward(comm, q, k, v, plan, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.comm, ctx.plan, ctx.scale = comm, plan, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with ctx.comm.ledger.tag("bwd"):
            dq, dk, dv = allgather_backward(ctx.comm, dout.contiguous(), q, k, v, out, lse,
                                            ctx.plan, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def allgather_attention(q, k, v, *, comm: Comm, peer_runs: Sequence[list[Run]], causal: bool = True,
                        softmax_scale: float | None = None, head_stride: int | None = None
                        ) -> torch.Tensor:
    """All-gather attention over `comm`'s group; `peer_runs[j]` describes rank j's rows."""
    check_shapes(q, k, v)
    _check_head_stride(head_stride, k.shape[1])
    if len(peer_runs) != comm.size:
        raise ValueError(f"peer_runs has {len(peer_runs)} entries for a group of {comm.size}")
    mine = sum(r.length for r in peer_runs[comm.rank])
    if q.shape[0] != mine:
        raise ValueError(f"rank {comm.rank} holds {q.shape[0]} tokens but the layout gives it {mine}")
    plan = AllGatherPlan(comm.rank, peer_runs, causal, head_pieces(q.shape[1], k.shape[1], head_stride))
    return _AllGatherAttention.apply(q, k, v, comm, plan, default_scale(q.shape[-1], softmax_scale))


def _check_head_stride(head_stride: int | None, kv_heads: int) -> None:
    if head_stride is None:
        return
    valid = [d for d in range(1, kv_heads + 1) if kv_heads % d == 0]
    if isinstance(head_stride, bool) or not isinstance(head_stride, int) or head_stride < 1 \
            or kv_heads % head_stride:
        raise ValueError(f"allgather head_stride={head_stride!r} must divide the number of KV heads "
                         f"(Hkv={kv_heads}); valid head_stride values: None (all heads in one piece) "
                         f"or {', '.join(map(str, valid))}")


@register("allgather")
@dataclass
class AllGather(Scheme):
    """Gather the whole group's K/V, attend locally, reduce-scatter dK/dV (Llama 3 CP)."""

    layout_name: str = "zigzag"
    head_stride: int | None = None
    layout_weights: tuple[float, ...] | None = None  # per-rank speeds (layout "weighted")

    def __post_init__(self):
        hs = self.head_stride
        if hs is not None and (isinstance(hs, bool) or not isinstance(hs, int) or hs < 1):
            raise ValueError(f"allgather head_stride must be None (all KV heads in one piece) or a "
                             f"positive integer that divides the number of KV heads, got {hs!r}")

    def validate(self, *, heads: int, kv_heads: int, world: int) -> None:
        if kv_heads < 1 or heads < 1:
            raise ValueError(f"allgather needs at least one head: {heads} heads, {kv_heads} kv heads")
        super().validate(heads=heads, kv_heads=kv_heads, world=world)
        if world < 1:
            raise ValueError(f"allgather needs a group of at least one rank, got world={world}")
        _check_head_stride(self.head_stride, kv_heads)

    def attention(self, q, k, v, *, group, cu_seqlens=None, causal=True, softmax_scale=None,
                  ledger=None, n_tokens=None):
        comm = make_comm(group, ledger)
        check_shapes(q, k, v)
        self.validate(heads=q.shape[1], kv_heads=k.shape[1], world=comm.size)
        n = total_tokens(q.shape[0], comm, n_tokens)
        lay = self.layout(n, comm.size, cu_seqlens)
        return allgather_attention(q, k, v, comm=comm, peer_runs=[lay.runs(r) for r in range(comm.size)],
                                   causal=causal, softmax_scale=softmax_scale,
                                   head_stride=self.head_stride)

    def comm_bytes(self, shape: AttnShape, world: int, rank: int = 0) -> CommVolume:
        self.validate(heads=shape.heads, kv_heads=shape.kv_heads, world=world)
        sizes = self.layout(shape.n_tokens, world, shape.cu_seqlens).sizes()
        row = 2 * shape.kv_heads * shape.head_dim  # K and V elements per token
        gather = (world - 1) * max(sizes) * row * shape.dtype_bytes  # padded to the largest shard
        scatter = sum(s for j, s in enumerate(sizes) if j != rank) * row * 4  # fp32 dK/dV
        return CommVolume(fwd={"all_gather_uneven": gather},
                          bwd={"all_gather_uneven": gather, "reduce_scatter": scatter})
