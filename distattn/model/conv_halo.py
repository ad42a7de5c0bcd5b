"""Short causal depthwise convolution over a context-parallel shard, exact via a halo exchange.

A kernel of K taps at token t reads tokens t-K+1 .. t of its document (zeros before the
document starts). A rank's runs (`distattn.layout.Run`) are contiguous pieces of documents,
so each run needs the K-1 tokens before it: from the previous run of the same document, on
whichever rank holds it; runs may be shorter than K-1 tokens, so these tokens can come from
several runs. Every rank computes from the layout which runs' tails are needed elsewhere and
which tokens each halo takes from which tail, so no sizes travel:

forward   each rank packs the last K-1 tokens of each of its runs that a later run needs
          (right-aligned, zero-padded when the run is shorter) into [n_fwd, K-1, C]; ONE
          all-gather gives every rank every tail, and each rank assembles the halo of each
          of its runs from them.
backward  each rank packs the gradients of its runs' halos into [n_bwd, K-1, C]; ONE
          all-gather hands them to their owners, which add the parts read from their tails.

Traffic per rank: (W-1) * n_fwd * (K-1) * C forward and (W-1) * n_bwd * (K-1) * C backward
elements. Nothing is sent when no halo crosses ranks (cp = 1, one run per document).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from distattn.comm import Comm
from distattn.layout import Run

KERNEL = 4


@dataclass(frozen=True)
class HaloPlan:
    """Index maps of one rank's halo exchange (all computed from the layout alone)."""

    halo: int                       # K - 1 tokens before each run
    remote: bool                    # does any halo token live on another rank (then: communicate)
    n_fwd: int                      # tail slots per rank in the forward buffer
    n_bwd: int                      # halo slots per rank in the backward buffer
    pack_src: torch.Tensor          # local rows packed into my forward buffer (flat slot index below)
    pack_dst: torch.Tensor
    halo_src: torch.Tensor          # flat index into the gathered tails [Wg * n_fwd * halo]
    halo_dst: torch.Tensor          # flat index into my halos [n_runs * halo]
    bwd_pack: torch.Tensor          # my halo row (flat) -> my backward buffer row (flat)
    bwd_pack_dst: torch.Tensor
    bwd_src: torch.Tensor           # flat index into the gathered halo gradients [Wg * n_bwd * halo]
    bwd_dst: torch.Tensor           # local row receiving it
    n_runs: int


def _needs(runs: Sequence[Run], halo: int):
    """(run index, j, global token) for every halo token of these runs (j: slot in the halo)."""
    for u, r in enumerate(runs):
        for j in range(halo):
            g = r.start - halo + j
            if g >= r.doc_start:
                yield u, j, g


@lru_cache(maxsize=64)
def halo_plan(peer_runs: tuple[tuple[Run, ...], ...], rank: int, halo: int = KERNEL - 1) -> HaloPlan:
    """Which tail tokens go where, for rank `rank` of the layout whose runs are `peer_runs`."""
    owner: dict[int, tuple[int, int]] = {}  # global token -> (rank, run index) for every run's tail
    for p, runs in enumerate(peer_runs):
        for i, r in enumerate(runs):
            for g in range(max(r.start, r.end - halo), r.end):
                owner[g] = (p, i)
    needs = [list(_needs(runs, halo)) for runs in peer_runs]
    remote = any(owner[g][0] != q for q, n in enumerate(needs) for _, _, g in n)
    # forward slots: runs whose tail some halo reads; backward slots: runs with a halo
    fwd = [sorted({owner[g][1] for q, n in enumerate(needs) for _, _, g in n if owner[g][0] == p})
           for p in range(len(peer_runs))]
    bwd = [sorted({u for u, _, _ in n}) for n in needs]
    n_fwd, n_bwd = max(map(len, fwd)), max(map(len, bwd))
    fslot = {(p, i): s for p, f in enumerate(fwd) for s, i in enumerate(f)}
    bslot = {(q, u): s for q, b in enumerate(bwd) for s, u in enumerate(b)}
    w = (lambda p: p) if remote else (lambda p: 0)  # without communication only my own buffer exists

    def tail_index(g: int) -> int:  # flat index of token g in the gathered tails
        p, i = owner[g]
        r = peer_runs[p][i]
        return (w(p) * n_fwd + fslot[(p, i)]) * halo + halo - (r.end - g)

    mine = peer_runs[rank]
    pack_src, pack_dst = [], []
    for i in fwd[rank]:
        r = mine[i]
        for g in range(max(r.start, r.end - halo), r.end):
            pack_src.append(r.local_start + g - r.start)
            pack_dst.append(fslot[(rank, i)] * halo + halo - (r.end - g))
    halo_src = [tail_index(g) for _, _, g in needs[rank]]
    halo_dst = [u * halo + j for u, j, _ in needs[rank]]
    bwd_pack = [u * halo + j for u, j, _ in needs[rank]]
    bwd_pack_dst = [bslot[(rank, u)] * halo + j for u, j, _ in needs[rank]]
    bwd_src, bwd_dst = [], []
    for q, n in enumerate(needs):
        for u, j, g in n:
            p, i = owner[g]
            if p == rank:
                r = mine[i]
                bwd_src.append((w(q) * n_bwd + bslot[(q, u)]) * halo + j)
                bwd_dst.append(r.local_start + g - r.start)
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return HaloPlan(halo, remote, n_fwd, n_bwd, t(pack_src), t(pack_dst), t(halo_src), t(halo_dst),
                    t(bwd_pack), t(bwd_pack_dst), t(bwd_src), t(bwd_dst), len(mine))


class _Halo(torch.autograd.Function):
    """x [T_local, C] -> the K-1 tokens before each local run [n_runs, K-1, C] (zeros before a document)."""

    @staticmethod
    def forward(ctx, x, plan: HaloPlan, comm: Comm):
        ctx.plan, ctx.comm, ctx.rows = plan, comm, x.shape[0]
        c, k, dev = x.shape[1], plan.halo, x.device
        out = x.new_zeros(plan.n_runs * k, c)
        if plan.halo_dst.numel() == 0 and not plan.remote:
            return out.view(plan.n_runs, k, c)
        buf = x.new_zeros(plan.n_fwd * k, c)
        buf[plan.pack_dst.to(dev)] = x[plan.pack_src.to(dev)]
        if plan.remote:
            with comm.ledger.tag("fwd"):
                tails = comm.all_gather(buf.view(plan.n_fwd, k, c)).view(-1, c)
        else:
            tails = buf
        out[plan.halo_dst.to(dev)] = tails[plan.halo_src.to(dev)]
        return out.view(plan.n_runs, k, c)

    @staticmethod
    def backward(ctx, dhalo):
        plan, comm = ctx.plan, ctx.comm
        c, k, dev = dhalo.shape[-1], plan.halo, dhalo.device
        dx = dhalo.new_zeros(ctx.rows, c)
        if plan.halo_dst.numel() == 0 and not plan.remote:
            return dx, None, None
        buf = dhalo.new_zeros(plan.n_bwd * k, c)
        buf[plan.bwd_pack_dst.to(dev)] = dhalo.reshape(-1, c)[plan.bwd_pack.to(dev)]
        if plan.remote:
            with comm.ledger.tag("bwd"):
                grads = comm.all_gather(buf.view(plan.n_bwd, k, c)).view(-1, c)
        else:
            grads = buf
        dx.index_add_(0, plan.bwd_dst.to(dev), grads[plan.bwd_src.to(dev)])
        return dx, None, None


def conv_halo(x: torch.Tensor, peer_runs: Sequence[Sequence[Run]], rank: int, comm: Comm,
              halo: int = KERNEL - 1) -> torch.Tensor:
    """The `halo` tokens before each of this rank's runs, [n_runs, halo, C]; differentiable."""
    plan = halo_plan(tuple(tuple(r) for r in peer_runs), rank, halo)
    return _Halo.apply(x, plan, comm)


def causal_conv_with_halo(x: torch.Tensor, weight: torch.Tensor, peer_runs: Sequence[Sequence[Run]],
                          rank: int, comm: Comm) -> torch.Tensor:
    """Causal depthwise convolution of this rank's tokens x [T_local, C] with weight [C, K].

    Equals the single-device convolution of the whole packed sequence, restarting at every
    document start; weight[:, K-1] multiplies the current token.
    """
    k = weight.shape[1]
    runs = list(peer_runs[rank])
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal conv: x [T, C] and weight [C, K], got {tuple(x.shape)}, {tuple(weight.shape)}")
    if sum(r.length for r in runs) != x.shape[0]:
        raise ValueError(f"rank {rank} holds {x.shape[0]} tokens but its runs cover "
                         f"{sum(r.length for r in runs)}")
    if k == 1:
        return x * weight[:, 0]
    h = conv_halo(x, peer_runs, rank, comm, k - 1)
    # each run's halo followed by its tokens, back to back: run u's token t sits at base_u + k-1 + t
    parts, pos, base = [], [], 0
    for u, r in enumerate(runs):
        parts += [h[u], x[r.local_start:r.local_start + r.length]]
        pos.append(torch.arange(base, base + r.length))
        base += k - 1 + r.length
    xp = torch.cat(parts) if parts else x
    idx = torch.cat(pos).to(x.device) if pos else torch.empty(0, dtype=torch.long, device=x.device)
    out = xp[idx] * weight[:, 0]
    for j in range(1, k):
        out = out + xp[idx + j] * weight[:, j]
    return out


def halo_comm_bytes(peer_runs: Sequence[Sequence[Run]], channels: int, element_size: int,
                    halo: int = KERNEL - 1) -> dict[str, int]:
    """Bytes each rank sends per direction (the all-gather's (W-1) * buffer), 0 without a crossing halo."""
    plan = halo_plan(tuple(tuple(r) for r in peer_runs), 0, halo)
    if not plan.remote:
        return {"fwd": 0, "bwd": 0}
    w = len(peer_runs)
    return {"fwd": (w - 1) * plan.n_fwd * halo * channels * element_size,
            "bwd": (w - 1) * plan.n_bwd * halo * channels * element_size}


__all__ = ["KERNEL", "HaloPlan", "causal_conv_with_halo", "conv_halo", "halo_comm_bytes", "halo_plan"]
