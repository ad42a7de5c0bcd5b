"""USP: Ulysses inside groups of U ranks, ring attention across the R = W/U groups.

The CP group of size W is a U x R grid: cp rank c = ring_idx*U + u_idx, so a
ulysses group is U consecutive cp ranks (intra-node when ranks are placed
node by node) and a ring group takes one rank of every ulysses group.

Layout (two levels, `USPLayout`): the sequence is first dealt to the R ring
ranks by the base layout (`layout_name`, zigzag by default, at world R); ring
rank j's tokens, in their local order, are then cut contiguously into U pieces
for cp ranks j*U .. j*U+U-1. After the ulysses all-to-all every member of group
j therefore holds exactly ring rank j's token set, for H/U of the heads, and a
ring over R ranks with the base layout finishes the job. U=1 is the ring scheme
with the base layout; U=W is Ulysses over a contiguous-chunked base layout.

Forward: one all-to-all (q, k, v; KV heads by the Ulysses GQA rules, replicas
when U > Hkv) in the ulysses group, ring attention in the ring group, one
all-to-all of the output back. Backward mirrors it: dout all-to-all, the ring's
backward (dK/dV accumulators in `dkv_dtype`), one all-to-all of dq/dk/dv. The
whole chain is one autograd.Function (`ulysses._HeadParallelAttention` with a
ring inner part), so dK/dV stay fp32 from the ring accumulators to the sum over
replicated kv heads; only the final gradients are rounded to the input dtype.
An axis of size one is skipped: U=1 has no all-to-all, R=1 no ring.

Traffic per cp rank c = j*U + u (T_c its tokens, S_j = ring rank j's tokens,
a = H/U q heads and n kv heads per rank after the exchange, s bytes per
element, D head dim, k = 4 when kv heads are replicated and dkv_dtype="fp32",
else s; ring terms are `Ring.comm_bytes` at world R with n kv heads):
  forward   (U-1)*T_c*(a+2n)*D*s + (S_j-T_c)*a*D*s           all_to_all
          + sum_{t<R-1} S_{(j-t)%R} * 2nD * s                 exchange
  backward  (U-1)*T_c*a*D*s + (S_j-T_c)*(a*s+2n*k)*D         all_to_all
          + the forward exchange + sum_{t<R} S_{(j-t)%R} * 2nD * dkv_bytes  (R > 1)
(U = 1: no all_to_all term; R = 1: no exchange term.)

Process groups: with 1 < U < W the ulysses and ring groups are split from the
cp group once (`distattn.mesh.split_cp_group`) and cached on the scheme object.
Making them is a collective over WORLD (every process calls `new_group` for
every subgroup in the same order), so the first call on a cp group must be made
by every process in the world. A mesh that already holds the groups hands them
in with `bind(ulysses_group, ring_group)` instead.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from distattn.comm import Comm
from distattn.kernels.softmax import check_shapes, default_scale
from distattn.layout import LAYOUTS, Layout, Range, get_layout, split_sizes
from distattn.mesh import split_cp_group
from distattn.schemes.base import (AttnShape, CommVolume, Scheme, concat_runs, make_comm, register,
                                   total_tokens)
from distattn.schemes.ring import DKV_DTYPES, Ring, RingPlan, ring_backward, ring_forward
from distattn.schemes.ulysses import (A2APlan, HeadSplit, LocalInner, a2a_volume, best_ulysses_degree,
                                      head_parallel_attention, head_split, head_split_error,
                                      plan_by_doc)


# ----------------------------------------------------------------------------- layout


def _slice_ranges(ranges: Sequence[Range], sizes: Sequence[int]) -> list[list[Range]]:
    """Cut a rank's ranges (in local order) into consecutive pieces of the given token counts."""
    out: list[list[Range]] = []
    it = iter(ranges)
    cur: Range | None = next(it, None)
    for size in sizes:
        piece: list[Range] = []
        need = size
        while need > 0 and cur is not None:
            a, b = cur
            take = min(need, b - a)
            piece.append((a, a + take))
            need -= take
            cur = (a + take, b) if a + take < b else next(it, None)
        out.append(piece)
    return out


class USPLayout(Layout):
    """Base layout over R ring ranks, each ring rank's tokens cut contiguously into U pieces."""

    name = "usp"

    def __init__(self, n_tokens: int, world: int, cu_seqlens: object = None, ulysses: int = 1,
                 base: str = "zigzag") -> None:
        super().__init__(n_tokens, world, cu_seqlens)
        if ulysses < 1 or self.world % ulysses:
            raise ValueError(f"usp needs cp % ulysses == 0: cp={self.world}, ulysses={ulysses}")
        self.ulysses = ulysses
        self.ring = self.world // ulysses
        self.base = get_layout(base, self.n_tokens, self.ring, self.cu_seqlens)
        self.name = f"usp({base}, ulysses={ulysses})"
        ranges: list[list[Range]] = []
        for j in range(self.ring):
            rs = self.base.ranges(j)
            ranges.extend(_slice_ranges(rs, split_sizes(sum(b - a for a, b in rs), ulysses)))
        self._set_ranges(ranges)

    def members(self, ring_rank: int) -> list[int]:
        """cp ranks of ulysses group `ring_rank`."""
        u = self.ulysses
        return list(range(ring_rank * u, (ring_rank + 1) * u))

    def group_runs(self, ring_rank: int):
        """Runs of ring rank j's token set: its ulysses members' shards concatenated."""
        return concat_runs([self.runs(c) for c in self.members(ring_rank)])

    def ring_sizes(self) -> list[int]:
        return [sum(self.size(c) for c in self.members(j)) for j in range(self.ring)]


# ----------------------------------------------------------------------------- process groups


def usp_groups(group, ulysses: int):
    """(ulysses_group, ring_group) of this process inside the cp `group`; None on an axis of one.

    cp rank c = ring_idx*ulysses + u_idx. An axis of size 1 needs no group, and an
    axis as large as the cp group is the cp group itself, so only 1 < ulysses < cp
    creates groups, through `distattn.mesh.split_cp_group`: collective over WORLD,
    every process must make the call. When the cp group is the whole world the
    list of cp groups is known without an all_gather_object.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        if ulysses != 1:
            raise ValueError(f"usp needs cp % ulysses == 0: cp=1, ulysses={ulysses}")
        return None, None
    world = dist.get_world_size(group)
    if world % ulysses:
        raise ValueError(f"usp needs cp % ulysses == 0: cp={world}, ulysses={ulysses}")
    if ulysses == 1:
        return None, group
    if ulysses == world:
        return group, None
    known = [list(range(world))] if world == dist.get_world_size() else None
    return split_cp_group(group, ulysses, world_cp_groups=known)


# ----------------------------------------------------------------------------- ring inner


class RingInner:
    """The ring part of USP: attention of ring rank j's token set over every ring rank's."""

    def __init__(self, comm: Comm, plan: RingPlan, scale: float, dkv_dtype: str):
        self.comm, self.plan, self.scale = comm, plan, scale
        self.dkv_dtype = dkv_dtype

    def forward(self, qh, kh, vh):
        return ring_forward(self.comm, qh, kh, vh, self.plan, self.scale)

    def backward(self, dout_h, qh, kh, vh, out_h, lse):
        dt = torch.float32 if self.dkv_dtype == "fp32" else kh.dtype
        return ring_backward(self.comm, dout_h, qh, kh, vh, out_h, lse, self.plan, self.scale, dt)


# ----------------------------------------------------------------------------- scheme


@register("usp")
@dataclass
class USP(Scheme):
    """Unified sequence parallelism: ulysses (degree `ulysses`) x zigzag ring (degree cp/ulysses)."""

    ulysses: int = 1
    layout_name: str = "zigzag"
    dkv_dtype: str = "fp32"

    def __post_init__(self):
        if isinstance(self.ulysses, bool) or not isinstance(self.ulysses, int) or self.ulysses < 1:
            raise ValueError(f"usp ulysses must be a positive integer, got {self.ulysses!r}")
        if self.dkv_dtype not in DKV_DTYPES:
            raise ValueError(f"usp dkv_dtype must be one of {DKV_DTYPES}, got {self.dkv_dtype!r}")
        if self.layout_name not in LAYOUTS:
            raise ValueError(f"usp layout_name must be one of {sorted(LAYOUTS)}, got {self.layout_name!r}")
        self._groups: dict = {}
        self._plans: dict = {}
        self._bound: tuple | None = None

    # -- layout / checks ------------------------------------------------------
    def layout(self, n_tokens: int, world: int, cu_seqlens=None) -> USPLayout:
        if world % self.ulysses:
            raise ValueError(f"usp needs cp % ulysses == 0: cp={world}, ulysses={self.ulysses}")
        return USPLayout(n_tokens, world, cu_seqlens, self.ulysses, self.layout_name)

    def validate(self, *, heads: int, kv_heads: int, world: int) -> None:
        super().validate(heads=heads, kv_heads=kv_heads, world=world)
        u = self.ulysses
        if world % u:
            raise ValueError(f"usp needs cp % ulysses == 0: cp={world}, ulysses={u}; "
                             f"choose ulysses among the divisors of {world}")
        if heads % u:
            raise ValueError(f"usp needs heads % ulysses == 0: {heads} heads, ulysses={u}; "
                             f"use ulysses={best_ulysses_degree(heads, kv_heads, world)}")
        err = head_split_error(heads, kv_heads, u)
        if err is not None:
            raise ValueError(f"usp cannot split {kv_heads} kv heads for {heads} q heads over "
                             f"ulysses={u}: {err}; use ulysses={best_ulysses_degree(heads, kv_heads, world)}")

    # -- groups ---------------------------------------------------------------
    def bind(self, ulysses_group, ring_group) -> "USP":
        """Use these groups (from a ParallelMesh) instead of splitting the cp group.

        ulysses_group: this rank's U consecutive cp ranks; ring_group: the cp ranks
        with the same ulysses index (cp rank = ring_idx*U + u_idx). None stands for
        an axis of size 1. Sizes are checked against the cp group at each call.
        """
        self._bound = (ulysses_group, ring_group)
        return self

    def groups(self, group, world: int):
        """(ulysses_group, ring_group) for this cp group; None on an axis of size 1."""
        if self._bound is not None:
            uly, ring = self._bound
            r = world // self.ulysses
            got_r = dist.get_world_size(ring) if ring is not None else 1
            got_u = dist.get_world_size(uly) if uly is not None else 1
            if (got_u, got_r) != (self.ulysses, r):
                raise ValueError(f"usp bound groups have sizes ulysses={got_u}, ring={got_r}; this "
                                 f"cp group of {world} needs ulysses={self.ulysses}, ring={r}")
            return (uly if self.ulysses > 1 else None), (ring if r > 1 else None)
        ranks = tuple(dist.get_process_group_ranks(group)) if (
            group is not None and dist.is_available() and dist.is_initialized()
            and group is not dist.group.WORLD) else ("world", world)
        key = (id(group), ranks)
        got = self._groups.get(key)
        if got is None:
            got = self._groups[key] = usp_groups(group, self.ulysses)
        return got

    # -- compute --------------------------------------------------------------
    def _plan(self, n: int, world: int, rank: int, cu_seqlens, causal: bool):
        """(layout, RingPlan or None, local kernel calls or None), cached per shape."""
        key = (n, world, rank, None if cu_seqlens is None else tuple(int(c) for c in cu_seqlens),
               bool(causal))
        got = self._plans.get(key)
        if got is None:
            lay = self.layout(n, world, cu_seqlens)
            j = rank // self.ulysses
            if lay.ring > 1:
                got = (lay, RingPlan(j, [lay.group_runs(i) for i in range(lay.ring)], causal), None)
            else:
                runs = lay.group_runs(0)
                got = (lay, None, tuple(plan_by_doc(runs, runs, causal)))
            if len(self._plans) >= 16:
                self._plans.clear()
            self._plans[key] = got
        return got

    def attention(self, q, k, v, *, group, cu_seqlens=None, causal=True, softmax_scale=None,
                  ledger=None, n_tokens=None):
        comm = make_comm(group, ledger)
        check_shapes(q, k, v)
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"usp sends q, k, v in one message: dtypes must match, got "
                             f"{q.dtype}, {k.dtype}, {v.dtype}")
        W, U = comm.size, self.ulysses
        self.validate(heads=q.shape[1], kv_heads=k.shape[1], world=W)
        n = total_tokens(q.shape[0], comm, n_tokens)
        lay, ring_plan, local_calls = self._plan(n, W, comm.rank, cu_seqlens, causal)
        if q.shape[0] != lay.size(comm.rank):
            raise ValueError(f"rank {comm.rank} holds {q.shape[0]} tokens but the {lay.name} layout "
                             f"of {n} tokens gives it {lay.size(comm.rank)}")
        uly_group, ring_group = self.groups(group, W)
        j, u = divmod(comm.rank, U)
        split = head_split(q.shape[1], k.shape[1], U)
        scale = default_scale(q.shape[-1], softmax_scale)
        plan = None
        if U > 1:
            ucomm = make_comm(uly_group, comm.ledger)
            if (ucomm.size, ucomm.rank) != (U, u):
                raise ValueError(f"usp ulysses group: rank {ucomm.rank} of {ucomm.size}, expected "
                                 f"rank {u} of {U} (cp rank {comm.rank})")
            plan = A2APlan(split, tuple(lay.size(c) for c in lay.members(j)), u)
        else:
            ucomm = comm  # never used for traffic: no exchange on an axis of one
        if lay.ring > 1:
            rcomm = make_comm(ring_group, comm.ledger)
            if (rcomm.size, rcomm.rank) != (lay.ring, j):
                raise ValueError(f"usp ring group: rank {rcomm.rank} of {rcomm.size}, expected "
                                 f"rank {j} of {lay.ring} (cp rank {comm.rank})")
            inner = RingInner(rcomm, ring_plan, scale, self.dkv_dtype)
        else:
            inner = LocalInner(local_calls, scale)
        return head_parallel_attention(q, k, v, comm=ucomm, plan=plan, inner=inner,
                                       dkv_dtype=self.dkv_dtype)

    # -- traffic --------------------------------------------------------------
    def comm_bytes(self, shape: AttnShape, world: int, rank: int = 0) -> CommVolume:
        self.validate(heads=shape.heads, kv_heads=shape.kv_heads, world=world)
        U = self.ulysses
        lay = self.layout(shape.n_tokens, world, shape.cu_seqlens)
        split: HeadSplit = head_split(shape.heads, shape.kv_heads, U)
        j, u = divmod(rank, U)
        a2a_f, a2a_b = a2a_volume([lay.size(c) for c in lay.members(j)], u, split,
                                  shape.head_dim, shape.dtype_bytes, self.dkv_dtype)
        ring_shape = dataclasses.replace(shape, heads=split.q_per, kv_heads=split.kv_per)
        ring = Ring(layout_name=self.layout_name, dkv_dtype=self.dkv_dtype).comm_bytes(
            ring_shape, lay.ring, j)
        fwd, bwd = dict(ring.fwd), dict(ring.bwd)
        fwd["all_to_all"] = a2a_f
        bwd["all_to_all"] = a2a_b
        return CommVolume(fwd=fwd, bwd=bwd)
