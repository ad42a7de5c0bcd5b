"""LASP-1: the ring baseline for linear attention; states hop rank to rank in order.

Contiguous layout only: rank r holds global chunk r, so the state entering rank
r is the state rank r-1 leaves behind, and it can only be known after rank r-1
received its own. The order of work follows the LASP-1 algorithm:

forward, rank r:
  1. every run's output from zero state (no dependency, all ranks in parallel);
  2. receive P_r (the state at the end of chunk r-1) from rank r-1   (r > 0);
  3. add (Q * lam^(j+1)) P_r to the first run if it continues a document, and
     compute the state this rank leaves: T_r = lam^(L) P_r + M_r (or M_r when the
     last run started its document here);
  4. send T_r to rank r+1                                              (r < W-1).
backward, rank r (reverse direction):
  1. local backward from zero state, and dQ += (dO P_r^T) * lam^(j+1);
  2. receive G_r = d loss / d T_r from rank r+1                       (r < W-1);
  3. dK, dV of the last run from G_r, and d loss / d P_r =
     sum (Q * lam^(j+1))^T dO over the first run (+ lam^(L) G_r when that run is
     also the last and continues from P_r);
  4. send it to rank r-1                                               (r > 0).
Steps 2-4 form a chain of W-1 serial hops each way, with the state update of
every rank on it: the serialisation that LASP-2 removes by gathering all states
at once. Every rank passes a state on even when a document boundary falls
exactly on the rank boundary (it is then simply not used), so the traffic does
not depend on the documents.

Hops are blocking `Comm.send` / `Comm.recv`: the chain is acyclic (rank r only
waits on r-1 forward and on r+1 backward), so no rank can deadlock, and plain
p2p avoids NCCL's rule that a group's first batched p2p call includes every rank.

Traffic per rank (A = state heads, fp32 states), one d_k x d_v state per hop:
  forward   send  A * dk * dv * 4   on ranks 0 .. W-2
  backward  send  A * dk * dv * 4   on ranks 1 .. W-1

The delta rules (`rule="gated_delta"` / `"kda"`) run the same ring in `schemes.delta_ring`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from distattn.comm import Comm
from distattn.kernels.linear import (DEFAULT_BLOCK, F32, HeadPlan, apply_state, apply_state_grad_q,
                                     check_block, check_feature_map, check_linear_shapes,
                                     chunk_backward, chunk_forward, feature_map_backward, group_inputs,
                                     group_q, plan_heads, run_state, run_state_backward, state_grad,
                                     ungroup_kv, ungroup_q)
from distattn.layout import Run
from distattn.schemes.base import AttnShape, CommVolume, register
from distattn.schemes.lasp2 import STATE_BYTES, LinearScheme, _decayed, _sl


class _Lasp1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, comm: Comm, runs: list[Run], heads: HeadPlan, fmap: str, block: int):
        loglam = heads.loglam(q.device)
        W, r = comm.size, comm.rank
        first, last = runs[0], runs[-1]
        cont = first.start > first.doc_start  # the first run continues a document from rank r-1
        with comm.ledger.tag("fwd"):
            qg, kg, vg = group_inputs(q, k, v, heads, fmap)
            shape = (heads.groups, qg.shape[-1], vg.shape[-1])
            og = chunk_forward(qg, kg, vg, runs, loglam, block)
            p = None
            if r > 0:
                p = comm.recv(torch.empty(shape, dtype=F32, device=q.device), r - 1)
                if cont:
                    sl = _sl(first)
                    og[:, :, sl] += apply_state(qg[:, :, sl], p, loglam)
            if r < W - 1:
                sl = _sl(last)
                t = run_state(kg[:, :, sl], vg[:, :, sl], loglam)
                if len(runs) == 1 and cont:
                    t = t + _decayed(p, loglam, last.length)
                comm.send(t, r + 1)
        out = ungroup_q(og, q.dtype)
        ctx.save_for_backward(q, k, v, p if (p is not None and cont) else q.new_zeros(0))
        ctx.comm, ctx.runs, ctx.heads, ctx.fmap, ctx.block = comm, runs, heads, fmap, block
        ctx.cont, ctx.shape = cont, shape
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, p = ctx.saved_tensors
        comm, runs, heads, fmap = ctx.comm, ctx.runs, ctx.heads, ctx.fmap
        loglam = heads.loglam(q.device)
        W, r = comm.size, comm.rank
        first, last = runs[0], runs[-1]
        with comm.ledger.tag("bwd"):
            qg, kg, vg = group_inputs(q, k, v, heads, fmap)
            dog = group_q(dout, heads)
            dq, dk, dv = chunk_backward(qg, kg, vg, dog, runs, loglam, ctx.block)
            if ctx.cont:
                sl = _sl(first)
                dq[:, :, sl] += apply_state_grad_q(dog[:, :, sl], p, loglam)
            g = None
            if r < W - 1:
                g = comm.recv(torch.empty(ctx.shape, dtype=F32, device=q.device), r + 1)
                sl = _sl(last)
                gk, gv = run_state_backward(kg[:, :, sl], vg[:, :, sl], g, loglam)
                dk[:, :, sl] += gk
                dv[:, :, sl] += gv
            if r > 0:
                if ctx.cont:
                    sl = _sl(first)
                    dp = state_grad(qg[:, :, sl], dog[:, :, sl], loglam)
                    if len(runs) == 1 and g is not None:
                        dp = dp + _decayed(g, loglam, first.length)
                else:  # the incoming state was not used
                    dp = torch.zeros(ctx.shape, dtype=F32, device=q.device)
                comm.send(dp, r - 1)
        dq = feature_map_backward(q, ungroup_q(dq, F32), fmap)
        dk = feature_map_backward(k, ungroup_kv(dk, heads), fmap)
        dv = ungroup_kv(dv, heads)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def lasp1_attention(q, k, v, *, comm: Comm, peer_runs: Sequence[list[Run]], decay=None,
                    feature_map: str | None = None, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """LASP-1 over `comm`'s group; `peer_runs` must be a contiguous layout (rank order = token order)."""
    check_linear_shapes(q, k, v)
    check_block(block)
    if len(peer_runs) != comm.size:
        raise ValueError(f"peer_runs has {len(peer_runs)} entries for a group of {comm.size}")
    for a, b in zip(peer_runs, peer_runs[1:]):
        if not a or not b or a[-1].end != b[0].start:
            raise ValueError("lasp1 needs a contiguous layout (rank r holds the r-th piece of the "
                             "sequence); use lasp2 for zigzag, doc_zigzag or weighted layouts")
    runs = list(peer_runs[comm.rank])
    if q.shape[0] != sum(r.length for r in runs):
        raise ValueError(f"rank {comm.rank} holds {q.shape[0]} tokens but the layout gives it "
                         f"{sum(r.length for r in runs)}")
    heads = plan_heads(q.shape[1], k.shape[1], decay)
    return _Lasp1.apply(q, k, v, comm, runs, heads, check_feature_map(feature_map), block)


@register("lasp1")
@dataclass
class Lasp1(LinearScheme):
    """LASP-1 linear attention: the state travels the ring, W-1 serial hops each way."""

    layout_name: str = "contiguous"
    block: int = DEFAULT_BLOCK
    default_layout = "contiguous"

    def __post_init__(self):
        if self.layout_name != "contiguous":
            raise ValueError(f"lasp1 supports only the contiguous layout (its ring passes one state "
                             f"per rank in token order), got layout_name={self.layout_name!r}; use "
                             f"lasp2 for zigzag, doc_zigzag or weighted layouts")
        check_block(self.block)

    def linear_attention(self, q, k, v, *, group=None, cu_seqlens=None, decay=None, feature_map=None,
                         ledger=None, n_tokens=None, rule: str = "decay", gate=None, beta=None):
        if rule != "decay":  # the delta rule: the state passes through each rank's kernel on the ring
            from distattn.schemes.delta import check_delta_inputs
            from distattn.schemes.delta_ring import delta_ring_attention
            check_delta_inputs(q, k, v, gate, beta, rule)
            comm, lay, _, _ = self._prepare(q, k, v, group, ledger, n_tokens, cu_seqlens, None, None)
            return delta_ring_attention(q, k, v, gate, beta, comm=comm, runs=lay.runs(comm.rank), rule=rule)
        comm, lay, _, fmap = self._prepare(q, k, v, group, ledger, n_tokens, cu_seqlens, decay,
                                           feature_map)
        return lasp1_attention(q, k, v, comm=comm, peer_runs=[lay.runs(r) for r in range(comm.size)],
                               decay=decay, feature_map=fmap, block=self.block)

    def comm_bytes(self, shape: AttnShape, world: int, rank: int = 0, decay=None,
                   rule: str = "decay") -> CommVolume:
        """Bytes sent per rank; pass the call's `decay` (it decides the state heads A) or its delta `rule`."""
        self.validate(heads=shape.heads, kv_heads=shape.kv_heads, world=world)
        if rule != "decay":
            from distattn.schemes.delta_ring import delta_ring_comm_bytes
            return delta_ring_comm_bytes(shape, world, rank)
        state = self.state_heads(shape.heads, shape.kv_heads, decay) * shape.head_dim ** 2 * STATE_BYTES
        first, last = rank == 0, rank == world - 1
        fwd = {**({} if last else {"send": state}), **({} if first else {"recv": 0})}
        bwd = {**({} if first else {"send": state}), **({} if last else {"recv": 0})}
        return CommVolume(fwd=fwd, bwd=bwd)
