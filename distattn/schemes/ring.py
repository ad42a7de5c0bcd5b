"""Ring attention: K/V blocks rotate around the CP group; compute hides the transfer.

Forward, step s on rank r: the block of rank (r - s) is here. The transfer of the
next block is posted *before* this block is computed, and waited after, so the
network runs while the kernel does. With the zigzag layout (rank r holds chunks
r and 2W-1-r) every rank computes the same amount per step, and blocks the
causal mask empties are never computed (the kernel planner skips them).

Backward replays the ring. Each K/V block travels with a dK/dV accumulator: a
rank adds its contribution and passes it on; one extra hop brings it home. The
accumulator travels in fp32 by default (`dkv_dtype="fp32"`), because summing W
bf16 partials loses digits as W grows.

Traffic per rank (s = bytes per element, KVblk = 2*T_local*Hkv*D elements):
forward (W-1)*KVblk*s, backward (W-1)*KVblk*s for K/V plus W*KVblk*4 for dK/dV.
Uneven shards (doc_zigzag, weighted) change the block sizes, not the algorithm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from distattn.comm import Comm
from distattn.kernels.softmax import (block_backward, block_forward, check_shapes, default_scale,
                                      plan_calls)
from distattn.layout import Run
from distattn.schemes.base import (AttnShape, CommVolume, Scheme, make_comm, register,
                                   total_tokens)


class RingPlan:
    """Kernel calls of my queries against every peer's block, computed once per call."""

    def __init__(self, my_rank: int, peer_runs: Sequence[list[Run]], causal: bool):
        self.world = len(peer_runs)
        self.rank = my_rank
        self.sizes = [sum(r.length for r in runs) for runs in peer_runs]
        mine = peer_runs[my_rank]
        self.calls = [plan_calls(mine, peer_runs[(my_rank - s) % self.world], causal)
                      for s in range(self.world)]

    def src(self, step: int) -> int:
        return (self.rank - step) % self.world


def _kv_pack(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.stack((k, v), dim=1)  # [T, 2, Hkv, D]: one message per hop


def ring_forward(comm: Comm, q, k, v, plan: RingPlan, scale: float):
    """fp32 (out, lse) of local q over the whole ring's K/V."""
    W, nxt, prv = comm.size, (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    kv = _kv_pack(k, v)
    out = lse = None
    for s in range(W):
        pending = None
        if s < W - 1:  # post the next hop before computing this block
            buf = kv.new_empty((plan.sizes[plan.src(s + 1)], *kv.shape[1:]))
            pending = comm.exchange([(kv, nxt)], [(buf, prv)])
        out, lse = block_forward(q, kv[:, 0], kv[:, 1], plan.calls[s], scale, out, lse)
        if pending is not None:
            kv = pending.wait()[0]
    if out is None:  # pragma: no cover - W >= 1 always runs one step
        raise RuntimeError("empty ring")
    return out, lse


def ring_backward(comm: Comm, dout, q, k, v, out, lse, plan: RingPlan, scale: float,
                  dkv_dtype: torch.dtype):
    """dq (fp32) and this rank's dk, dv (fp32) via a second lap of the ring."""
    W, nxt, prv = comm.size, (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    kv = _kv_pack(k, v)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv_pending = None
    for s in range(W):
        kv_pending = None
        if s < W - 1:
            buf = kv.new_empty((plan.sizes[plan.src(s + 1)], *kv.shape[1:]))
            kv_pending = comm.exchange([(kv, nxt)], [(buf, prv)])
        g = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        block_backward(dout, q, kv[:, 0], kv[:, 1], out, lse, plan.calls[s], scale,
                       dq=dq, dk=g[:, 0], dv=g[:, 1])
        if dkv_pending is not None:  # contributions of earlier ranks to this block
            g += dkv_pending.wait()[0].to(torch.float32)
        if W == 1:
            return dq, g[:, 0], g[:, 1]
        # pass the accumulator on; after W hops it arrives at the block's owner
        home_size = plan.sizes[plan.src(s + 1)]
        recv = torch.empty((home_size, *kv.shape[1:]), dtype=dkv_dtype, device=kv.device)
        dkv_pending = comm.exchange([(g.to(dkv_dtype), nxt)], [(recv, prv)])
        if kv_pending is not None:
            kv = kv_pending.wait()[0]
    mine = dkv_pending.wait()[0].to(torch.float32)
    return dq, mine[:, 0], mine[:, 1]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, comm: Comm, plan: RingPlan, scale: float, dkv_dtype):
        with comm.ledger.tag("fwd"):
            out, lse = ring_forward(comm, q, k, v, plan, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.comm, ctx.plan, ctx.scale, ctx.dkv_dtype = comm, plan, scale, dkv_dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with ctx.comm.ledger.tag("bwd"):
            dq, dk, dv = ring_backward(ctx.comm, dout.contiguous(), q, k, v, out, lse, ctx.plan,
                                       ctx.scale, ctx.dkv_dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_attention(q, k, v, *, comm: Comm, peer_runs: Sequence[list[Run]], causal: bool = True,
                   softmax_scale: float | None = None, dkv_dtype: str = "fp32") -> torch.Tensor:
    """Ring attention over `comm`'s group; `peer_runs[j]` describes rank j's rows."""
    check_shapes(q, k, v)
    if len(peer_runs) != comm.size:
        raise ValueError(f"peer_runs has {len(peer_runs)} entries for a group of {comm.size}")
    if q.shape[0] != plan_size(peer_runs, comm.rank):
        raise ValueError(f"rank {comm.rank} holds {q.shape[0]} tokens but the layout gives it "
                         f"{plan_size(peer_runs, comm.rank)}")
    plan = RingPlan(comm.rank, peer_runs, causal)
    dt = torch.float32 if dkv_dtype == "fp32" else q.dtype
    return _RingAttention.apply(q, k, v, comm, plan, default_scale(q.shape[-1], softmax_scale), dt)


def plan_size(peer_runs, rank: int) -> int:
    return sum(r.length for r in peer_runs[rank])


DKV_DTYPES = ("fp32", "input")


@register("ring")
@dataclass
class Ring(Scheme):
    """Ring attention (zigzag by default; doc_zigzag for packed documents)."""

    layout_name: str = "zigzag"
    dkv_dtype: str = "fp32"
    layout_weights: tuple[float, ...] | None = None  # per-rank speeds (layout "weighted")

    def __post_init__(self):
        if self.dkv_dtype not in DKV_DTYPES:
            raise ValueError(f"ring dkv_dtype must be one of {DKV_DTYPES}, got {self.dkv_dtype!r}")

    def attention(self, q, k, v, *, group, cu_seqlens=None, causal=True, softmax_scale=None,
                  ledger=None, n_tokens=None):
        comm = make_comm(group, ledger)
        n = total_tokens(q.shape[0], comm, n_tokens)
        lay = self.layout(n, comm.size, cu_seqlens)
        return ring_attention(q, k, v, comm=comm, peer_runs=[lay.runs(r) for r in range(comm.size)],
                              causal=causal, softmax_scale=softmax_scale, dkv_dtype=self.dkv_dtype)

    def comm_bytes(self, shape: AttnShape, world: int, rank: int = 0) -> CommVolume:
        lay = self.layout(shape.n_tokens, world, shape.cu_seqlens)
        row = 2 * shape.kv_heads * shape.head_dim  # K and V elements per token
        sizes = lay.sizes()
        # hop s sends the block that arrived at step s: rank (rank - s)'s
        kv = sum(sizes[(rank - s) % world] for s in range(world - 1)) * row * shape.dtype_bytes
        dkv_b = 4 if self.dkv_dtype == "fp32" else shape.dtype_bytes
        dkv = sum(sizes[(rank - s) % world] for s in range(world)) * row * dkv_b if world > 1 else 0
        return CommVolume(fwd={"exchange": kv}, bwd={"exchange": kv + dkv})
