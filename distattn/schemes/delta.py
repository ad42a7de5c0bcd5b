"""Delta-rule linear attention (Gated DeltaNet, Kimi Delta Attention) across a CP group, LASP-2 style.

Per head the state S (d_k x d_v) follows S_t = M_t S_{t-1} + beta_t k_t v_t^T with a d_k x d_k
transition M_t (GDN: alpha_t (I - beta_t k_t k_t^T); KDA: (I - beta_t k_t k_t^T) Diag(alpha_t)). A
run of tokens (a contiguous range of one document, `distattn.layout.Run`) therefore maps the state
entering it affinely: S_out = A S_in + B, with A the product of its transitions and B the state it
reaches from zero (`distattn.kernels.delta.chunk_affine_map`). As in LASP-2 for decayed linear
attention, every rank computes (A, B) of its runs that a later run of the document needs and ONE
all-gather exchanges them; each rank composes the prefix P_u entering each of its runs,

    P_u = 0                        if u starts its document
    P_u = A_{u-1} P_{u-1} + B_{u-1}  otherwise (u-1: the previous run of the document, on any rank),

and runs the chunked kernel on its tokens from P_u. Any layout works: a zigzag rank's two chunks are
two runs, each with its own prefix.

Backward: the kernel gives each run's input gradients from its outputs and dP_u, the gradient of the
state entering it; ONE all-gather exchanges the dP_u, and an exclusive suffix over the document,
G_u = dP_{u+1} + A_{u+1}^T G_{u+1}, gives the gradient of the state each run leaves. It reaches the
run's inputs through its map: dA_u = G_u P_u^T, dB_u = G_u.

Traffic per rank (fp32 states, H heads):
  forward   all_gather  (W-1) * n_fwd * H * (d_k^2 + d_k d_v) * 4
  backward  all_gather  (W-1) * n_bwd * H * d_k d_v * 4
flat in N (n_fwd, n_bwd: the runs per rank that send, 1 for contiguous, 2 for zigzag, one document).
"""
from __future__ import annotations

from typing import Sequence

import torch

from distattn.comm import Comm
from distattn.layout import Run
from distattn.schemes.base import AttnShape, CommVolume
from distattn.schemes.lasp2 import Lasp2Plan

F32 = torch.float32
RULES = ("gated_delta", "kda")


def check_delta_inputs(q, k, v, gate, beta, rule: str) -> None:
    """Shapes of a delta-rule call: q, k [T, H, dk], v [T, H, dv], beta [T, H], gate [T, H] (GDN) or
    [T, H, dk] (KDA)."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}: the delta rules are {', '.join(RULES)} ('decay' is LASP-2's own)")
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"delta rule: q, k [T, H, dk] and v [T, H, dv] with the same T and H, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    want = q.shape[:2] if rule == "gated_delta" else q.shape
    if gate is None or tuple(gate.shape) != tuple(want):
        raise ValueError(f"rule={rule}: gate must be {list(want)} ({'a scalar per token and head' if rule == 'gated_delta' else 'one per key channel'}), "
                         f"got {None if gate is None else list(gate.shape)}")
    if beta is None or tuple(beta.shape) != tuple(q.shape[:2]):
        raise ValueError(f"delta rule: beta must be {list(q.shape[:2])}, got "
                         f"{None if beta is None else list(beta.shape)}")


class DeltaPlan(Lasp2Plan):
    """LASP-2's run bookkeeping with affine state maps instead of decays."""

    def map_prefixes(self, maps: torch.Tensor, dk: int) -> dict[int, torch.Tensor | None]:
        """State entering each local run (None: its document starts there). maps [W, n_fwd, H, dk, dk+dv]."""
        out: dict[int, torch.Tensor | None] = {}
        s = None
        for p, i, run, fs, _ in self.order:
            if run.start == run.doc_start:
                s = None
            if p == self.rank:
                out[i] = s
            if fs is not None:
                a, b = maps[p, fs, :, :, :dk], maps[p, fs, :, :, dk:]
                s = b if s is None else a @ s + b
        return out

    def map_suffixes(self, dstates: torch.Tensor, maps: torch.Tensor, dk: int) -> dict[int, torch.Tensor]:
        """Gradient of the state each local run leaves, for runs with a later run in the document.

        dstates [W, n_bwd, H, dk, dv]: every rank's d(incoming state) from its outputs.
        """
        out: dict[int, torch.Tensor] = {}
        want = set(self.my_fwd)
        g, prev_doc = None, None
        for p, i, run, fs, bs in reversed(self.order):
            if run.doc != prev_doc:
                g, prev_doc = None, run.doc
            if p == self.rank and i in want and g is not None:
                out[i] = g
            if bs is not None:  # the state entering this run: its outputs' gradient plus what flows on
                d = dstates[p, bs]
                if g is not None:
                    d = d + maps[p, fs, :, :, :dk].transpose(-1, -2) @ g
                g = d
        return out


def _sl(run: Run) -> slice:
    return slice(run.local_start, run.local_start + run.length)


def _run_inputs(tensors, sl: slice, grad: bool):
    return [t[sl].detach().to(F32).requires_grad_(grad) for t in tensors]


def _factors(tensors, run: Run, with_q: bool, chunk: int | None, keep_saved: bool = False):
    from distattn.kernels.delta import ChunkFactors
    q, k, v, g, b = _run_inputs(tensors, _sl(run), False)
    return ChunkFactors(q if with_q else None, k, v, g, b, chunk_size=chunk, keep_saved=keep_saved)


class _DeltaCP(torch.autograd.Function):
    """Each run's chunk factors are built once per pass and serve both its map and its outputs
    (forward), and both the state gradient it sends and its input gradients (backward). With
    flash-linear-attention's kernels (CUDA) the outputs and their gradients come from fla and the
    maps from ours, each run's map then differentiated through autograd."""

    @staticmethod
    def forward(ctx, q, k, v, gate, beta, comm: Comm, plan: DeltaPlan, chunk: int):
        from distattn.kernels.delta_backends import delta_rule, select_delta_kernel
        fla = select_delta_kernel(q.device) == "fla"
        h, dk, dv = q.shape[1], q.shape[2], v.shape[2]
        xs = (q, k, v, gate, beta)
        with comm.ledger.tag("fwd"), torch.no_grad():
            factors = {i: _factors(xs, run, not fla, chunk) for i, run in enumerate(plan.runs)
                       if not fla or i in plan.my_fwd}
            maps = None
            if plan.n_fwd:
                buf = torch.zeros((plan.n_fwd, h, dk, dk + dv), dtype=F32, device=q.device)
                for j, i in enumerate(plan.my_fwd):
                    a, b = factors[i].span_map()
                    buf[j, :, :, :dk], buf[j, :, :, dk:] = a, b
                maps = comm.all_gather(buf)
            prefix = plan.map_prefixes(maps, dk) if maps is not None else {i: None for i in range(len(plan.runs))}
            out = torch.empty((q.shape[0], h, dv), dtype=q.dtype, device=q.device)
            for i, run in enumerate(plan.runs):
                if fla:
                    o = delta_rule(*_run_inputs(xs, _sl(run), False), initial_state=prefix[i], chunk_size=chunk)
                else:
                    o = factors.pop(i).outputs(prefix[i])[0]
                out[_sl(run)] = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, gate, beta)
        ctx.comm, ctx.plan, ctx.chunk, ctx.maps, ctx.prefix, ctx.fla = comm, plan, chunk, maps, prefix, fla
        return out

    @staticmethod
    def backward(ctx, dout):
        xs = ctx.saved_tensors
        with ctx.comm.ledger.tag("bwd"):
            grads = (_backward_fla if ctx.fla else _backward)(ctx, xs, dout)
        return (*(g.to(t.dtype) for g, t in zip(grads, xs)), None, None, None)


def _gather_state_grads(ctx, xs, d_in: dict) -> dict[int, torch.Tensor]:
    """ONE all-gather of the entering states' gradients; the gradient of the state each run leaves."""
    q, v, plan = xs[0], xs[2], ctx.plan
    if not plan.n_bwd:
        return {}
    buf = torch.zeros((plan.n_bwd, q.shape[1], q.shape[2], v.shape[2]), dtype=F32, device=q.device)
    for j, i in enumerate(plan.my_bwd):
        buf[j] = d_in[i]
    return plan.map_suffixes(ctx.comm.all_gather(buf), ctx.maps, q.shape[2])


def _backward(ctx, xs, dout):
    """Our kernel: factors once per run, the outputs' state gradient sent, then one backward per run
    with the gradient of the state it leaves (which also reaches its inputs through its map)."""
    from distattn.kernels.delta import _scan
    plan, prefix = ctx.plan, ctx.prefix
    grads = [torch.zeros_like(t, dtype=F32) for t in xs]
    factors = {i: _factors(xs, run, True, ctx.chunk, keep_saved=True) for i, run in enumerate(plan.runs)}
    d_in = {i: factors[i].state_grad(dout[_sl(plan.runs[i])]) for i in plan.my_bwd}
    g_out = _gather_state_grads(ctx, xs, d_in)
    for i, run in enumerate(plan.runs):
        sl, f = _sl(run), factors.pop(i)
        states, _ = _scan(f.map_A, f.map_B, f.starts, prefix[i])
        got = f.backward(dout[sl], states, g_out.get(i), xs[3][sl])
        for g, d in zip(grads, got[:5]):
            g[sl] += d
    return grads


def _backward_fla(ctx, xs, dout):
    """fla's kernel: each run's backward from its outputs, then its map's through autograd."""
    from distattn.kernels.delta import chunk_affine_map
    from distattn.kernels.delta_backends import delta_rule
    plan, prefix = ctx.plan, ctx.prefix
    grads = [torch.zeros_like(t, dtype=F32) for t in xs]
    d_in: dict[int, torch.Tensor] = {}
    for i, run in enumerate(plan.runs):
        sl = _sl(run)
        ins = _run_inputs(xs, sl, True)
        p = prefix[i].detach().requires_grad_() if prefix[i] is not None else None
        with torch.enable_grad():
            o = delta_rule(*ins, initial_state=p, chunk_size=ctx.chunk)
            got = torch.autograd.grad(o, ins + ([p] if p is not None else []), dout[sl].to(F32))
        for g, d in zip(grads, got[:5]):
            g[sl] += d
        if p is not None:
            d_in[i] = got[5]
    for i, g_out in _gather_state_grads(ctx, xs, d_in).items():
        sl = _sl(plan.runs[i])  # the state this run leaves: through its map to its inputs
        kk, vv, gg, bb = _run_inputs(xs[1:], sl, True)
        with torch.enable_grad():
            a, b = chunk_affine_map(kk, gg, bb, vv)
            p = prefix[i]
            da = g_out @ p.transpose(-1, -2) if p is not None else torch.zeros_like(a)
            got = torch.autograd.grad((a, b), (kk, vv, gg, bb), (da, g_out), allow_unused=True)
        for idx, d in zip((1, 2, 3, 4), got):
            if d is not None:
                grads[idx][sl] += d
    return grads


def delta_attention(q, k, v, gate, beta, *, comm: Comm, peer_runs: Sequence[list[Run]],
                    cu_seqlens: Sequence[int], rule: str = "gated_delta", chunk: int | None = None) -> torch.Tensor:
    """Delta-rule linear attention over `comm`'s group; `peer_runs[j]` describes rank j's rows."""
    check_delta_inputs(q, k, v, gate, beta, rule)
    if len(peer_runs) != comm.size:
        raise ValueError(f"peer_runs has {len(peer_runs)} entries for a group of {comm.size}")
    mine = sum(r.length for r in peer_runs[comm.rank])
    if q.shape[0] != mine:
        raise ValueError(f"rank {comm.rank} holds {q.shape[0]} tokens but the layout gives it {mine}")
    plan = DeltaPlan(comm.rank, peer_runs, cu_seqlens)
    return _DeltaCP.apply(q, k, v, gate, beta, comm, plan, chunk)


def delta_comm_bytes(n_fwd: int, n_bwd: int, shape: AttnShape, world: int, dv: int | None = None) -> CommVolume:
    """Bytes a rank sends: its runs' (A, B) forward, their d(incoming state) backward."""
    dk = shape.head_dim
    dv = dk if dv is None else dv
    fwd = {"all_gather": (world - 1) * n_fwd * shape.heads * (dk * dk + dk * dv) * 4} if n_fwd else {}
    bwd = {"all_gather": (world - 1) * n_bwd * shape.heads * dk * dv * 4} if n_bwd else {}
    return CommVolume(fwd=fwd, bwd=bwd)


__all__ = ["DeltaPlan", "RULES", "check_delta_inputs", "delta_attention", "delta_comm_bytes"]
