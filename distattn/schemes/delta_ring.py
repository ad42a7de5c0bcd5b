"""Delta-rule linear attention (GDN, KDA) on a ring, LASP-1 style: the baseline for `schemes.delta`.

Contiguous layout only: rank r holds the r-th piece of the sequence, so the state entering its first
run is the state rank r-1 leaves behind. States hop rank to rank with blocking `Comm.send` /
`Comm.recv`, W-1 serial hops each way, and every hop waits for the previous rank's kernel.

forward, rank r:
  1. runs that start their document here, from zero state (no dependency);
  2. receive P_r, the state rank r-1 leaves                                   (r > 0);
  3. the first run from P_r when it continues a document;
  4. send T_r, the state the last run leaves, as soon as it is known          (r < W-1).
backward, rank r (reverse direction):
  1. the kernel backward of every run except the last (no dependency), giving
     dP_r from the first run (zeros when it starts its document);
  2. receive G_r = d loss / d T_r from rank r+1                                (r < W-1);
  3. the last run's backward with its output gradient and G_r;
  4. send dP_r to rank r-1 as soon as it is known                             (r > 0).
Only a run that both continues from rank r-1 and reaches rank r+1 (one run spans the rank) chains the
hops through this rank's kernel; a document boundary inside a rank lets it send before it receives.
Ranks always pass a state on, even when a document ends exactly at the rank boundary (it is then not
used), so the traffic does not depend on the documents. The chain is acyclic (sends go one way,
receives come from the other), so blocking p2p cannot deadlock.

Traffic per rank (fp32 states, H heads): one d_k x d_v state per hop,
  forward   send  H * dk * dv * 4   on ranks 0 .. W-2
  backward  send  H * dk * dv * 4   on ranks 1 .. W-1
against LASP-2's (W-1) H (dk^2 + dk dv) 4 forward and (W-1) H dk dv 4 backward in one all-gather.
"""
from __future__ import annotations

from typing import Sequence

import torch

from distattn.comm import Comm
from distattn.layout import Run
from distattn.schemes.base import AttnShape, CommVolume
from distattn.schemes.delta import check_delta_inputs

F32 = torch.float32
STATE_BYTES = 4


def _sl(run: Run) -> slice:
    return slice(run.local_start, run.local_start + run.length)


def _run_inputs(tensors, sl: slice, grad: bool):
    return [t[sl].detach().to(F32).requires_grad_(grad) for t in tensors]


def _run_forward(xs, sl, init, chunk, want_final):
    """One run's output (and the state it leaves when `want_final`)."""
    from distattn.kernels.delta_backends import delta_rule
    res = delta_rule(*_run_inputs(xs, sl, False), initial_state=init, chunk_size=chunk,
                           output_final_state=want_final)
    return res if want_final else (res, None)


def _run_backward(xs, sl, init, dout, dfinal, chunk):
    """One run's five input gradients and d(initial state): with our kernel from its chunk factors
    built once; with fla's through autograd (recomputing its forward)."""
    from distattn.kernels.delta_backends import delta_rule, select_delta_kernel
    ins = _run_inputs(xs, sl, select_delta_kernel(dout.device) == "fla")
    if not ins[0].requires_grad:
        from distattn.kernels.delta import ChunkFactors, _scan
        f = ChunkFactors(*ins, chunk_size=chunk, keep_saved=True)
        states, _ = _scan(f.map_A, f.map_B, f.starts, init)
        *got, d_init = f.backward(dout, states, dfinal, ins[3])
        return got, (d_init if init is not None else None)
    p = init.detach().requires_grad_() if init is not None else None
    with torch.enable_grad():
        res = delta_rule(*ins, initial_state=p, chunk_size=chunk, output_final_state=dfinal is not None)
        outs, gouts = ((res[0], res[1]), (dout, dfinal)) if dfinal is not None else ((res,), (dout,))
        got = torch.autograd.grad(outs, ins + ([p] if p is not None else []), gouts)
    return got[:5], (got[5] if p is not None else None)


class _DeltaRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gate, beta, comm: Comm, runs: list[Run], chunk: int):
        W, r = comm.size, comm.rank
        h, dk, dv = q.shape[1], q.shape[2], v.shape[2]
        cont = runs[0].start > runs[0].doc_start  # the first run continues rank r-1's document
        late = 0 if cont else None  # the run that needs the received state
        n, send = len(runs), r < W - 1
        xs = (q, k, v, gate, beta)
        out = torch.empty((q.shape[0], h, dv), dtype=q.dtype, device=q.device)
        p = None
        with comm.ledger.tag("fwd"), torch.no_grad():
            for i, run in enumerate(runs):
                if i != late:
                    o, fin = _run_forward(xs, _sl(run), None, chunk, send and i == n - 1)
                    out[_sl(run)] = o.to(q.dtype)
                    if fin is not None:
                        comm.send(fin, r + 1)
            if r > 0:
                p = comm.recv(torch.empty((h, dk, dv), dtype=F32, device=q.device), r - 1)
            if late is not None:
                o, fin = _run_forward(xs, _sl(runs[0]), p, chunk, send and n == 1)
                out[_sl(runs[0])] = o.to(q.dtype)
                if fin is not None:
                    comm.send(fin, r + 1)
        ctx.save_for_backward(q, k, v, gate, beta, p if cont else q.new_zeros(0))
        ctx.comm, ctx.runs, ctx.chunk, ctx.cont = comm, runs, chunk, cont
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, gate, beta, p = ctx.saved_tensors
        comm, runs, chunk = ctx.comm, ctx.runs, ctx.chunk
        W, r = comm.size, comm.rank
        n, recv = len(runs), r < W - 1
        late = n - 1 if recv else None  # the run that needs the received gradient
        xs = (q, k, v, gate, beta)
        grads = [torch.zeros_like(t, dtype=F32) for t in xs]
        shape = (q.shape[1], q.shape[2], v.shape[2])

        def step(i, dfinal):
            sl = _sl(runs[i])
            init = p if (i == 0 and ctx.cont) else None
            got, d_init = _run_backward(xs, sl, init, dout[sl].to(F32), dfinal, chunk)
            for acc, d in zip(grads, got):
                acc[sl] += d
            if i == 0 and r > 0:  # the state gradient rank r-1 waits for
                dp = d_init if d_init is not None else torch.zeros(shape, dtype=F32, device=q.device)
                comm.send(dp, r - 1)

        with comm.ledger.tag("bwd"):
            for i in range(n):
                if i != late:
                    step(i, None)
            if recv:
                g = comm.recv(torch.empty(shape, dtype=F32, device=q.device), r + 1)
                step(late, g)
        return (*(g.to(t.dtype) for g, t in zip(grads, xs)), None, None, None)


def delta_ring_attention(q, k, v, gate, beta, *, comm: Comm, runs: Sequence[Run], rule: str = "gated_delta",
                         chunk: int | None = None) -> torch.Tensor:
    """Delta rule over `comm`'s group on a ring; `runs` are this rank's, in a contiguous layout."""
    check_delta_inputs(q, k, v, gate, beta, rule)
    runs = list(runs)
    if not runs:
        raise ValueError(f"rank {comm.rank} holds no tokens; the delta ring needs every rank to hold "
                         f"a piece of the sequence")
    for a, b in zip(runs, runs[1:]):
        if a.end != b.start or b.local_start != a.local_start + a.length:
            raise ValueError(f"delta ring needs a contiguous layout (rank r holds the r-th piece of "
                             f"the sequence), rank {comm.rank} has runs {a} then {b}; use lasp2")
    if q.shape[0] != sum(x.length for x in runs):
        raise ValueError(f"rank {comm.rank} holds {q.shape[0]} tokens but the layout gives it "
                         f"{sum(x.length for x in runs)}")
    return _DeltaRing.apply(q, k, v, gate, beta, comm, runs, chunk)


def delta_ring_comm_bytes(shape: AttnShape, world: int, rank: int, dv: int | None = None) -> CommVolume:
    """Bytes rank `rank` sends: one d_k x d_v state per hop, forward up the ring, backward down."""
    dk = shape.head_dim
    state = shape.heads * dk * (dk if dv is None else dv) * STATE_BYTES
    first, last = rank == 0, rank == world - 1
    fwd = {**({} if last else {"send": state}), **({} if first else {"recv": 0})}
    bwd = {**({} if first else {"send": state}), **({} if last else {"recv": 0})}
    return CommVolume(fwd=fwd, bwd=bwd)


__all__ = ["delta_ring_attention", "delta_ring_comm_bytes"]
