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

Kernel calls: one per ring step for a single document under zigzag (the planner
fuses a rank's two chunks against themselves into one causal call at step 0;
every later step is one rectangle), one per step and document run otherwise.

Buffers: K and V travel as two messages per hop, received into halves of a
[2, T, Hkv, D] buffer; two such buffers alternate (the one being computed on,
the one being received into), so no hop packs or copies K/V. The backward's
dK/dV accumulators alternate the same way: the one arriving from the previous
rank becomes this step's accumulator and this rank's kernel gradients are added
into it, so no accumulator is zero-filled after step 0. Inside
`kept_ring_buffers()` (the trainer holds one over each micro-batch's forward
and one over its backward) CPU calls keep these buffers for the next call of
the same shapes, so a pass's layers reuse them instead of paying page faults on
the first touch of fresh large tensors; leaving it frees them. Outside it
nothing is kept. Nothing a call returns or saves aliases them.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from distattn.comm import Comm
from distattn.kernels.softmax import (add_kv_parts, block_backward_parts, block_forward, check_shapes,
                                      default_scale, plan_calls, prefers_head_major)
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


class _Store(threading.local):
    def __init__(self):
        self.flat: dict[tuple, torch.Tensor] = {}
        self.depth = 0


_STORE = _Store()


@contextlib.contextmanager
def kept_ring_buffers():
    """Keep this thread's ring K/V and dK/dV buffers between calls until the outermost scope ends.

    The trainer holds one over a micro-batch's forward and another over its backward, so the
    buffers are gone at the loss, as the memory planner counts them (one layer's, per pass)."""
    _STORE.depth += 1
    try:
        yield
    finally:
        _STORE.depth -= 1
        if _STORE.depth == 0:
            _STORE.flat.clear()


class _Buffers:
    """Flat buffers of one call, handed out as [2, T, Hkv, D] views of any T up to the largest."""

    def __init__(self, dtype: torch.dtype, device: torch.device, row: tuple[int, int], rows: int):
        self.dtype, self.device, self.row = dtype, device, row
        self.numel = 2 * rows * row[0] * row[1]
        # CUDA's caching allocator already reuses freed blocks; CPU keeps them only inside kept_ring_buffers()
        self.keep = device.type == "cpu" and _STORE.depth > 0
        self.local: dict[str, torch.Tensor] = {}

    def get(self, name: str, tokens: int, head_major: bool = False) -> torch.Tensor:
        """[2, tokens, Hkv, D]; with `head_major` each half is stored [Hkv, tokens, D]."""
        key = (name, self.dtype, self.device, self.numel)
        flat = self.local.get(name)
        if flat is None:
            flat = _STORE.flat.get(key) if self.keep else None
            if flat is None:
                flat = torch.empty(self.numel, dtype=self.dtype, device=self.device)
                if self.keep:
                    for old in [k for k in _STORE.flat if k[0] == name and k[1:3] == key[1:3]]:
                        del _STORE.flat[old]  # one size per name and dtype: the newest shape
                    _STORE.flat[key] = flat
            self.local[name] = flat
        used = flat[: 2 * tokens * self.row[0] * self.row[1]]
        if head_major:
            return used.view(2, self.row[0], tokens, self.row[1]).transpose(1, 2)
        return used.view(2, tokens, *self.row)


def _post_kv(comm: Comm, k: torch.Tensor, v: torch.Tensor, into: torch.Tensor, head_major: bool):
    """Send K and V on, receive the next block into `into`; head-major blocks travel as the
    contiguous [Hkv, T, D] tensors they are stored as."""
    nxt, prv = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    wire = (lambda x: x.transpose(0, 1)) if head_major else (lambda x: x)
    return comm.exchange([(wire(k), nxt), (wire(v), nxt)], [(wire(into[0]), prv), (wire(into[1]), prv)])


def _local_head_major(bufs: _Buffers, k: torch.Tensor, v: torch.Tensor):
    """This rank's K/V copied head-major into the slot step 0 computes on and sends from
    (slot 1: step s receives into slot s % 2, so slot 1 is free until step 1)."""
    kv = bufs.get("kv1", k.shape[0], head_major=True)
    kv[0].copy_(k)
    kv[1].copy_(v)
    return kv[0], kv[1]


def ring_forward(comm: Comm, q, k, v, plan: RingPlan, scale: float):
    """fp32 (out, lse) of local q over the whole ring's K/V."""
    W = comm.size
    hm = prefers_head_major(q.device)
    bufs = _Buffers(k.dtype, k.device, tuple(k.shape[1:]), max(plan.sizes))
    if hm:
        k, v = _local_head_major(bufs, k, v)
    out = lse = None
    for s in range(W):
        pending = None
        if s < W - 1:  # post the next hop before computing this block
            recv = bufs.get(f"kv{s % 2}", plan.sizes[plan.src(s + 1)], hm)
            pending = _post_kv(comm, k, v, recv, hm)
        out, lse = block_forward(q, k, v, plan.calls[s], scale, out, lse)
        if pending is not None:
            pending.wait()
            k, v = recv[0], recv[1]
    if out is None:  # pragma: no cover - W >= 1 always runs one step
        raise RuntimeError("empty ring")
    return out, lse


def _whole(parts, size: int) -> bool:
    """One kernel call covers every key row of the block: its dk, dv are the block's gradient."""
    return len(parts) == 1 and parts[0][0].k0 == 0 and parts[0][0].k1 == size


def ring_backward(comm: Comm, dout, q, k, v, out, lse, plan: RingPlan, scale: float,
                  dkv_dtype: torch.dtype):
    """dq (fp32) and this rank's dk, dv (fp32) via a second lap of the ring."""
    W, nxt, prv = comm.size, (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    f32 = torch.float32
    row, rows = tuple(k.shape[1:]), max(plan.sizes)
    hm = prefers_head_major(q.device)
    kv_bufs = _Buffers(k.dtype, k.device, row, rows)
    if hm:  # the kernel's gradients come back packed [T, H, D]: accumulators stay packed
        k, v = _local_head_major(kv_bufs, k, v)
    if W == 1:
        dq, parts = block_backward_parts(dout, q, k, v, out, lse, plan.calls[0], scale)
        g = torch.empty((2, *k.shape), dtype=f32, device=k.device)
        add_kv_parts(g[0], g[1], parts, fresh=True)
        return dq, g[0], g[1]
    acc_bufs = _Buffers(f32, k.device, row, rows)
    wire_bufs = _Buffers(dkv_dtype, k.device, row, rows) if dkv_dtype != f32 else None
    dq = None
    dkv_pending = None
    for s in range(W):
        kv_pending = None
        if s < W - 1:
            recv = kv_bufs.get(f"kv{s % 2}", plan.sizes[plan.src(s + 1)], hm)
            kv_pending = _post_kv(comm, k, v, recv, hm)
        dq, parts = block_backward_parts(dout, q, k, v, out, lse, plan.calls[s], scale, dq)
        size = plan.sizes[plan.src(s)]
        if dkv_pending is None and _whole(parts, size) and parts[0][1].dtype == dkv_dtype:
            send = (parts[0][1], parts[0][2])  # step 0, one call: its gradients go out as they are
        else:
            if dkv_pending is None:  # step 0: this rank starts its own block's accumulator
                acc = acc_bufs.get(f"acc{s % 2}", size)
                add_kv_parts(acc[0], acc[1], parts, fresh=True)
            else:  # the partial sum of the ranks before me arrived: add mine into it
                got = dkv_pending.wait()
                if wire_bufs is None:
                    acc = into
                else:
                    acc = acc_bufs.get(f"acc{s % 2}", size)
                    acc[0].copy_(got[0])
                    acc[1].copy_(got[1])
                add_kv_parts(acc[0], acc[1], parts)
            send = acc if wire_bufs is None else wire_bufs.get(f"out{s % 2}", size).copy_(acc)
        del parts
        # pass the accumulator on; after W hops it arrives at the block's owner
        home = plan.sizes[plan.src(s + 1)]
        if s == W - 1:  # my own block comes home: into a fresh tensor the caller may keep
            into = torch.empty((2, home, *row), dtype=dkv_dtype, device=k.device)
        elif wire_bufs is None:
            into = acc_bufs.get(f"acc{(s + 1) % 2}", home)
        else:
            into = wire_bufs.get(f"in{s % 2}", home)
        dkv_pending = comm.exchange([(send[0], nxt), (send[1], nxt)], [(into[0], prv), (into[1], prv)])
        if kv_pending is not None:
            kv_pending.wait()
            k, v = recv[0], recv[1]
    dkv_pending.wait()
    mine = into.to(f32)
    return dq, mine[0], mine[1]


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
