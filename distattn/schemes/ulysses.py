"""Ulysses: all-to-all from sequence shards to head shards, attention, and back.

Before attention every rank holds T_r tokens of all H heads; one all-to-all
turns that into all N tokens of H/W heads (rows ordered by source rank, i.e.
the layout's shards concatenated), so attention is an ordinary local call over
the whole sequence for those heads, with the document/causal mask described by
the concatenated runs. A second all-to-all returns the output to the sequence
layout. Any layout works; causal work is balanced by construction because every
rank sees every token.

q, k and v travel in one message per peer (q heads, then K heads, then V heads
of each token), and so do dq, dk, dv in backward.

GQA: only KV heads travel. Rank j takes q heads [j*a, (j+1)*a) with a = H/W and
the kv heads they use (kv head of q head h is h // (H/Hkv)). With Hkv % W == 0
the kv heads split evenly; with W % Hkv == 0 several ranks receive a replica of
the same kv head (the replicated bytes are on the wire and in `comm_bytes`) and
backward sums the replicas' dK/dV. Any split where every rank's q-head block
maps onto the same number of whole kv heads works; others are refused.

Backward gradients travel in the input dtype, except the dK/dV partials of
replicated kv heads: they are summed after the exchange, so with
`dkv_dtype="fp32"` (default, as the ring's accumulators) they travel in fp32 and
are rounded once after the sum; the message then carries bytes, not one dtype.

Traffic per rank r (T_r its tokens, N all tokens, s bytes per element, D head
dim, a = H/W q heads and n kv heads per rank after the exchange, k = 4 when kv
heads are replicated and dkv_dtype="fp32", else s):
  forward   (W-1)*T_r*(a+2n)*D*s   q, k, v to head shards
          + (N-T_r)*a*D*s          output back
  backward  (W-1)*T_r*a*D*s        dout to head shards
          + (N-T_r)*(a*s+2n*k)*D   dq, dk, dv back
Two all_to_all calls per direction; at W == 1 both are recorded with 0 bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from distattn.comm import Comm
from distattn.kernels.softmax import (BlockCall, block_backward, block_forward, check_shapes,
                                      default_scale, plan_calls)
from distattn.layout import LAYOUTS, Run
from distattn.schemes.base import (AttnShape, CommVolume, Scheme, concat_runs, make_comm, register,
                                   total_tokens)


# ----------------------------------------------------------------------------- head split


@dataclass(frozen=True)
class HeadSplit:
    """How H q heads and Hkv kv heads are dealt to `parts` ranks by an all-to-all."""

    parts: int
    heads: int
    kv_heads: int
    q_per: int                          # a: q heads per rank
    kv_per: int                         # n: kv heads per rank (replicas included)
    kv_index: tuple[int, ...] | None    # kv head sent to each (rank, slot); None = plain split

    @property
    def replicated(self) -> bool:
        return self.kv_index is not None


def kv_heads_of(heads: int, kv_heads: int, parts: int) -> list[list[int]]:
    """For each rank, the kv heads its block of q heads uses (in order, no repeats)."""
    a, g = heads // parts, heads // kv_heads
    return [sorted({h // g for h in range(j * a, (j + 1) * a)}) for j in range(parts)]


def head_split_error(heads: int, kv_heads: int, parts: int) -> str | None:
    """Why `parts` ranks cannot share these heads by all-to-all, or None if they can."""
    if heads % kv_heads:
        return f"GQA needs heads % kv_heads == 0: {heads} heads, {kv_heads} kv heads"
    if heads % parts:
        return f"heads % {parts} != 0 ({heads} heads)"
    a, g = heads // parts, heads // kv_heads
    per = kv_heads_of(heads, kv_heads, parts)
    n = len(per[0])
    ok = all(len(p) == n for p in per) and a % n == 0 and all(
        per[j][i // (a // n)] == (j * a + i) // g for j in range(parts) for i in range(a))
    if not ok:
        return (f"{parts} ranks of {a} q heads each do not map onto whole kv-head groups "
                f"({kv_heads} kv heads, {g} q heads per kv head): need kv_heads % {parts} == 0, "
                f"{parts} % kv_heads == 0, or (heads/{parts}) a multiple or divisor of {g}")
    return None


def head_split(heads: int, kv_heads: int, parts: int) -> HeadSplit:
    err = head_split_error(heads, kv_heads, parts)
    if err is not None:
        raise ValueError(err)
    per = kv_heads_of(heads, kv_heads, parts)
    flat = tuple(h for p in per for h in p)
    plain = flat == tuple(range(kv_heads))
    return HeadSplit(parts, heads, kv_heads, heads // parts, len(per[0]), None if plain else flat)


def best_ulysses_degree(heads: int, kv_heads: int, world: int) -> int:
    """Largest divisor u of `world` whose all-to-all over u ranks can split these heads."""
    for u in range(world, 0, -1):
        if world % u == 0 and head_split_error(heads, kv_heads, u) is None:
            return u
    return 1


def _way_out(heads: int, kv_heads: int, world: int) -> str:
    u = best_ulysses_degree(heads, kv_heads, world)
    if u > 1:
        return f"use usp with ulysses={u}"
    return "use usp with ulysses=1 (pure ring), ring, or allgather"


# ----------------------------------------------------------------------------- all-to-all packing


def select_kv(x: torch.Tensor, split: HeadSplit) -> torch.Tensor:
    """[T, Hkv, D] -> [T, parts*n, D]: the kv heads each rank receives, replicas included."""
    if split.kv_index is None:
        return x
    return x.index_select(1, torch.tensor(split.kv_index, dtype=torch.long, device=x.device))


def fold_kv(x: torch.Tensor, split: HeadSplit, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `select_kv` for gradients: replicas of a kv head are summed in fp32."""
    if split.kv_index is None:
        return x.to(dtype)
    idx = torch.tensor(split.kv_index, dtype=torch.long, device=x.device)
    out = torch.zeros((x.shape[0], split.kv_heads, x.shape[2]), dtype=torch.float32, device=x.device)
    return out.index_add_(1, idx, x.to(torch.float32)).to(dtype)


def to_heads(xs: Sequence[torch.Tensor], parts: int) -> torch.Tensor:
    """Send buffer of a sequence -> heads all-to-all.

    Each x is [T, parts*w_i, D]; the result is [parts*T, sum(w_i), D] whose block j
    (rows j*T..(j+1)*T) holds head slice j of every x, side by side, for rank j.
    """
    t, d = xs[0].shape[0], xs[0].shape[2]
    widths = [x.shape[1] // parts for x in xs]
    buf = xs[0].new_empty((parts, t, sum(widths), d))
    o = 0
    for x, w in zip(xs, widths):
        buf[:, :, o:o + w].copy_(x.reshape(t, parts, w, d).transpose(0, 1))
        o += w
    return buf.view(parts * t, sum(widths), d)


def from_heads(recv: torch.Tensor, parts: int, widths: Sequence[int]) -> list[torch.Tensor]:
    """Receive buffer of a heads -> sequence all-to-all, [parts*T, sum(w), D] -> [T, parts*w_i, D] each."""
    t, d = recv.shape[0] // parts, recv.shape[2]
    r = recv.view(parts, t, sum(widths), d)
    out, o = [], 0
    for w in widths:
        out.append(r[:, :, o:o + w].transpose(0, 1).reshape(t, parts * w, d))
        o += w
    return out


@dataclass(frozen=True)
class A2APlan:
    """Split sizes of one group's sequence <-> heads exchange, seen from one member."""

    split: HeadSplit
    sizes: tuple[int, ...]   # tokens each member holds in the sequence layout
    rank: int

    @property
    def mine(self) -> int:
        return self.sizes[self.rank]

    @property
    def to_heads_splits(self) -> tuple[list[int], list[int]]:
        return [self.mine] * len(self.sizes), list(self.sizes)

    @property
    def to_seq_splits(self) -> tuple[list[int], list[int]]:
        return list(self.sizes), [self.mine] * len(self.sizes)


def wire_dtypes(split: HeadSplit, dtype: torch.dtype, dkv_dtype: str) -> tuple[torch.dtype, torch.dtype]:
    """Wire dtypes of (dq, dk/dv) in backward.

    dq and unreplicated dk/dv are complete sums: one rounding to the input dtype.
    Replicated kv heads' dk/dv are partials summed after the exchange, so they
    travel in fp32 unless dkv_dtype == "input" (as the ring's dK/dV accumulators).
    """
    kv = torch.float32 if (split.replicated and dkv_dtype == "fp32") else dtype
    return dtype, kv


def encode_grads(dq, dk, dv, q_dt: torch.dtype, kv_dt: torch.dtype) -> torch.Tensor:
    """fp32 [S, a|n|n, D] grads -> one send buffer: [S, a+2n, D] (one dtype) or [S, bytes] uint8 rows."""
    a, n, d = dq.shape[1], dk.shape[1], dq.shape[2]
    if q_dt == kv_dt:
        buf = torch.empty((dq.shape[0], a + 2 * n, d), dtype=q_dt, device=dq.device)
        buf[:, :a].copy_(dq)
        buf[:, a:a + n].copy_(dk)
        buf[:, a + n:].copy_(dv)
        return buf
    s = dq.shape[0]
    return torch.cat((dq.to(q_dt).reshape(s, -1).view(torch.uint8),
                      torch.cat((dk, dv), 1).to(kv_dt).reshape(s, -1).view(torch.uint8)), 1)


def decode_grads(recv: torch.Tensor, a: int, n: int, d: int, q_dt: torch.dtype, kv_dt: torch.dtype):
    """Inverse of `encode_grads` on the received rows: ([R, a, D] in q_dt, [R, 2n, D] in kv_dt)."""
    if q_dt == kv_dt:
        return recv[:, :a], recv[:, a:]
    rows, bq = recv.shape[0], a * d * q_dt.itemsize
    return (recv[:, :bq].contiguous().view(q_dt).view(rows, a, d),
            recv[:, bq:].contiguous().view(kv_dt).view(rows, 2 * n, d))


def a2a_volume(sizes: Sequence[int], rank: int, split: HeadSplit, head_dim: int,
               dtype_bytes: int, dkv_dtype: str = "fp32") -> tuple[int, int]:
    """(forward, backward) all-to-all bytes sent by `rank` of a group with these token sizes."""
    mine, others = sizes[rank], sum(sizes) - sizes[rank]
    p = len(sizes)
    if p == 1:
        return 0, 0
    a, n = split.q_per, split.kv_per
    kv_b = 4 if (split.replicated and dkv_dtype == "fp32") else dtype_bytes
    fwd = (p - 1) * mine * (a + 2 * n) * head_dim * dtype_bytes + others * a * head_dim * dtype_bytes
    bwd = (p - 1) * mine * a * head_dim * dtype_bytes + others * (a * dtype_bytes + 2 * n * kv_b) * head_dim
    return fwd, bwd


def plan_by_doc(q_runs: Sequence[Run], k_runs: Sequence[Run], causal: bool) -> list[BlockCall]:
    """`plan_calls`, document by document: linear in the number of documents, not quadratic."""
    by_doc: dict[int, tuple[list[Run], list[Run]]] = {}
    for r in q_runs:
        by_doc.setdefault(r.doc, ([], []))[0].append(r)
    for r in k_runs:
        if r.doc in by_doc:
            by_doc[r.doc][1].append(r)
    calls: list[BlockCall] = []
    for qs, ks in by_doc.values():
        if ks:
            calls.extend(plan_calls(qs, ks, causal))
    return calls


# ----------------------------------------------------------------------------- autograd


class LocalInner:
    """Attention over the gathered sequence on this rank (Ulysses; USP with one ring rank)."""

    def __init__(self, calls: Sequence[BlockCall], scale: float):
        self.calls, self.scale = tuple(calls), scale

    def forward(self, qh, kh, vh):
        return block_forward(qh, kh, vh, self.calls, self.scale)

    def backward(self, dout_h, qh, kh, vh, out_h, lse):
        return block_backward(dout_h, qh, kh, vh, out_h, lse, self.calls, self.scale)


class _HeadParallelAttention(torch.autograd.Function):
    """sequence -> heads all-to-all, `inner` attention (fp32 out, lse), heads -> sequence.

    `plan` None skips both exchanges (a group of one). Backward: dout to heads,
    inner backward (fp32 dq/dk/dv), one exchange of dq/dk/dv back.
    """

    @staticmethod
    def forward(ctx, q, k, v, comm: Comm, plan: A2APlan | None, inner, dkv_dtype: str):
        with comm.ledger.tag("fwd"):
            if plan is None:
                qh, kh, vh = q, k, v
                keep = (q, k, v)
            else:
                s = plan.split
                send = to_heads([q, select_kv(k, s), select_kv(v, s)], s.parts)
                packed = comm.all_to_all(send, *plan.to_heads_splits)
                a, n = s.q_per, s.kv_per
                qh, kh, vh = packed[:, :a], packed[:, a:a + n], packed[:, a + n:]
                keep = (packed,)
            out_h, lse = inner.forward(qh, kh, vh)
            out_h = out_h.to(q.dtype)
            if plan is None:
                out = out_h
            else:
                recv = comm.all_to_all(out_h, *plan.to_seq_splits)
                out = from_heads(recv, plan.split.parts, [out_h.shape[1]])[0]
        ctx.save_for_backward(*keep, out_h, lse)
        ctx.comm, ctx.plan, ctx.inner, ctx.dkv_dtype = comm, plan, inner, dkv_dtype
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        comm, plan, inner = ctx.comm, ctx.plan, ctx.inner
        *keep, out_h, lse = ctx.saved_tensors
        q_dt, k_dt, v_dt = ctx.dtypes
        dout = dout.to(out_h.dtype).contiguous()
        with comm.ledger.tag("bwd"):
            if plan is None:
                q, k, v = keep
                dq, dk, dv = inner.backward(dout, q, k, v, out_h, lse)
                return dq.to(q_dt), dk.to(k_dt), dv.to(v_dt), None, None, None, None
            s = plan.split
            a, n, d = s.q_per, s.kv_per, out_h.shape[2]
            (packed,) = keep
            qh, kh, vh = packed[:, :a], packed[:, a:a + n], packed[:, a + n:]
            dout_h = comm.all_to_all(to_heads([dout], s.parts), *plan.to_heads_splits)
            dqh, dkh, dvh = inner.backward(dout_h, qh, kh, vh, out_h, lse)
            wq, wkv = wire_dtypes(s, packed.dtype, ctx.dkv_dtype)
            recv = comm.all_to_all(encode_grads(dqh, dkh, dvh, wq, wkv), *plan.to_seq_splits)
            rq, rkv = decode_grads(recv, a, n, d, wq, wkv)
            dq = from_heads(rq, s.parts, [a])[0]
            dk, dv = from_heads(rkv, s.parts, [n, n])
        return (dq.to(q_dt), fold_kv(dk, s, k_dt), fold_kv(dv, s, v_dt), None, None, None, None)


def head_parallel_attention(q, k, v, *, comm: Comm, plan: A2APlan | None, inner,
                            dkv_dtype: str = "fp32") -> torch.Tensor:
    check_shapes(q, k, v)
    if plan is not None and not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v travel in one message: dtypes must match, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    return _HeadParallelAttention.apply(q, k, v, comm, plan, inner, dkv_dtype)


def ulysses_attention(q, k, v, *, comm: Comm, peer_runs: Sequence[list[Run]], causal: bool = True,
                      softmax_scale: float | None = None, dkv_dtype: str = "fp32",
                      calls: Sequence[BlockCall] | None = None) -> torch.Tensor:
    """Ulysses over `comm`'s group; `peer_runs[j]` describes rank j's rows (sequence layout)."""
    check_shapes(q, k, v)
    if len(peer_runs) != comm.size:
        raise ValueError(f"peer_runs has {len(peer_runs)} entries for a group of {comm.size}")
    sizes = tuple(sum(r.length for r in runs) for runs in peer_runs)
    if q.shape[0] != sizes[comm.rank]:
        raise ValueError(f"rank {comm.rank} holds {q.shape[0]} tokens but the layout gives it "
                         f"{sizes[comm.rank]}")
    split = head_split(q.shape[1], k.shape[1], comm.size)
    if calls is None:
        runs = concat_runs(list(peer_runs))
        calls = plan_by_doc(runs, runs, causal)
    inner = LocalInner(calls, default_scale(q.shape[-1], softmax_scale))
    return head_parallel_attention(q, k, v, comm=comm, plan=A2APlan(split, sizes, comm.rank),
                                   inner=inner, dkv_dtype=dkv_dtype)


# ----------------------------------------------------------------------------- scheme

DKV_DTYPES = ("fp32", "input")


@register("ulysses")
@dataclass
class Ulysses(Scheme):
    """All-to-all head parallelism (DeepSpeed-Ulysses); every layout works, contiguous by default."""

    layout_name: str = "contiguous"
    dkv_dtype: str = "fp32"
    default_layout = "contiguous"

    def __post_init__(self):
        if self.layout_name not in LAYOUTS:
            raise ValueError(f"ulysses layout_name must be one of {sorted(LAYOUTS)}, "
                             f"got {self.layout_name!r}")
        if self.dkv_dtype not in DKV_DTYPES:
            raise ValueError(f"ulysses dkv_dtype must be one of {DKV_DTYPES}, got {self.dkv_dtype!r}")
        self._plans: dict = {}

    def validate(self, *, heads: int, kv_heads: int, world: int) -> None:
        super().validate(heads=heads, kv_heads=kv_heads, world=world)
        if heads % world:
            raise ValueError(f"ulysses needs heads % cp == 0: {heads} heads, cp={world}; "
                             f"{_way_out(heads, kv_heads, world)}")
        err = head_split_error(heads, kv_heads, world)
        if err is not None:
            raise ValueError(f"ulysses cannot split {kv_heads} kv heads for {heads} q heads over "
                             f"cp={world}: {err}; {_way_out(heads, kv_heads, world)}")

    def _calls(self, lay, causal: bool) -> tuple[BlockCall, ...]:
        key = (lay.n_tokens, lay.world, tuple(lay.cu_seqlens), bool(causal))
        calls = self._plans.get(key)
        if calls is None:
            runs = concat_runs([lay.runs(r) for r in range(lay.world)])
            calls = tuple(plan_by_doc(runs, runs, causal))
            if len(self._plans) >= 16:
                self._plans.clear()
            self._plans[key] = calls
        return calls

    def attention(self, q, k, v, *, group, cu_seqlens=None, causal=True, softmax_scale=None,
                  ledger=None, n_tokens=None):
        comm = make_comm(group, ledger)
        check_shapes(q, k, v)
        self.validate(heads=q.shape[1], kv_heads=k.shape[1], world=comm.size)
        n = total_tokens(q.shape[0], comm, n_tokens)
        lay = self.layout(n, comm.size, cu_seqlens)
        return ulysses_attention(q, k, v, comm=comm, peer_runs=[lay.runs(r) for r in range(comm.size)],
                                 causal=causal, softmax_scale=softmax_scale, dkv_dtype=self.dkv_dtype,
                                 calls=self._calls(lay, causal))

    def comm_bytes(self, shape: AttnShape, world: int, rank: int = 0) -> CommVolume:
        self.validate(heads=shape.heads, kv_heads=shape.kv_heads, world=world)
        split = head_split(shape.heads, shape.kv_heads, world)
        sizes = self.layout(shape.n_tokens, world, shape.cu_seqlens).sizes()
        fwd, bwd = a2a_volume(sizes, rank, split, shape.head_dim, shape.dtype_bytes, self.dkv_dtype)
        return CommVolume(fwd={"all_to_all": fwd}, bwd={"all_to_all": bwd})
