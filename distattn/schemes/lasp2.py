"""LASP-2: exact causal linear attention across a CP group with one all-gather each way.

Every run of a rank's buffer (a contiguous range of one document, see
`distattn.layout.Run`) is a chunk. With M_u the state run u leaves behind from
zero state, M_u = sum_j lam^(L_u-1-j) k_j^T v_j, and runs ordered by global start,
the state entering run u is

    P_u = 0                              if u starts its document
    P_u = lam^(L_{u-1}) P_{u-1} + M_{u-1} otherwise (u-1: the previous run of the document)

Runs of a document abut across ranks (every layout tiles the sequence), so this
is a weighted exclusive prefix over the document's earlier runs, whichever rank
holds them. That makes the scheme correct for any layout: contiguous, zigzag (a
rank holds two chunks, each with its own prefix), doc_zigzag and weighted; a
hybrid model can keep one token layout for its softmax and linear layers.

Forward, on every rank:
  1. M_u for each local run that has a later run in its document, packed into a
     fixed [n_fwd, A, dk, dv] fp32 buffer (n_fwd = the largest such count over
     ranks, known from the layout; unused slots are zero);
  2. post ONE async all_gather of that buffer;
  3. compute every run's output from zero state (intra-block masked matmuls and
     the running block state) while the gather travels;
  4. wait, run the prefix scan over all ranks' runs, add (Q * lam^(j+1)) P_u.
Backward mirrors it: dP_u = sum (Q * lam^(j+1))^T dO over every run that does not
start its document goes out in ONE async all_gather while the local backward
runs, then an exclusive suffix G_u = dP_{u+1} + lam^(L_{u+1}) G_{u+1} gives each
run the gradient of the state it leaves, and dK += (V G^T) * lam^(L-1-j),
dV += (K * lam^(L-1-j)) G, dQ += (dO P^T) * lam^(j+1).

Traffic per rank (A = state heads: KV heads, or query heads when the decay
differs inside a GQA group; states are fp32):
  forward   all_gather  (W-1) * n_fwd * A * dk * dv * 4
  backward  all_gather  (W-1) * n_bwd * A * dk * dv * 4
independent of N. One document: contiguous gives n_fwd = n_bwd = 1, so
2 (W-1) A dk dv 4 bytes per rank per layer; zigzag gives 2 slots each way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from distattn.comm import Comm, CommLedger
from distattn.kernels.linear import (DEFAULT_BLOCK, F32, HeadPlan, apply_state, apply_state_grad_q,
                                     check_block, check_feature_map, check_linear_shapes,
                                     chunk_backward, chunk_forward, feature_map_backward, group_inputs,
                                     group_q, linear_attention_local, plan_heads, run_state,
                                     run_state_backward, state_grad, ungroup_kv, ungroup_q)
from distattn.layout import LAYOUTS, Run
from distattn.schemes.base import (AttnShape, CommVolume, Scheme, group_rank_size, make_comm,
                                   register, total_tokens)

STATE_BYTES = 4  # states travel in fp32


class LinearScheme(Scheme):
    """Base of the linear-attention schemes: `linear_attention` instead of `attention`."""

    kind = "linear"

    def attention(self, q, k, v, *, group=None, cu_seqlens=None, causal=True, softmax_scale=None,
                  ledger=None, n_tokens=None):
        raise ValueError(f"scheme {self.name!r} computes linear attention; call "
                         f"distattn.linear_attention (softmax layers need a softmax scheme such as "
                         f"ring or allgather)")

    def linear_attention(self, q, k, v, *, group=None, cu_seqlens=None, decay=None,
                         feature_map: str | None = None, ledger: CommLedger | None = None,
                         n_tokens: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def validate(self, *, heads: int, kv_heads: int, world: int) -> None:
        if heads < 1 or kv_heads < 1:
            raise ValueError(f"{self.name} needs at least one head: {heads} heads, {kv_heads} kv heads")
        super().validate(heads=heads, kv_heads=kv_heads, world=world)

    @staticmethod
    def state_heads(heads: int, kv_heads: int, decay=None) -> int:
        """A: heads of the d_k x d_v states that travel (KV heads unless the decay forbids it)."""
        return plan_heads(heads, kv_heads, decay).groups

    def _prepare(self, q, k, v, group, ledger, n_tokens, cu_seqlens, decay, feature_map):
        check_linear_shapes(q, k, v)
        comm = make_comm(group, ledger)
        self.validate(heads=q.shape[1], kv_heads=k.shape[1], world=comm.size)
        fmap = check_feature_map(feature_map)
        heads = plan_heads(q.shape[1], k.shape[1], decay)
        n = total_tokens(q.shape[0], comm, n_tokens)
        lay = self.layout(n, comm.size, cu_seqlens)
        mine = lay.size(comm.rank)
        if q.shape[0] != mine:
            raise ValueError(f"rank {comm.rank} holds {q.shape[0]} tokens but the {lay.name} layout "
                             f"of {n} tokens gives it {mine}; shard inputs with distattn.shard")
        return comm, lay, heads, fmap


def _check_layout_name(scheme: str, name: str) -> None:
    if name not in LAYOUTS:
        raise ValueError(f"{scheme} layout_name must be one of {sorted(LAYOUTS)}, got {name!r}")


# ----------------------------------------------------------------------------- plan


class Lasp2Plan:
    """Which runs send a state (forward) or a state gradient (backward), and the scans over them."""

    def __init__(self, rank: int, peer_runs: Sequence[list[Run]], cu_seqlens: Sequence[int]):
        self.rank = rank
        self.world = len(peer_runs)
        self.runs = list(peer_runs[rank])
        doc_end = {d: cu_seqlens[d + 1] for d in range(len(cu_seqlens) - 1)}
        # forward slots: runs whose state a later run of the document needs
        self.fwd_slots = [[i for i, r in enumerate(runs) if r.end < doc_end[r.doc]] for runs in peer_runs]
        # backward slots: runs that do not start their document (their incoming state matters)
        self.bwd_slots = [[i for i, r in enumerate(runs) if r.start > r.doc_start] for runs in peer_runs]
        self.n_fwd = max(len(s) for s in self.fwd_slots)
        self.n_bwd = max(len(s) for s in self.bwd_slots)
        fslot = {(p, i): j for p, s in enumerate(self.fwd_slots) for j, i in enumerate(s)}
        bslot = {(p, i): j for p, s in enumerate(self.bwd_slots) for j, i in enumerate(s)}
        # every run of the documents this rank needs, in global order
        need = {r.doc for r in self.runs}
        order = sorted(((r.start, p, i, r) for p, runs in enumerate(peer_runs)
                        for i, r in enumerate(runs) if r.doc in need), key=lambda e: e[0])
        self.order = [(p, i, r, fslot.get((p, i)), bslot.get((p, i))) for _, p, i, r in order]
        for (_, _, a, _, _), (_, _, b, _, _) in zip(self.order, self.order[1:]):
            if a.doc == b.doc and a.end != b.start:  # pragma: no cover - layouts tile the sequence
                raise RuntimeError(f"runs of document {a.doc} do not abut: {a} then {b}")

    @property
    def my_fwd(self) -> list[int]:
        return self.fwd_slots[self.rank]

    @property
    def my_bwd(self) -> list[int]:
        return self.bwd_slots[self.rank]

    def prefixes(self, states: torch.Tensor, loglam) -> dict[int, torch.Tensor]:
        """State entering each local run that does not start its document.

        states [W, n_fwd, A, dk, dv]: every rank's packed run states.
        """
        out: dict[int, torch.Tensor] = {}
        want = set(self.my_bwd)
        s = None
        for p, i, run, fs, _ in self.order:
            if run.start == run.doc_start:
                s = None
            if p == self.rank and i in want:
                out[i] = s
            if fs is not None:
                m = states[p, fs]
                s = m if s is None else _decayed(s, loglam, run.length) + m
        return out

    def suffixes(self, dstates: torch.Tensor, loglam) -> dict[int, torch.Tensor]:
        """Gradient of the state each local run leaves, for runs with a later run in the document.

        dstates [W, n_bwd, A, dk, dv]: every rank's packed d(incoming state).
        """
        out: dict[int, torch.Tensor] = {}
        want = set(self.my_fwd)
        g = None
        prev_doc = None
        for p, i, run, _, bs in reversed(self.order):
            if run.doc != prev_doc:
                g, prev_doc = None, run.doc
            if p == self.rank and i in want:
                out[i] = g
            if bs is not None:
                dm = dstates[p, bs]
                g = dm if g is None else _decayed(g, loglam, run.length) + dm
        return out


def _decayed(s: torch.Tensor, loglam, n: int) -> torch.Tensor:
    if loglam is None:
        return s
    return s * torch.exp(loglam * float(n)).view(-1, 1, 1)


def _sl(run: Run) -> slice:
    return slice(run.local_start, run.local_start + run.length)


# ----------------------------------------------------------------------------- autograd


class _Lasp2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, comm: Comm, plan: Lasp2Plan, heads: HeadPlan, fmap: str, block: int):
        loglam = heads.loglam(q.device)
        with comm.ledger.tag("fwd"):
            qg, kg, vg = group_inputs(q, k, v, heads, fmap)
            a, dk, dv = heads.groups, qg.shape[-1], vg.shape[-1]
            pending = None
            if plan.n_fwd:
                buf = torch.zeros((plan.n_fwd, a, dk, dv), dtype=F32, device=q.device)
                for j, i in enumerate(plan.my_fwd):
                    sl = _sl(plan.runs[i])
                    buf[j] = run_state(kg[:, :, sl], vg[:, :, sl], loglam)
                pending = comm.all_gather(buf, async_op=True)  # travels during the local work
            og = chunk_forward(qg, kg, vg, plan.runs, loglam, block)
            prefix: dict[int, torch.Tensor] = {}
            if pending is not None:
                prefix = plan.prefixes(pending.wait(), loglam)
                for i, s in prefix.items():
                    sl = _sl(plan.runs[i])
                    og[:, :, sl] += apply_state(qg[:, :, sl], s, loglam)
        out = ungroup_q(og, q.dtype)
        keys = sorted(prefix)
        saved = torch.stack([prefix[i] for i in keys]) if keys else q.new_zeros(0)
        ctx.save_for_backward(q, k, v, saved)
        ctx.comm, ctx.plan, ctx.heads, ctx.fmap, ctx.block, ctx.keys = comm, plan, heads, fmap, block, keys
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, saved = ctx.saved_tensors
        comm, plan, heads, fmap = ctx.comm, ctx.plan, ctx.heads, ctx.fmap
        loglam = heads.loglam(q.device)
        with comm.ledger.tag("bwd"):
            qg, kg, vg = group_inputs(q, k, v, heads, fmap)
            dog = group_q(dout, heads)
            a, dkd, dvd = heads.groups, qg.shape[-1], vg.shape[-1]
            pending = None
            if plan.n_bwd:
                buf = torch.zeros((plan.n_bwd, a, dkd, dvd), dtype=F32, device=q.device)
                for j, i in enumerate(plan.my_bwd):
                    sl = _sl(plan.runs[i])
                    buf[j] = state_grad(qg[:, :, sl], dog[:, :, sl], loglam)
                pending = comm.all_gather(buf, async_op=True)
            dq, dk, dv = chunk_backward(qg, kg, vg, dog, plan.runs, loglam, ctx.block)
            for n, i in enumerate(ctx.keys):  # needs only the saved prefix: still overlapped
                sl = _sl(plan.runs[i])
                dq[:, :, sl] += apply_state_grad_q(dog[:, :, sl], saved[n], loglam)
            if pending is not None:
                for i, g in plan.suffixes(pending.wait(), loglam).items():
                    sl = _sl(plan.runs[i])
                    gk, gv = run_state_backward(kg[:, :, sl], vg[:, :, sl], g, loglam)
                    dk[:, :, sl] += gk
                    dv[:, :, sl] += gv
        dq = feature_map_backward(q, ungroup_q(dq, F32), fmap)
        dk = feature_map_backward(k, ungroup_kv(dk, heads), fmap)
        dv = ungroup_kv(dv, heads)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def lasp2_attention(q, k, v, *, comm: Comm, peer_runs: Sequence[list[Run]], cu_seqlens: Sequence[int],
                    decay=None, feature_map: str | None = None, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """LASP-2 over `comm`'s group; `peer_runs[j]` describes rank j's rows."""
    check_linear_shapes(q, k, v)
    check_block(block)
    if len(peer_runs) != comm.size:
        raise ValueError(f"peer_runs has {len(peer_runs)} entries for a group of {comm.size}")
    mine = sum(r.length for r in peer_runs[comm.rank])
    if q.shape[0] != mine:
        raise ValueError(f"rank {comm.rank} holds {q.shape[0]} tokens but the layout gives it {mine}")
    heads = plan_heads(q.shape[1], k.shape[1], decay)
    plan = Lasp2Plan(comm.rank, peer_runs, cu_seqlens)
    return _Lasp2.apply(q, k, v, comm, plan, heads, check_feature_map(feature_map), block)


# ----------------------------------------------------------------------------- schemes


@register("lasp2")
@dataclass
class Lasp2(LinearScheme):
    """LASP-2 linear attention: one all-gather of fixed-size states per direction."""

    layout_name: str = "contiguous"
    block: int = DEFAULT_BLOCK

    def __post_init__(self):
        _check_layout_name("lasp2", self.layout_name)
        check_block(self.block)

    def linear_attention(self, q, k, v, *, group=None, cu_seqlens=None, decay=None, feature_map=None,
                         ledger=None, n_tokens=None, rule: str = "decay", gate=None, beta=None):
        if rule != "decay":  # the delta rule: affine state maps instead of decayed states
            from distattn.schemes.delta import check_delta_inputs, delta_attention
            check_delta_inputs(q, k, v, gate, beta, rule)
            comm, lay, _, _ = self._prepare(q, k, v, group, ledger, n_tokens, cu_seqlens, None, None)
            return delta_attention(q, k, v, gate, beta, comm=comm,
                                   peer_runs=[lay.runs(r) for r in range(comm.size)],
                                   cu_seqlens=lay.cu_seqlens, rule=rule)
        comm, lay, _, fmap = self._prepare(q, k, v, group, ledger, n_tokens, cu_seqlens, decay,
                                           feature_map)
        return lasp2_attention(q, k, v, comm=comm, peer_runs=[lay.runs(r) for r in range(comm.size)],
                               cu_seqlens=lay.cu_seqlens, decay=decay, feature_map=fmap,
                               block=self.block)

    def slots(self, n_tokens: int, world: int, cu_seqlens=None) -> tuple[int, int]:
        """(n_fwd, n_bwd): state slots every rank contributes to the forward / backward gather."""
        lay = self.layout(n_tokens, world, cu_seqlens)
        plan = Lasp2Plan(0, [lay.runs(r) for r in range(world)], lay.cu_seqlens)
        return plan.n_fwd, plan.n_bwd

    def comm_bytes(self, shape: AttnShape, world: int, rank: int = 0, decay=None,
                   rule: str = "decay") -> CommVolume:
        """Bytes sent per rank; pass the call's `decay` (it decides the state heads A) or its delta `rule`."""
        self.validate(heads=shape.heads, kv_heads=shape.kv_heads, world=world)
        n_fwd, n_bwd = self.slots(shape.n_tokens, world, shape.cu_seqlens)
        if rule != "decay":
            from distattn.schemes.delta import delta_comm_bytes
            return delta_comm_bytes(n_fwd, n_bwd, shape, world)
        state = self.state_heads(shape.heads, shape.kv_heads, decay) * shape.head_dim ** 2 * STATE_BYTES
        fwd = {"all_gather": (world - 1) * n_fwd * state} if n_fwd else {}
        bwd = {"all_gather": (world - 1) * n_bwd * state} if n_bwd else {}
        return CommVolume(fwd=fwd, bwd=bwd)


@dataclass
class LinearLocal(LinearScheme):
    """Linear attention without context parallelism (`linear_attention(..., scheme="local")`).

    Not in the registry: the registered "local" is the softmax scheme of the
    same role; `distattn.linear_attention` maps "local" here.
    """

    layout_name: str = "contiguous"
    block: int = DEFAULT_BLOCK
    name = "local"

    def __post_init__(self):
        _check_layout_name("local", self.layout_name)
        check_block(self.block)

    def validate(self, *, heads, kv_heads, world):
        super().validate(heads=heads, kv_heads=kv_heads, world=world)
        if world != 1:
            raise ValueError(f"linear scheme 'local' runs without context parallelism, but cp={world}; "
                             f"use lasp2 (or lasp1)")

    def linear_attention(self, q, k, v, *, group=None, cu_seqlens=None, decay=None, feature_map=None,
                         ledger=None, n_tokens=None, rule: str = "decay", gate=None, beta=None):
        _, world = group_rank_size(group)
        if rule != "decay":
            from distattn.kernels.delta_backends import delta_rule
            from distattn.schemes.delta import check_delta_inputs
            check_delta_inputs(q, k, v, gate, beta, rule)
            self.validate(heads=q.shape[1], kv_heads=k.shape[1], world=world)
            return delta_rule(q, k, v, gate, beta, cu_seqlens=cu_seqlens)
        check_linear_shapes(q, k, v)
        self.validate(heads=q.shape[1], kv_heads=k.shape[1], world=world)
        return linear_attention_local(q, k, v, cu_seqlens=cu_seqlens, decay=decay,
                                      feature_map=feature_map, block=self.block)

    def comm_bytes(self, shape: AttnShape, world: int, rank: int = 0, decay=None) -> CommVolume:
        return CommVolume()
