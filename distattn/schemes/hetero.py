"""Heterogeneous per-head context shards (S2-Attention style) under context parallelism.

Every head attends to a local window of blocks plus one residue class of
earlier blocks (`distattn.kernels.sparse.HeteroPattern`); heads use different
classes, so together they cover the whole causal context while each head reads
a fraction of it. Under CP a rank therefore fetches only the K/V blocks that
its queries' heads need and computes only the visible blocks.

Plan (`hetero_plan.py`; built once per shape and cached; every rank derives every other rank's
needs from the deterministic layout, so no metadata is exchanged):
- every rank's runs are cut into *pieces* at document-relative block boundaries;
- a key piece is *needed* by rank r for class c when some query piece of r sees
  it under c (off-diagonal blocks by the pattern rule; a piece of the query's own
  block when it holds a key at or before one of r's queries there);
- KV heads whose query heads span the same set of classes form a *group*; a
  group's KV heads are fetched at the union of its classes' needed pieces.
  With gqa_pattern="kv" (default) each group is exactly one class, so a KV head
  travels only at its own class's blocks.

Forward: one `exchange` posts, to every peer, the rows of my K/V each of its
groups needs (one message per peer and group); while it travels the own-K/V part
is computed; then the fetched part, merged into the same fp32 (out, lse) with the
online-softmax merge. For each class, the needed pieces of a document are laid
out in a virtual key buffer (by `index_select`) as [strided blocks ascending |
other blocks ascending], so the strided blocks a query block sees form one
prefix and its window one range: every query piece costs at most two rectangle
calls plus its diagonal, whatever its position.

Backward reuses the fetched K/V (saved by forward: a fraction of the full K/V)
and sends nothing but fp32 dK/dV home: the fetched part's gradients are computed
first and posted, and the own part is computed while they travel.

Traffic per rank r (s = bytes per element, D = head_dim): with rows(i->j, G)
the token rows of rank i's K/V that rank j needs for group G, |G| its KV heads,
  forward   exchange  sum_{j != r} sum_G rows(r->j, G) * 2 * |G| * D * s   (what peers fetch)
  backward  exchange  sum_{j != r} sum_G rows(j->r, G) * 2 * |G| * D * 4   (fp32 dK/dV of
                      what I fetched, sent home)
`comm_bytes` evaluates this from the same plan, so it equals the ledger.

Kernels, chosen at run time by DISTATTN_HETERO_KERNEL=auto|blocks|flex (logged once):
- blocks (CPU default): the blockwise path of `kernels.softmax` (`block_forward` /
  `block_backward` over planned rectangles and causal squares), written above. It
  also runs on CUDA tensors (SDPA / flash-attn) and is exact there, but it issues
  a few small kernel calls per query block and head class, so on a GPU it is
  bound by launch overhead (on an H100, 3.3 s fwd+bwd at 16K tokens against 13.7 ms
  for one dense call, docs/benchmarks.md);
- flex (CUDA default when torch has flex_attention): `hetero_fused.py`, one
  flex_attention call per head class and KV group over its own and fetched keys
  with a BlockMask from the same pattern, the same messages through an autograd
  Function. Unmeasured on a GPU so far.

Layouts: any (zigzag by default; `weighted` with `layout_weights` for uneven
devices). The weighted layout balances *dense* causal cost; a sparse pattern's
cost also grows with position (window + position/stride blocks per query), so
zigzag-style pairing still balances it approximately, not exactly.

Per-layer dense/sparse: `dense_every` = k makes layers 0, k, 2k, ... dense; the
model asks `scheme.for_layer(layer_idx)`, which returns a ring scheme over the
same layout for dense layers and this scheme otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from distattn.comm import Comm
from distattn.kernels.softmax import block_backward, block_forward, check_shapes, default_scale
from distattn.kernels.sparse import HeteroPattern, layer_is_dense
from distattn.layout import as_cu_seqlens
from distattn.schemes.base import (AttnShape, CommVolume, Scheme, make_comm, register,
                                   total_tokens)
from distattn.schemes.hetero_plan import HeteroPlan, Piece, _as_slice, _Unit, cut_pieces, get_plan


# ----------------------------------------------------------------------------- compute

def _take_heads(x: torch.Tensor, heads: Sequence[int], dim: int) -> torch.Tensor:
    s = _as_slice(heads)
    if s is not None:
        return x.narrow(dim, s.start, s.stop - s.start)
    return x.index_select(dim, torch.tensor(list(heads), dtype=torch.long, device=x.device))


def _group_kv(kv: torch.Tensor, rows: torch.Tensor, heads: Sequence[int]) -> torch.Tensor:
    """kv[rows][:, :, heads] for a [T, 2, Hkv, D] buffer, copying only the selected rows and heads."""
    if len(heads) == kv.shape[2]:
        return kv.index_select(0, rows)
    s = _as_slice(heads)
    if s is not None:  # a head range: narrow (a view), then copy the rows
        return kv[:, :, s].index_select(0, rows)
    return _take_heads(kv.index_select(0, rows), heads, 2)


def _add_rows(dst: torch.Tensor, rows: torch.Tensor, heads: Sequence[int], src: torch.Tensor) -> None:
    """dst[rows, :, heads] += src for a [T, 2, H, D] fp32 accumulator."""
    s = _as_slice(heads)
    if s is not None:
        dst[:, :, s].index_add_(0, rows, src)
        return
    for j, h in enumerate(heads):
        dst[:, :, h].index_add_(0, rows, src[:, :, j])


def _unit_kv(plan: HeteroPlan, u: _Unit, part: str, kv_local, src, ix):
    if part == "own":
        return _group_kv(kv_local, ix["own"][u.cls], u.kv_heads)
    return _group_kv(src[u.group], ix["rem"][(u.cls, u.group)], u.hpos)


def post_fetch(comm: Comm, kv: torch.Tensor, plan: HeteroPlan):
    """Post the forward exchange: to every peer, the rows of my K/V ([T, 2, Hkv, D]) each of
    its groups needs; from every peer, mine into `src[gi]` ([rows, 2, |group|, D], peers in
    rank order). Returns (pending, src); src is filled once `pending.wait()` returns."""
    ix = plan.index(kv.device)
    sends, recvs, src = [], [], []
    for gi, g in enumerate(plan.groups):
        src.append(kv.new_empty((plan.src_rows[gi], 2, len(g), kv.shape[-1])))
    for j in range(plan.world):
        if j == plan.rank:
            continue
        for gi, g in enumerate(plan.groups):
            if plan.send_count[(j, gi)]:
                sends.append((_group_kv(kv, ix["send"][(j, gi)], g), j))
            at, n = plan.recv_off[(j, gi)]
            if n:
                recvs.append((src[gi][at:at + n], j))
    return comm.exchange(sends, recvs), src


def post_grads_home(comm: Comm, dsrc: Sequence[torch.Tensor], plan: HeteroPlan, head_dim: int,
                    device: torch.device):
    """Post the backward exchange: the fp32 dK/dV of the rows I fetched (`dsrc[gi]`, laid out
    as `src[gi]`) go to their owners; the dK/dV of my rows that peers fetched come back.
    Returns (pending, homes) for `add_grads_home`."""
    f32 = torch.float32
    sends, homes = [], []
    for j in range(plan.world):
        if j == plan.rank:
            continue
        for gi, g in enumerate(plan.groups):
            at, n = plan.recv_off[(j, gi)]
            if n:
                sends.append((dsrc[gi][at:at + n], j))
            m = plan.send_count[(j, gi)]
            if m:
                homes.append((torch.empty((m, 2, len(g), head_dim), dtype=f32, device=device), (j, gi)))
    return comm.exchange(sends, [(t, j) for t, (j, _) in homes]), homes


def add_grads_home(dkv: torch.Tensor, got: Sequence[torch.Tensor], homes, plan: HeteroPlan) -> None:
    """Add the dK/dV peers sent home (`post_grads_home`) into my fp32 [T, 2, Hkv, D] dkv."""
    ix = plan.index(dkv.device)
    for t, (_, (j, gi)) in zip(got, homes):
        _add_rows(dkv, ix["send"][(j, gi)], plan.groups[gi], t)


def hetero_forward(comm: Comm, q, k, v, plan: HeteroPlan, scale: float):
    """fp32 (out, lse) of local q, plus the fetched K/V per group (kept for backward)."""
    ix = plan.index(q.device)
    kv = torch.stack((k, v), dim=1)  # [T, 2, Hkv, D]
    pending, src = post_fetch(comm, kv, plan)  # travels while the own part is computed
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for part in ("own", "rem"):
        if part == "rem":
            pending.wait()
        for u in plan.units:
            calls = (plan.calls_own if part == "own" else plan.calls_rem)[u.cls]
            if not calls:
                continue
            kvb = _unit_kv(plan, u, part, kv, src, ix)
            qs = _as_slice(u.q_heads)
            if qs is not None:
                block_forward(q[:, qs], kvb[:, 0], kvb[:, 1], calls, scale, out[:, qs], lse[:, qs])
            else:
                qh = torch.tensor(u.q_heads, dtype=torch.long, device=q.device)
                o, l = out.index_select(1, qh), lse.index_select(1, qh)
                block_forward(q.index_select(1, qh), kvb[:, 0], kvb[:, 1], calls, scale, o, l)
                out[:, qh], lse[:, qh] = o, l
    return out, lse, src


def hetero_backward(comm: Comm, dout, q, k, v, out, lse, src, plan: HeteroPlan, scale: float):
    """dq, dk, dv (fp32): fetched part first and its dK/dV posted home, then the own part."""
    ix = plan.index(q.device)
    f32 = torch.float32
    kv = torch.stack((k, v), dim=1)
    dq = torch.zeros(q.shape, dtype=f32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=f32, device=kv.device)
    dsrc = [torch.zeros(s.shape, dtype=f32, device=s.device) for s in src]

    def run(part: str, u: _Unit, calls) -> torch.Tensor:
        kvb = _unit_kv(plan, u, part, kv, src, ix)
        g = torch.zeros(kvb.shape, dtype=f32, device=kvb.device)
        qs = _as_slice(u.q_heads)
        if qs is not None:
            block_backward(dout[:, qs], q[:, qs], kvb[:, 0], kvb[:, 1], out[:, qs], lse[:, qs],
                           calls, scale, dq=dq[:, qs], dk=g[:, 0], dv=g[:, 1])
        else:
            qh = torch.tensor(u.q_heads, dtype=torch.long, device=q.device)
            dqu = torch.zeros((q.shape[0], len(u.q_heads), q.shape[2]), dtype=f32, device=q.device)
            block_backward(dout.index_select(1, qh), q.index_select(1, qh), kvb[:, 0], kvb[:, 1],
                           out.index_select(1, qh), lse.index_select(1, qh), calls, scale,
                           dq=dqu, dk=g[:, 0], dv=g[:, 1])
            dq.index_add_(1, qh, dqu)
        return g

    for u in plan.units:
        calls = plan.calls_rem[u.cls]
        if calls:
            _add_rows(dsrc[u.group], ix["rem"][(u.cls, u.group)], u.hpos, run("rem", u, calls))
    pending, homes = post_grads_home(comm, dsrc, plan, kv.shape[-1], kv.device)  # home while own part runs
    for u in plan.units:
        calls = plan.calls_own[u.cls]
        if calls:
            _add_rows(dkv, ix["own"][u.cls], u.kv_heads, run("own", u, calls))
    add_grads_home(dkv, pending.wait(), homes, plan)
    return dq, dkv[:, 0], dkv[:, 1]


class _HeteroAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, comm: Comm, plan: HeteroPlan, scale: float):
        with comm.ledger.tag("fwd"):
            out, lse, src = hetero_forward(comm, q, k, v, plan, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.src, ctx.comm, ctx.plan, ctx.scale = src, comm, plan, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with ctx.comm.ledger.tag("bwd"):
            dq, dk, dv = hetero_backward(ctx.comm, dout.contiguous(), q, k, v, out, lse, ctx.src,
                                         ctx.plan, ctx.scale)
        ctx.src = None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


# ----------------------------------------------------------------------------- scheme

@register("hetero")
@dataclass
class Hetero(Scheme):
    """Per-head heterogeneous block-sparse attention; each rank fetches only the K/V blocks it needs."""

    block: int = 64                  # tokens per block (counted from each document's start)
    local_blocks: int = 2            # local window in blocks, diagonal included
    stride: int = 4                  # vertical stride in blocks
    head_step: int | None = None     # stride phase step between pattern heads (None: auto)
    offset: int = 0                  # stride phase of pattern head 0
    dense_heads: int = 0             # the last pattern heads that attend densely
    gqa_pattern: str = "kv"          # "kv": q heads share their KV head's pattern; "q": per q head
    allow_partial_coverage: bool = False
    dense_every: int = 0             # model hint: layers 0, k, 2k, ... dense (0: none)
    layout_name: str = "zigzag"
    layout_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        self.pattern  # validates the pattern options  # noqa: B018
        if isinstance(self.dense_every, bool) or not isinstance(self.dense_every, int) \
                or self.dense_every < 0:
            raise ValueError(f"hetero dense_every must be an integer >= 0 (0: no dense layers), "
                             f"got {self.dense_every!r}")
        if self.layout_weights is not None:
            self.layout_weights = tuple(float(w) for w in self.layout_weights)

    @property
    def pattern(self) -> HeteroPattern:
        return HeteroPattern(block=self.block, local_blocks=self.local_blocks, stride=self.stride,
                             head_step=self.head_step, offset=self.offset,
                             dense_heads=self.dense_heads, gqa_pattern=self.gqa_pattern)

    def validate(self, *, heads: int, kv_heads: int, world: int) -> None:
        super().validate(heads=heads, kv_heads=kv_heads, world=world)
        self.pattern.check_coverage(heads, kv_heads, self.allow_partial_coverage)

    def for_layer(self, layer_idx: int) -> Scheme:
        """The scheme layer `layer_idx` (0-based) runs: dense ring on dense layers, else this one."""
        if layer_is_dense(layer_idx, self.dense_every):
            from distattn.schemes.ring import Ring
            return Ring(layout_name=self.layout_name, layout_weights=self.layout_weights)
        return self

    def plan(self, n_tokens: int, heads: int, kv_heads: int, world: int, rank: int, cu_seqlens=None,
             causal: bool = True) -> HeteroPlan:
        cu = as_cu_seqlens(cu_seqlens, n_tokens)
        return get_plan(self.pattern, heads, kv_heads, bool(causal), self.layout_name, int(n_tokens),
                        int(world), tuple(cu) if cu_seqlens is not None else None,
                        self.layout_weights, int(rank))

    def attention(self, q, k, v, *, group, cu_seqlens=None, causal=True, softmax_scale=None,
                  ledger=None, n_tokens=None):
        comm = make_comm(group, ledger)
        check_shapes(q, k, v)
        self.validate(heads=q.shape[1], kv_heads=k.shape[1], world=comm.size)
        n = total_tokens(q.shape[0], comm, n_tokens)
        plan = self.plan(n, q.shape[1], k.shape[1], comm.size, comm.rank, cu_seqlens, causal)
        if q.shape[0] != plan.sizes[comm.rank]:
            raise ValueError(f"rank {comm.rank} holds {q.shape[0]} tokens but the {self.layout_name} "
                             f"layout of {n} tokens gives it {plan.sizes[comm.rank]}")
        scale = default_scale(q.shape[-1], softmax_scale)
        from distattn.schemes import hetero_fused  # imports this module
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        if hetero_fused.hetero_kernel(q.device, grad) == "flex":
            return hetero_fused.fused_attention(q, k, v, comm, plan, scale, hetero_fused.flex_kernel)
        return _HeteroAttention.apply(q, k, v, comm, plan, scale)

    def comm_bytes(self, shape: AttnShape, world: int, rank: int = 0, causal: bool = True) -> CommVolume:
        self.validate(heads=shape.heads, kv_heads=shape.kv_heads, world=world)
        plan = self.plan(shape.n_tokens, shape.heads, shape.kv_heads, world, rank, shape.cu_seqlens,
                         causal)
        row = 2 * shape.head_dim  # K and V elements per token and KV head
        # forward: the rows my peers fetch from me; backward: the fp32 dK/dV of the rows I fetched
        return CommVolume(fwd={"exchange": plan.sent_rows() * row * shape.dtype_bytes},
                          bwd={"exchange": plan.fetched_rows() * row * 4})


__all__ = ["Hetero", "HeteroPlan", "Piece", "cut_pieces", "get_plan", "layer_is_dense"]
