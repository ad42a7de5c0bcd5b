"""Core attention disaggregation (CAD): attention runs as balanced tasks on attention servers.

softmax(QK^T)V has no parameters and its cost grows with the square of document
length, so the ranks that happen to hold long documents straggle. CAD keeps the
token layout the linear layers like (by default contiguous: every rank holds
the same number of tokens, documents stay whole where they fall) and moves
only core attention: the planner (:mod:`distattn.sched.cad`) cuts documents
into query shards and assigns them so every server computes the same number of
(query, key) pairs; each shard's queries and the KV prefix it sees go to its
server in one all-to-all (KV de-duplicated per (source, server) pair), the
server runs all its tasks in one batched kernel call, and outputs with their
lse come back. Each shard has its whole KV prefix on one server, so no partial
softmax results are merged.

Backward re-sends q, out, dout, lse and the KV prefix (servers keep no state)
and returns dq in the input dtype and dK/dV in fp32, summed at the owners
(a KV token serving several servers receives several partial gradients).

Modes:
- colocated (``server_ranks=None``): every rank of the group owns tokens and
  serves; work that stays where its tokens are costs no bytes;
- dedicated (``server_ranks=[...]``): those group ranks only serve (they run
  :func:`distattn.cad.server.serve`); the others own tokens and call
  ``distattn.attention``. The layout is over the trainer ranks only, so shard
  with ``scheme.layout(N, n_trainers, cu_seqlens)``; ``distattn.shard``, which
  counts every rank of the group, does not apply. Trainers must pass
  ``n_tokens`` or ``cu_seqlens`` (servers cannot join an all-reduce of lengths).

Options: ``layout_name`` (the token owners; contiguous by default, any layout
but weighted), ``tolerance`` and ``min_shard`` (the planner's), ``linear_cost``
(linear-layer work per owned token, for balancing the whole step) and
``token_cost`` (kernel work per query token; 0 balances exact pairs), see
:mod:`distattn.sched.cost`. ``last_plans`` / ``last_imbalance`` describe the
most recent call.

Ping-pong (``pingpong=True``): each rank's documents are split into two task
sets of equal pairs (:func:`distattn.sched.cad.split_halves`), each planned on
its own; set 1's dispatch travels while set 0 is computed, and set 0's results
travel while set 1 is computed. Splitting a document across the sets re-sends
its KV prefix, so ping-pong moves somewhat more bytes.

Traffic per rank (the plan's :meth:`~distattn.sched.cad.Plan.traffic`; q row =
H*D*e, kv row = 2*Hkv*D*e, e = bytes per element, summed over task sets):
  forward   all_to_all  q rows + KV rows it sends as a source, out rows + 4H
                        lse bytes per query it returns as a server
  backward  all_to_all  3 q rows + 4H per query and KV rows as a source,
                        dq rows + 2*Hkv*D*4 (fp32 dK/dV) per KV row as a server
  dedicated: the first trainer also broadcasts a header per pass
            (:func:`distattn.cad.server.header_bytes`).
``comm_bytes`` assumes a causal mask (``AttnShape`` carries none); without one
every task's KV is its whole document.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distattn.cad.dispatch import RankPlan, Roles
from distattn.cad.server import (BWD, FWD, Meta, header_bytes, run_backward, run_forward,
                                 send_header)
from distattn.comm import Comm
from distattn.kernels.softmax import check_shapes, default_scale
from distattn.layout import LAYOUTS
from distattn.sched.cad import Plan, plan, split_halves
from distattn.schemes.base import AttnShape, CommVolume, Scheme, make_comm, register, total_tokens

_CACHE_SIZE = 8


@dataclass(frozen=True)
class _Header:
    src: int
    causal: bool
    cu_seqlens: tuple[int, ...]


class _CadAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, comm: Comm, rps, meta: Meta, scale: float, header):
        with comm.ledger.tag("fwd"):
            if header is not None:
                send_header(comm, header.src, FWD, header.causal, meta, scale, header.cu_seqlens)
            out, lse = run_forward(comm, rps, meta, scale, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.comm, ctx.rps, ctx.meta, ctx.scale, ctx.header = comm, rps, meta, scale, header
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        comm, h = ctx.comm, ctx.header
        with comm.ledger.tag("bwd"):
            if h is not None:
                send_header(comm, h.src, BWD, h.causal, ctx.meta, ctx.scale, h.cu_seqlens)
            dq, dk, dv = run_backward(comm, ctx.rps, ctx.meta, ctx.scale,
                                      (q, k, v, out, dout.to(q.dtype).contiguous(), lse))
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


@register("cad")
@dataclass
class Cad(Scheme):
    """Core attention disaggregation: balanced query-shard tasks on attention servers."""

    layout_name: str = "contiguous"
    tolerance: float = 0.05
    min_shard: int = 128
    linear_cost: float = 0.0
    token_cost: float = 0.0
    pingpong: bool = False
    server_ranks: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.layout_name not in LAYOUTS or self.layout_name == "weighted":
            ok = sorted(x for x in LAYOUTS if x != "weighted")
            raise ValueError(f"cad layout_name must be one of {ok}, got {self.layout_name!r}")
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) \
                or self.tolerance < 0:
            raise ValueError(f"cad tolerance must be a number >= 0, got {self.tolerance!r}")
        if isinstance(self.min_shard, bool) or not isinstance(self.min_shard, int) or self.min_shard < 1:
            raise ValueError(f"cad min_shard must be an integer >= 1, got {self.min_shard!r}")
        for name in ("linear_cost", "token_cost"):
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0:
                raise ValueError(f"cad {name} must be a number >= 0, got {x!r}")
        if self.server_ranks is not None:
            self.server_ranks = tuple(int(s) for s in self.server_ranks)
            if not self.server_ranks:
                raise ValueError("cad server_ranks must be None (colocated) or a non-empty list of "
                                 "group ranks")
        self._cache: dict = {}
        self.last_plans: list[Plan] = []

    # -- roles and plans --------------------------------------------------------------
    @property
    def dedicated(self) -> bool:
        return self.server_ranks is not None

    def roles(self, world: int) -> Roles:
        if self.server_ranks is None:
            return Roles.colocated(world)
        return Roles.dedicated(world, self.server_ranks)

    def validate(self, *, heads: int, kv_heads: int, world: int) -> None:
        super().validate(heads=heads, kv_heads=kv_heads, world=world)
        if world < 1:
            raise ValueError(f"cad needs a group of at least one rank, got world={world}")
        if self.server_ranks is not None:
            self.roles(world)

    def plans(self, n_tokens: int, n_sources: int, cu_seqlens, causal: bool, q_bytes: int,
              kv_bytes: int) -> list[Plan]:
        """The plan of every task set (one, or two with ping-pong), cached per batch shape."""
        lay = self.layout(n_tokens, n_sources, cu_seqlens)
        cu = tuple(lay.cu_seqlens)
        key = ("plans", n_tokens, n_sources, cu, causal, q_bytes, kv_bytes)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        doc_lens = [b - a for a, b in zip(cu, cu[1:])]
        n_servers = len(self.server_ranks) if self.dedicated else n_sources
        sets = (split_halves(doc_lens, self.min_shard, causal, _major_owner(lay, n_sources))
                if self.pingpong else (None,))
        plans = [plan(doc_lens, n_servers, self.tolerance, self.min_shard, owner=lay,
                      colocated=not self.dedicated, causal=causal, linear_cost=self.linear_cost,
                      q_bytes=q_bytes, kv_bytes=kv_bytes, token_cost=self.token_cost, items=items)
                 for items in sets if items is None or items]
        self._remember(key, plans)
        return plans

    def rank_plans(self, n_tokens: int, cu_seqlens, causal: bool, meta: Meta, roles: Roles,
                   me: int) -> list[RankPlan]:
        """This rank's dispatch and server work for every task set (cached)."""
        n_src = len(roles.sources)
        qb, kvb = _row_bytes(meta.heads, meta.kv_heads, meta.head_dim, meta.dtype)
        key = ("rank", n_tokens, tuple(cu_seqlens) if cu_seqlens is not None else None, causal,
               qb, kvb, roles, me, str(meta.device))
        hit = self._cache.get(key)
        if hit is None:
            plans = self.plans(n_tokens, n_src, cu_seqlens, causal, qb, kvb)
            hit = [RankPlan(p, roles, me).to(meta.device) for p in plans]
            src = hit[0].source
            if src is not None:
                covered = sum(rp.source.q_all.numel() for rp in hit)
                if covered != src.n_local:
                    raise AssertionError(f"cad plans cover {covered} of this rank's {src.n_local} queries")
            self._remember(key, hit)
        self.last_plans = [rp.plan for rp in hit]
        return hit

    def _remember(self, key, value) -> None:
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = value

    @property
    def last_imbalance(self) -> float | None:
        """max/mean server pairs of the most recent call (over its task sets together)."""
        if not self.last_plans:
            return None
        per = [sum(p.server_flops[s] for p in self.last_plans)
               for s in range(self.last_plans[0].n_servers)]
        mean = sum(per) / len(per)
        return max(per) / mean if mean else 1.0

    # -- compute --------------------------------------------------------------------
    def attention(self, q, k, v, *, group, cu_seqlens=None, causal=True, softmax_scale=None,
                  ledger=None, n_tokens=None):
        comm = make_comm(group, ledger)
        check_shapes(q, k, v)
        self.validate(heads=q.shape[1], kv_heads=k.shape[1], world=comm.size)
        roles = self.roles(comm.size)
        if comm.rank not in roles.sources:
            raise ValueError(f"group rank {comm.rank} is a CAD attention server (server_ranks="
                             f"{list(roles.servers)}); it runs distattn.cad.server.serve, not attention")
        if n_tokens is None and cu_seqlens is not None:
            n_tokens = int(list(cu_seqlens)[-1])
        if n_tokens is None and self.dedicated:
            raise ValueError("dedicated cad needs n_tokens or cu_seqlens on the trainer ranks "
                             "(servers cannot join an all-reduce of local lengths)")
        n = total_tokens(q.shape[0], comm, n_tokens)
        n_src = len(roles.sources)
        lay = self.layout(n, n_src, cu_seqlens)
        me = roles.sources.index(comm.rank)
        if q.shape[0] != lay.size(me):
            raise ValueError(f"rank {comm.rank} holds {q.shape[0]} tokens but the cad {lay.name} layout "
                             f"of {n} tokens over {n_src} token-owning ranks gives it {lay.size(me)}")
        meta = Meta(q.shape[1], k.shape[1], q.shape[2], q.dtype, q.device)
        rps = self.rank_plans(n, lay.cu_seqlens, causal, meta, roles, comm.rank)
        header = _Header(roles.sources[0], causal, tuple(lay.cu_seqlens)) if self.dedicated else None
        scale = default_scale(q.shape[-1], softmax_scale)
        return _CadAttention.apply(q, k, v, comm, rps, meta, scale, header)

    # -- traffic --------------------------------------------------------------------
    def comm_bytes(self, shape: AttnShape, world: int, rank: int = 0) -> CommVolume:
        roles = self.roles(world)
        n_src = len(roles.sources)
        dtype = {4: torch.float32, 2: torch.bfloat16, 8: torch.float64}.get(shape.dtype_bytes,
                                                                             torch.float32)
        qb, kvb = _row_bytes(shape.heads, shape.kv_heads, shape.head_dim, dtype)
        plans = self.plans(shape.n_tokens, n_src, shape.cu_seqlens, True, qb, kvb)
        if rank in roles.sources and not self.dedicated:
            part = rank
        elif rank in roles.sources:
            part = roles.sources.index(rank)
        else:
            part = n_src + roles.servers.index(rank)
        fwd = bwd = 0
        for p in plans:
            t = p.traffic(shape.heads, shape.kv_heads, shape.head_dim, shape.dtype_bytes)
            fwd += t.fwd_sent(part)
            bwd += t.bwd_sent(part)
        vol = CommVolume(fwd={"all_to_all": fwd}, bwd={"all_to_all": bwd})
        if self.dedicated and rank == roles.sources[0]:
            n_docs = len(plans[0].doc_lens)
            vol.fwd["broadcast"] = header_bytes(n_docs)
            vol.bwd["broadcast"] = header_bytes(n_docs)
        return vol


def _major_owner(lay, n_sources: int) -> list[int]:
    """Per document: the rank that holds most of its tokens (ties: the lowest rank)."""
    counts: dict[tuple[int, int], int] = {}
    for r in range(n_sources):
        for run in lay.runs(r):
            counts[(run.doc, r)] = counts.get((run.doc, r), 0) + run.length
    best: list[tuple[int, int]] = [(0, 0)] * lay.n_docs
    for (d, r), n in counts.items():
        if n > best[d][0] or (n == best[d][0] and r < best[d][1]):
            best[d] = (n, r)
    return [r for _, r in best]


def _row_bytes(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    e = torch.empty((), dtype=dtype).element_size()
    return heads * head_dim * e, 2 * kv_heads * head_dim * e
