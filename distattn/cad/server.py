"""Attention-server side of CAD: task batches in, outputs and lse (or gradients) out.

One attention call is a *pass* (forward or backward). Every rank of the group
runs the same sequence of collectives in a pass, whatever its role:

    forward   per task set: dispatch (q, kv)          source -> server
              per task set: return   (out, lse)        server -> source
    backward  per task set: dispatch (q, out, dout, lse, kv)  source -> server
              per task set: return   (dq, dK/dV fp32)         server -> source

With one task set that is two all-to-alls per pass. With two (ping-pong), both
dispatches are posted first, then set 0 is computed while set 1 travels, and
set 0's return travels while set 1 is computed. A server computes all tasks of
a set with one batched ``block_forward`` / ``block_backward`` over the runs of
every task, and keeps no state between passes: backward re-sends what it needs.

Dedicated pools: server ranks call :func:`serve`, which learns each pass from
a small header that the first trainer rank broadcasts (phase, shapes, dtype,
softmax scale, document boundaries), so servers need no copy of the data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from distattn.cad.dispatch import BlobExchange, RankPlan
from distattn.comm import Comm, CommLedger
from distattn.kernels.softmax import block_backward, block_forward

__all__ = ["Header", "Meta", "run_backward", "run_forward", "serve", "header_bytes", "send_header",
           "recv_header", "stop_servers"]

F32 = torch.float32
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
FWD, BWD, STOP = 0, 1, 2


@dataclass(frozen=True)
class Meta:
    """Tensor facts every rank of a pass must agree on."""

    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device | str = "cpu"


# ----------------------------------------------------------------------------- passes


def _dispatch_fwd(comm: Comm, rp: RankPlan, meta: Meta, q, k, v) -> BlobExchange:
    sends: dict[int, list[Tensor]] = {}
    if rp.source is not None:
        for s, g in enumerate(rp.roles.servers):
            qi, ki = rp.source.q_index[s], rp.source.kv_index[s]
            sends[g] = [q.index_select(0, qi), k.index_select(0, ki), v.index_select(0, ki)]
    specs = {}
    if rp.server is not None:
        H, Hk, D, dt = meta.heads, meta.kv_heads, meta.head_dim, meta.dtype
        for r, g in enumerate(rp.roles.sources):
            n, m = rp.server.q_counts[r], rp.server.kv_counts[r]
            specs[g] = [((n, H, D), dt), ((m, Hk, D), dt), ((m, Hk, D), dt)]
    return BlobExchange(comm, sends, specs, meta.device)


def _cat(parts: list[Tensor], like_shape: tuple[int, ...], dtype, device) -> Tensor:
    """One contiguous buffer (the kernels run on contiguous K/V: strided views cost copies per call)."""
    if not parts:
        return torch.empty((0, *like_shape), dtype=dtype, device=device)
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)


def _gather(got: dict, rp: RankPlan, meta: Meta, specs: Sequence[tuple[tuple[int, ...], torch.dtype]]):
    """Per field of the received messages: every source's part concatenated in source order."""
    return [_cat([got[g][i] for g in rp.roles.sources], shape, dtype, meta.device)
            for i, (shape, dtype) in enumerate(specs)]


def _serve_fwd(comm: Comm, rp: RankPlan, meta: Meta, got: dict, scale: float) -> BlobExchange:
    """Compute this rank's tasks of one set (if it serves) and post the return all-to-all."""
    H, Hk, D, dt = meta.heads, meta.kv_heads, meta.head_dim, meta.dtype
    sends: dict[int, list[Tensor]] = {}
    srv = rp.server
    if srv is not None:
        Q, K, V = _gather(got, rp, meta, [((H, D), dt), ((Hk, D), dt), ((Hk, D), dt)])
        out, lse = block_forward(Q, K, V, srv.calls, scale)  # all tasks: one batched call
        o = out.to(dt)
        off = 0
        for r, g in enumerate(rp.roles.sources):
            n = srv.q_counts[r]
            sends[g] = [o[off:off + n], lse[off:off + n]]
            off += n
    specs = {}
    if rp.source is not None:
        for s, g in enumerate(rp.roles.servers):
            n = rp.source.q_counts[s]
            specs[g] = [((n, H, D), dt), ((n, H), F32)]
    return BlobExchange(comm, sends, specs, meta.device)


def run_forward(comm: Comm, rps: Sequence[RankPlan], meta: Meta, scale: float, q: Tensor | None = None,
                k: Tensor | None = None, v: Tensor | None = None
                ) -> tuple[Tensor | None, Tensor | None]:
    """One forward pass over one or two task sets; sources get (out in q's dtype, fp32 lse).

    All dispatches are posted before any set is computed, and each set's return
    is posted before the next set is computed (ping-pong with two sets).
    """
    dispatched = [_dispatch_fwd(comm, rp, meta, q, k, v) for rp in rps]
    returns = [_serve_fwd(comm, rp, meta, x.wait(), scale) for rp, x in zip(rps, dispatched)]
    if q is None:
        for r in returns:
            r.wait()
        return None, None
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=F32, device=q.device)
    for rp, r in zip(rps, returns):
        got = r.wait()
        g = rp.roles.servers
        if rp.source.q_all.numel():
            out.index_copy_(0, rp.source.q_all, torch.cat([got[s][0] for s in g]))
            lse.index_copy_(0, rp.source.q_all, torch.cat([got[s][1] for s in g]))
    return out, lse


def _dispatch_bwd(comm: Comm, rp: RankPlan, meta: Meta, tensors) -> BlobExchange:
    sends: dict[int, list[Tensor]] = {}
    if rp.source is not None:
        q, k, v, out, dout, lse = tensors
        for s, g in enumerate(rp.roles.servers):
            qi, ki = rp.source.q_index[s], rp.source.kv_index[s]
            sends[g] = [q.index_select(0, qi), out.index_select(0, qi), dout.index_select(0, qi),
                        lse.index_select(0, qi), k.index_select(0, ki), v.index_select(0, ki)]
    specs = {}
    if rp.server is not None:
        for r, g in enumerate(rp.roles.sources):
            specs[g] = _bwd_specs(meta, rp.server.q_counts[r], rp.server.kv_counts[r])
    return BlobExchange(comm, sends, specs, meta.device)


def _bwd_specs(meta: Meta, n: int, m: int):
    H, Hk, D, dt = meta.heads, meta.kv_heads, meta.head_dim, meta.dtype
    return [((n, H, D), dt), ((n, H, D), dt), ((n, H, D), dt), ((n, H), F32), ((m, Hk, D), dt),
            ((m, Hk, D), dt)]


def _serve_bwd(comm: Comm, rp: RankPlan, meta: Meta, got: dict, scale: float) -> BlobExchange:
    H, Hk, D, dt = meta.heads, meta.kv_heads, meta.head_dim, meta.dtype
    sends: dict[int, list[Tensor]] = {}
    srv = rp.server
    if srv is not None:
        Q, O, dO, LSE, K, V = _gather(got, rp, meta, [(shape[1:], dtype) for shape, dtype
                                                       in _bwd_specs(meta, 0, 0)])
        dq, dk, dv = block_backward(dO, Q, K, V, O, LSE, srv.calls, scale)  # fp32 accumulators
        dq = dq.to(dt)
        qo = ko = 0
        for r, g in enumerate(rp.roles.sources):
            n, m = srv.q_counts[r], srv.kv_counts[r]
            sends[g] = [dq[qo:qo + n], dk[ko:ko + m], dv[ko:ko + m]]
            qo, ko = qo + n, ko + m
    specs = {}
    if rp.source is not None:
        for s, g in enumerate(rp.roles.servers):
            n, m = rp.source.q_counts[s], rp.source.kv_counts[s]
            specs[g] = [((n, H, D), dt), ((m, Hk, D), F32), ((m, Hk, D), F32)]
    return BlobExchange(comm, sends, specs, meta.device)


def run_backward(comm: Comm, rps: Sequence[RankPlan], meta: Meta, scale: float, tensors=None
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """One backward pass; sources pass ``(q, k, v, out, dout, lse)`` and get (dq, dk fp32, dv fp32)."""
    dispatched = [_dispatch_bwd(comm, rp, meta, tensors) for rp in rps]
    returns = [_serve_bwd(comm, rp, meta, x.wait(), scale) for rp, x in zip(rps, dispatched)]
    if tensors is None:
        for r in returns:
            r.wait()
        return None, None, None
    q, k = tensors[0], tensors[1]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=F32, device=k.device)
    dv = torch.zeros(k.shape, dtype=F32, device=k.device)
    for rp, r in zip(rps, returns):
        got = r.wait()
        g = rp.roles.servers
        if rp.source.q_all.numel():
            dq.index_copy_(0, rp.source.q_all, torch.cat([got[s][0] for s in g]))
        if rp.source.kv_all.numel():  # a KV token may serve several servers: sum their parts
            dk.index_add_(0, rp.source.kv_all, torch.cat([got[s][1] for s in g]))
            dv.index_add_(0, rp.source.kv_all, torch.cat([got[s][2] for s in g]))
    return dq, dk, dv


# ----------------------------------------------------------------------------- dedicated pool


@dataclass(frozen=True)
class Header:
    phase: int
    causal: bool
    meta: Meta
    scale: float
    cu_seqlens: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return self.cu_seqlens[-1]


def header_bytes(n_docs: int) -> int:
    """Bytes the first trainer broadcasts per pass: one int64 length, then 9 + n_docs int64 words."""
    return 8 + 8 * (8 + n_docs + 1)


def send_header(comm: Comm, src: int, phase: int, causal: bool = True, meta: Meta | None = None,
                scale: float = 1.0, cu_seqlens: Sequence[int] = (0,), device="cpu") -> None:
    """Called by every trainer (the first one is the source): tell the servers what comes next.

    The header travels on ``meta.device`` (NCCL groups need device tensors).
    """
    m = meta or Meta(0, 0, 0, torch.float32, device)
    scale_bits = int(torch.tensor([float(scale)], dtype=torch.float64).view(torch.int64).item())
    words = [phase, int(causal), m.heads, m.kv_heads, m.head_dim, DTYPE_CODES[m.dtype], scale_bits,
             len(cu_seqlens), *[int(x) for x in cu_seqlens]]
    payload = torch.tensor(words, dtype=torch.int64, device=m.device)
    comm.broadcast(torch.tensor([payload.numel()], dtype=torch.int64, device=m.device), src)
    comm.broadcast(payload, src)


def recv_header(comm: Comm, src: int, device="cpu") -> Header:
    n = torch.zeros(1, dtype=torch.int64, device=device)
    comm.broadcast(n, src)
    payload = torch.zeros(int(n.item()), dtype=torch.int64, device=device)
    comm.broadcast(payload, src)
    w = payload.tolist()
    scale = float(torch.tensor([w[6]], dtype=torch.int64).view(torch.float64).item())
    meta = Meta(w[2], w[3], w[4], CODE_DTYPES[w[5]], device)
    return Header(w[0], bool(w[1]), meta, scale, tuple(w[8:8 + w[7]]))


def serve(scheme, group=None, passes: int | None = None, ledger: CommLedger | None = None,
          device: torch.device | str = "cpu") -> int:
    """Serve attention passes on a dedicated server rank; returns how many passes ran.

    ``scheme`` is the trainers' configured ``cad`` scheme (same options,
    ``server_ranks`` set); ``group`` the group that holds trainers and servers.
    Runs ``passes`` passes (a forward and a backward are one pass each) or, with
    ``passes=None``, until a trainer calls :func:`stop_servers`.
    """
    from distattn.schemes.base import make_comm
    comm = make_comm(group, ledger)
    roles = scheme.roles(comm.size)
    if comm.rank not in roles.servers:
        raise ValueError(f"rank {comm.rank} is not in server_ranks {list(roles.servers)}; "
                         f"trainer ranks call distattn.attention instead")
    done = 0
    while passes is None or done < passes:
        h = recv_header(comm, roles.sources[0], device)
        if h.phase == STOP:
            break
        rps = scheme.rank_plans(h.n_tokens, list(h.cu_seqlens), h.causal, h.meta, roles, comm.rank)
        with comm.ledger.tag("fwd" if h.phase == FWD else "bwd"):
            if h.phase == FWD:
                run_forward(comm, rps, h.meta, h.scale)
            else:
                run_backward(comm, rps, h.meta, h.scale)
        done += 1
    return done


def stop_servers(scheme, group=None, ledger: CommLedger | None = None, device="cpu") -> None:
    """Called by every trainer rank (and answered by servers in ``serve(passes=None)``): end the loop."""
    from distattn.schemes.base import make_comm
    comm = make_comm(group, ledger)
    roles = scheme.roles(comm.size)
    if comm.rank in roles.servers:
        raise ValueError("stop_servers is called by trainer ranks; servers are in serve()")
    send_header(comm, roles.sources[0], STOP, device=device)
