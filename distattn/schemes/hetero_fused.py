"""The fused path of the `hetero` scheme: one masked kernel call per unit (GPU: flex_attention).

The blockwise path (`hetero.py`) issues a few small kernel calls per query piece
and head class, which on a GPU is bound by launch overhead. Here every kernel
unit of the plan (`HeteroPlan.units`: the query heads of one class whose KV heads
lie in one group) is ONE call over all the keys it may see:

    keys(u) = [ own virtual buffer rows  kv_local[idx_own[c]] at u.kv_heads
              | fetched virtual buffer rows  src[gi][idx_rem[(c, gi)]] at u.hpos ]

under a mask that the call evaluates per (query row, key row) from lookup tensors
the plan's pieces give (document, global position, document-relative block, and
whether the key's block is on class c's stride). Query row i sees key row j iff

    same document, and
    causal:     pos(j) <= pos(i)  and (block(i) - block(j) < local_blocks or strided(c, block(j)))
    non-causal:                   |block(i) - block(j)| < local_blocks or strided(c, block(j))

with strided(None, .) always true (dense heads): the rule of `HeteroPattern`, and
exactly the pairs `_calls` plans for the blockwise path. The call returns the
final output of its query heads (no merge); unit outputs are disjoint query heads.

On CUDA the call is `flex_attention` (compiled) with a `BlockMask` per class,
built once per plan and device from the same mask function in 128 x 128 tiles;
the virtual buffer order ([strided blocks | other blocks] per document) keeps the
visible keys of a query tile in a few contiguous ranges, so few tiles are
computed. GQA is flex's `enable_gqa`. Its backward is flex's, through autograd.
flex_attention has no backward on CPU; there, the blockwise path runs, and the
tests drive this path with `reference_kernel` (dense masked fp32 attention from
the same mask function) and check flex's forward on CPU with the same BlockMask.

Communication is `_Fetch`, an autograd Function that posts the same messages as
the blockwise path: forward, every peer's needed rows of my K/V (`post_fetch`);
backward, the fp32 gradients of the rows I fetched go home and what peers send
is added into my dK/dV (`post_grads_home`, `add_grads_home`). So the ledger still
equals `Hetero.comm_bytes`. Unlike the blockwise path, nothing overlaps the
transfers: the one call per unit needs the fetched keys, and its backward yields
their gradients only at its end.

Selection (`hetero_kernel`): DISTATTN_HETERO_KERNEL=auto|blocks|flex; auto is flex
on CUDA when torch has flex_attention whose `BlockMask.from_kv_blocks` takes
`seq_lengths` (the masks here are not whole tiles long), blocks elsewhere. The
choice is logged once per device. Nothing of this path has run on a GPU yet: its speed there is unmeasured.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
from typing import Callable, Sequence

import torch

from distattn.comm import Comm
from distattn.kernels.reference import masked_attention
from distattn.schemes.hetero import (_group_kv, _take_heads, add_grads_home, post_fetch,
                                     post_grads_home)
from distattn.schemes.hetero_plan import HeteroPlan, Piece

log = logging.getLogger("distattn")
ENV = "DISTATTN_HETERO_KERNEL"
KERNELS = ("auto", "blocks", "flex")
TILE = 128  # BlockMask tile (query and key rows)


# ----------------------------------------------------------------------------- selection

def _has_flex_api(flex_module) -> bool:
    """Does this flex_attention build take a BlockMask from tile lists at any sequence length
    (`BlockMask.from_kv_blocks(..., seq_lengths=...)`), as `ClassMask.block_mask` needs?"""
    block_mask = getattr(flex_module, "BlockMask", None)
    if block_mask is None or not hasattr(flex_module, "flex_attention"):
        return False
    try:
        params = inspect.signature(block_mask.from_kv_blocks).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    return "seq_lengths" in params


@functools.lru_cache(maxsize=None)
def _flex_api():
    try:
        from torch.nn.attention import flex_attention as mod
    except Exception:  # torch without flex_attention
        return None
    if not _has_flex_api(mod):
        return None
    return mod.flex_attention, mod.BlockMask


def flex_available() -> bool:
    """torch has flex_attention with the BlockMask API this path uses."""
    return _flex_api() is not None


def hetero_kernel(device: torch.device, needs_grad: bool) -> str:
    """'flex' or 'blocks': the path DISTATTN_HETERO_KERNEL (default auto) picks for `device`."""
    want = os.environ.get(ENV, "auto")
    if want not in KERNELS:
        raise ValueError(f"{ENV}={want!r} is not a hetero kernel; use one of {', '.join(KERNELS)}")
    why = ""
    if want == "auto":
        got = "flex" if device.type == "cuda" and flex_available() else "blocks"
        if device.type == "cuda" and got == "blocks":
            why = f" (torch {torch.__version__} has no flex_attention with the BlockMask API used here)"
    elif want == "flex":
        if not flex_available():
            raise ValueError(f"{ENV}=flex needs torch.nn.attention.flex_attention with "
                             f"BlockMask.from_kv_blocks(seq_lengths=...), which torch "
                             f"{torch.__version__} does not have; set {ENV}=auto or blocks")
        if device.type != "cuda" and needs_grad:
            raise ValueError(f"{ENV}=flex: flex_attention has no backward on {device.type} (tensors "
                             f"need gradients); set {ENV}=auto or blocks, or run without gradients")
        got = "flex"
    else:
        got = "blocks"
    _log_choice(got, device.type, why)
    return got


@functools.lru_cache(maxsize=None)
def _log_choice(kind: str, device: str, why: str = "") -> None:
    what = ("fused, one flex_attention call per head class and KV group" if kind == "flex"
            else "blockwise kernel calls")
    log.info("hetero attention on %s: %s%s", device, what, why)


# ----------------------------------------------------------------------------- masks

def _rows(pieces: Sequence[Piece], n: int, pad: int, local: bool) -> tuple[torch.Tensor, ...]:
    """(doc, pos, block) per row for rows laid out by `pieces` (at their local_start when
    `local`, else one after the other), padded to `n` rows with document `pad`."""
    doc = torch.full((n,), pad, dtype=torch.long)
    pos = torch.zeros(n, dtype=torch.long)
    blk = torch.zeros(n, dtype=torch.long)
    at = 0
    for p in pieces:
        a = p.local_start if local else at
        doc[a:a + p.length] = p.doc
        pos[a:a + p.length] = torch.arange(p.start, p.start + p.length)
        blk[a:a + p.length] = p.block
        at += p.length
    return doc, pos, blk


def _mask_mod(q_doc, q_pos, q_blk, k_doc, k_pos, k_blk, k_strided, causal: bool, local_blocks: int):
    """flex_attention's mask_mod over the lookup tensors; also evaluates on broadcast index tensors."""
    if causal:
        def mask_mod(b, h, q_idx, kv_idx):
            near = (q_blk[q_idx] - k_blk[kv_idx] < local_blocks) | k_strided[kv_idx]
            return (q_doc[q_idx] == k_doc[kv_idx]) & (k_pos[kv_idx] <= q_pos[q_idx]) & near
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            near = ((q_blk[q_idx] - k_blk[kv_idx]).abs() < local_blocks) | k_strided[kv_idx]
            return (q_doc[q_idx] == k_doc[kv_idx]) & near
    return mask_mod


def _round_up(n: int) -> int:
    return max(TILE, -(-n // TILE) * TILE)


class ClassMask:
    """The mask of one head class's call: query rows (my buffer) x key rows (own | fetched).

    Lookup tensors are padded to whole tiles (padding rows belong to no document),
    so the mask function may be evaluated past the real lengths.
    """

    def __init__(self, plan: HeteroPlan, cls: int | None, device: torch.device):
        pat = plan.pattern
        own, rem = plan.key_pieces[cls]
        self.cls = cls
        self.tq = plan.sizes[plan.rank]
        self.tk_own = sum(p.length for p in own)
        self.tk = self.tk_own + sum(p.length for p in rem)
        q = _rows(plan.q_pieces, _round_up(self.tq), -2, local=True)
        k = _rows(list(own) + list(rem), _round_up(self.tk), -1, local=False)
        # HeteroPattern.strided, per key row
        strided = torch.ones_like(k[2], dtype=torch.bool) if cls is None else (k[2] + cls) % pat.stride == 0
        self.mask_mod = _mask_mod(*(t.to(device) for t in q), *(t.to(device) for t in k),
                                  strided.to(device), plan.causal, pat.local_blocks)
        self.device = device
        self._block_mask = None

    def dense(self) -> torch.Tensor:
        """[tq, tk] bool (small shapes only)."""
        qi = torch.arange(self.tq, device=self.device)[:, None]
        ki = torch.arange(self.tk, device=self.device)[None, :]
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        return self.mask_mod(zero, zero, qi, ki)

    def tiles(self, max_elems: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
        """(partial, full) [nq, nk] bool tile maps: tiles with some / all pairs visible.

        Tiles that reach past the real lengths are never full (as create_block_mask
        does). Evaluated a band of query tiles at a time: at most ~`max_elems` pairs.
        """
        nq, nk = _round_up(self.tq) // TILE, _round_up(self.tk) // TILE
        dev = self.device
        partial = torch.zeros((nq, nk), dtype=torch.bool, device=dev)
        full = torch.zeros((nq, nk), dtype=torch.bool, device=dev)
        ki = torch.arange(nk * TILE, device=dev)[None, :]
        zero = torch.zeros((), dtype=torch.long, device=dev)
        band = max(1, max_elems // (nk * TILE * TILE))
        for a in range(0, nq, band):
            b = min(nq, a + band)
            qi = torch.arange(a * TILE, b * TILE, device=dev)[:, None]
            m = self.mask_mod(zero, zero, qi, ki) & (qi < self.tq) & (ki < self.tk)
            cnt = m.view(b - a, TILE, nk, TILE).sum(dim=(1, 3))
            full[a:b] = cnt == TILE * TILE
            partial[a:b] = (cnt > 0) & ~full[a:b]
        return partial, full

    def block_mask(self):
        """flex_attention's BlockMask for this call (built once)."""
        if self._block_mask is None:
            _, BlockMask = _flex_api()
            partial, full = self.tiles()

            def ordered(t: torch.Tensor):
                num = t.sum(-1, dtype=torch.int32)
                idx = torch.argsort(t.to(torch.int8), dim=-1, descending=True, stable=True)
                return num[None, None].contiguous(), idx.to(torch.int32)[None, None].contiguous()

            kv_num, kv_idx = ordered(partial)
            full_num, full_idx = ordered(full)
            self._block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx,
                                                        BLOCK_SIZE=TILE, mask_mod=self.mask_mod,
                                                        seq_lengths=(self.tq, self.tk))
        return self._block_mask


def class_mask(plan: HeteroPlan, cls: int | None, device: torch.device) -> ClassMask:
    """`ClassMask` of `cls`, cached with the plan per device."""
    key = ("fused-mask", str(device), cls)
    if key not in plan.derived:
        plan.derived[key] = ClassMask(plan, cls, device)
    return plan.derived[key]


# ----------------------------------------------------------------------------- kernels

# kernel(q [Tq, Hq, D], k [Tk, Hk, D], v [Tk, Hk, D], mask, scale) -> out [Tq, Hq, D] in q's dtype;
# query head i uses KV head i // (Hq / Hk); differentiable
UnitKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ClassMask, float], torch.Tensor]


def reference_kernel(q, k, v, mask: ClassMask, scale: float) -> torch.Tensor:
    """Dense masked fp32 attention under the class mask, by autograd (small shapes: O(Tq*Tk))."""
    return masked_attention(q, k, v, mask.dense(), scale)[0].to(q.dtype)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    return torch.compile(_flex_api()[0])


def flex_kernel(q, k, v, mask: ClassMask, scale: float) -> torch.Tensor:
    """flex_attention with the class's BlockMask: compiled on CUDA, eager elsewhere (forward only).

    Not compiled on CPU: there inductor's flex template computed the first shapes exactly but
    then failed to build its C++ kernel once the key length turned dynamic (torch 2.13).
    On CUDA torch.compile specialises on the first unit's shapes and recompiles once with
    dynamic lengths when a unit of another length follows (unmeasured on a GPU so far)."""
    fn = _compiled_flex() if q.device.type == "cuda" else _flex_api()[0]
    b = [x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)]  # [1, H, T, D]
    out = fn(*b, block_mask=mask.block_mask(), scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


# ----------------------------------------------------------------------------- communication

class _Fetch(torch.autograd.Function):
    """src[gi] = the rows of peers' K/V my group gi needs; backward sends their gradients home."""

    @staticmethod
    def forward(ctx, kv, comm: Comm, plan: HeteroPlan):
        with comm.ledger.tag("fwd"):
            pending, src = post_fetch(comm, kv.detach(), plan)
            pending.wait()
        ctx.comm, ctx.plan = comm, plan
        ctx.kv_shape, ctx.kv_dtype = kv.shape, kv.dtype
        return tuple(src)

    @staticmethod
    def backward(ctx, *dsrc):
        plan, comm = ctx.plan, ctx.comm
        dev = dsrc[0].device
        dsrc = [g.to(torch.float32) for g in dsrc]
        with comm.ledger.tag("bwd"):
            pending, homes = post_grads_home(comm, dsrc, plan, ctx.kv_shape[-1], dev)
            dkv = torch.zeros(ctx.kv_shape, dtype=torch.float32, device=dev)
            add_grads_home(dkv, pending.wait(), homes, plan)
        return dkv.to(ctx.kv_dtype), None, None


# ----------------------------------------------------------------------------- forward

def fused_attention(q, k, v, comm: Comm, plan: HeteroPlan, scale: float,
                    kernel: UnitKernel = flex_kernel) -> torch.Tensor:
    """The scheme's output for local q [Tq, H, D], k, v [Tq, Hkv, D], differentiable end to end."""
    ix = plan.index(q.device)
    kv = torch.stack((k, v), dim=1)  # [T, 2, Hkv, D]
    src = _Fetch.apply(kv, comm, plan)
    outs, order = [], []
    for u in plan.units:
        mask = class_mask(plan, u.cls, q.device)
        # the fetched rows always join the graph (even none), so every rank's backward
        # reaches _Fetch and posts its half of the gradient exchange
        keys = torch.cat((_group_kv(kv, ix["own"][u.cls], u.kv_heads),
                          _group_kv(src[u.group], ix["rem"][(u.cls, u.group)], u.hpos)))
        qu = _take_heads(q, u.q_heads, 1)
        kern = kernel if mask.tq and mask.tk else reference_kernel  # empty calls: plain math
        outs.append(kern(qu, keys[:, 0], keys[:, 1], mask, scale))
        order += u.q_heads
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    if order != list(range(q.shape[1])):
        inv = torch.empty(len(order), dtype=torch.long)
        inv[torch.tensor(order)] = torch.arange(len(order))
        out = out.index_select(1, inv.to(q.device))
    return out


__all__ = ["ClassMask", "ENV", "KERNELS", "class_mask", "flex_available", "flex_kernel",
           "fused_attention", "hetero_kernel", "reference_kernel"]
