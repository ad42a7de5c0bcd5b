"""Chunked delta-rule linear attention (Gated DeltaNet, Kimi Delta Attention), exact.

The recurrence, per head (S is d_k x d_v; feature maps, normalisation and scale
are the caller's):

    GDN (scalar gate a_t):        S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T
    KDA (per-channel gate a_t):   S_t = (I - b_t k_t k_t^T) Diag(a_t) S_{t-1} + b_t k_t v_t^T
    output:                       o_t = S_t^T q_t

A scalar gate commutes with the Householder-like factor, so GDN is KDA with the
gate broadcast over key channels; one code path serves both, keeping the gate's
last dimension as 1 (GDN) or d_k (KDA) so GDN pays no per-channel cost.

WY representation. Inside a chunk of C tokens entering with state S0, write
S_t = Diag(a_t) S_{t-1} + k_t u_t^T. With G_i the cumulative log-gate from the
chunk start and A[i, j] = b_i sum_c k_i[c] k_j[c] exp(G_i[c] - G_j[c]) (j < i),
the rows u_i solve the unit lower-triangular system

    (I + A) U = diag(b) V - diag(b) (exp(G) * K) S0,   i.e.  U = U~ - W S0,

so U~ = (I + A)^-1 diag(b) V and W = (I + A)^-1 diag(b) (exp(G) * K) are the WY
factors. With P[i, j] = sum_c q_i[c] k_j[c] exp(G_i[c] - G_j[c]) (j <= i), the
chunk's outputs and end state are

    O = P U~ + Qe S0,  Qe = exp(G) * Q - P W
    S_C = A_n S0 + B_n,  A_n = Diag(exp(G_C)) - K^^T W,  B_n = K^^T U~,

with K^_j = exp(G_C - G_j) * k_j. Every exponent is a difference G_i - G_j
with j <= i (or G_i itself), hence <= 0: nothing overflows for gates in (0, 1]
and long decays underflow to 0. The pairwise decays are a [C, C] matrix for GDN
and a [C, C, d_k] tensor for KDA (built for a bounded number of chunks at a
time). Cost per head: O(T C d) for the chunk-local part (all chunks batched) and
O(T d^2) for the sequential scan S <- A_n S + B_n, which is the only loop over
chunks. Internals are fp32 (fp64 when an input is fp64).

Documents. Chunks never cross a `cu_seqlens` boundary: each document is cut into
chunks of `chunk_size` plus a shorter tail, padded with identity tokens (k = q =
v = 0, b = 0, gate = 1) so all chunks share one shape. The state restarts at
zero at every document start. `initial_state` is the state entering token 0 (the
first document only); the final state is the state after token T - 1 (the last
document). This is what a context-parallel rank needs: its first document may
continue from the previous rank and its last may continue on the next.

Backward. `chunk_delta_rule` is an autograd.Function with a hand-written
backward: it recomputes the chunk-local factors, sweeps the chunks in reverse
carrying dS explicitly (dS_n = Qe_n^T dO_n + A_n^T dS_{n+1}), then differentiates
the triangular solve, the pairwise decays and the cumulative log-gates by hand,
batched over chunks. It accepts a gradient for the final state and returns one
for `initial_state`. `chunk_affine_map` returns a span's map S_out = A S_in + B
and is differentiated by autograd.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from distattn.layout import as_cu_seqlens

__all__ = ["delta_rule_reference", "chunk_delta_rule", "chunk_affine_map", "ChunkFactors"]

# Chunks are processed in groups whose pairwise tensors hold about _PAIR_BUDGET elements (1 MiB in
# fp32): large enough to amortise per-op overhead, small enough to stay in cache and below the
# allocator's mmap threshold (tensors of tens of MiB are mapped and page-faulted afresh on every
# op, which made the kernel 3x slower per token at 16K tokens than at 4K). The backward keeps every
# group's intermediates from its first pass while they total at most _KEEP_BUDGET pair elements.
_PAIR_BUDGET = 1 << 18
_KEEP_BUDGET = 1 << 24


def default_chunk(gate: Tensor) -> int:
    """Chunk size when the caller gives none: the pairwise decays cost C per token for GDN and C * d_k
    for KDA, the scan d_k^3 / C, so KDA wants shorter chunks (measured fwd + bwd, 4K tokens, 8 x 64
    heads, one thread: GDN 1.29 / 0.54 / 0.62 s at C = 16 / 32 / 64, KDA 2.9 / 5.4 / 10.3 s)."""
    return 32 if gate.dim() == 2 else 16


def _check(q, k, v, gate, beta, initial_state) -> None:
    """Refuse mismatched shapes with the numbers, before any math runs."""
    if k.dim() != 3 or v.dim() != 3 or (q is not None and q.shape != k.shape):
        qs = None if q is None else tuple(q.shape)
        raise ValueError(f"q, k must be [T, H, d_k] and v [T, H, d_v]; got q {qs}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    T, H, dk = k.shape
    if v.shape[:2] != (T, H):
        raise ValueError(f"v must be [{T}, {H}, d_v], got {tuple(v.shape)}")
    if tuple(gate.shape) not in ((T, H), (T, H, dk)):
        raise ValueError(f"gate must be [{T}, {H}] (GDN) or [{T}, {H}, {dk}] (KDA), "
                         f"got {tuple(gate.shape)}")
    if tuple(beta.shape) != (T, H):
        raise ValueError(f"beta must be [{T}, {H}], got {tuple(beta.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (H, dk, v.shape[-1]):
        raise ValueError(f"initial_state must be [{H}, {dk}, {v.shape[-1]}], "
                         f"got {tuple(initial_state.shape)}")


def delta_rule_reference(q: Tensor, k: Tensor, v: Tensor, gate: Tensor, beta: Tensor,
                         cu_seqlens: Sequence[int] | Tensor | None = None,
                         initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Token-by-token recurrence in the input dtype: the ground truth for tests.

    Returns (o [T, H, d_v], final_state [H, d_k, d_v]); `initial_state` enters
    token 0, the final state is the one after token T - 1.
    """
    _check(q, k, v, gate, beta, initial_state)
    T, H, dk = k.shape
    starts = set(as_cu_seqlens(cu_seqlens, T)[:-1])
    zero = k.new_zeros(H, dk, v.shape[-1])
    S = zero if initial_state is None else initial_state.to(k.dtype)
    per_channel = gate.dim() == 3
    outs = []
    for t in range(T):
        if t in starts and t > 0:
            S = zero
        a = gate[t][:, :, None] if per_channel else gate[t][:, None, None]
        S = a * S
        kt, bt = k[t], beta[t][:, None]
        S = S + kt[:, :, None] * (bt * (v[t] - torch.einsum("hk,hkv->hv", kt, S)))[:, None, :]
        outs.append(torch.einsum("hk,hkv->hv", q[t], S))
    return torch.stack(outs), S


# ---- chunk layout -------------------------------------------------------------------------

def _chunk_index(cu: list[int], C: int, device) -> tuple[Tensor, list[bool]]:
    """[N, C] token index per chunk (T marks padding) and whether each chunk starts a document."""
    rows, starts = [], []
    T = cu[-1]
    for s, e in zip(cu[:-1], cu[1:]):
        for c in range(s, e, C):
            rows.append([i if i < e else T for i in range(c, c + C)])
            starts.append(c == s)
    return torch.tensor(rows, dtype=torch.long, device=device), starts


def _gather(x: Tensor, idx: Tensor, fill: float) -> Tensor:
    """[T, H, ...] -> [N, H, C, ...] with padding rows set to `fill`."""
    pad = torch.full_like(x[:1], fill)
    y = torch.cat([x, pad])[idx]  # [N, C, H, ...]
    return y.transpose(1, 2)


def _scatter(y: Tensor, idx: Tensor, T: int) -> Tensor:
    """Inverse of `_gather`: [N, H, C, ...] -> [T, H, ...], dropping padding."""
    flat = y.transpose(1, 2).flatten(0, 1)  # [N * C, H, ...]
    out = flat.new_zeros(T + 1, *flat.shape[1:])
    out.index_add_(0, idx.reshape(-1), flat)
    return out[:T]


def _sum_to(x: Tensor, like: Tensor) -> Tensor:
    """Reduce a per-channel gradient to the gate's last dimension (1 for GDN)."""
    return x.sum(-1, keepdim=True) if like.shape[-1] == 1 and x.shape[-1] != 1 else x


def _groups(n: int, per_chunk: int):
    step = max(1, _PAIR_BUDGET // max(1, per_chunk))
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


# ---- pairwise decayed products ------------------------------------------------------------

def _decay(G: Tensor, strict: bool) -> Tensor:
    """exp(G_i - G_j) for j < i (strict) or j <= i, else 0: [.., C, C] or [.., C, C, d_k]."""
    C = G.shape[-2]
    keep = torch.ones(C, C, dtype=torch.bool, device=G.device).tril(-1 if strict else 0)
    diff = G.unsqueeze(-2) - G.unsqueeze(-3)  # [.., i, j, c]
    if G.shape[-1] == 1:
        return torch.exp(diff[..., 0].masked_fill(~keep, float("-inf")))
    return torch.exp(diff.masked_fill(~keep[..., None], float("-inf")))


def _decay_dot(x: Tensor, y: Tensor, E: Tensor) -> Tensor:
    """M[i, j] = sum_c x_i[c] y_j[c] E[i, j(, c)]."""
    if E.dim() == x.dim():
        return (x @ y.transpose(-1, -2)) * E
    return torch.einsum("...ic,...jc,...ijc->...ij", x, y, E)


def _decay_dot_bwd(dM: Tensor, x: Tensor, y: Tensor, E: Tensor, G: Tensor):
    """Gradients of `_decay_dot` for x, y and G (dG_i = x_i dx_i - y_i dy_i per channel)."""
    if E.dim() == x.dim():
        D = dM * E
        dx, dy = D @ y, D.transpose(-1, -2) @ x
    else:
        D = dM.unsqueeze(-1) * E
        dx = torch.einsum("...ijc,...jc->...ic", D, y)
        dy = torch.einsum("...ijc,...ic->...jc", D, x)
    return dx, dy, _sum_to(x * dx - y * dy, G)


# ---- chunk-local forward / backward -------------------------------------------------------

def _local(q, k, v, g, b):
    """Chunk-local WY factors for chunks [n, H, C, ...]; q=None skips the output terms.

    Returns (map_A, map_B, Qe, Oi, saved): S_out = map_A S0 + map_B and
    O = Oi + Qe S0; `saved` feeds `_local_bwd`.
    """
    G = g.cumsum(-2)
    eG, GC = torch.exp(G), G[..., -1:, :]
    Kt, Kh = k * eG, k * torch.exp(GC - G)
    bb = b.unsqueeze(-1)
    Ekk = _decay(G, strict=True)
    L = torch.eye(k.shape[-2], dtype=k.dtype, device=k.device) + bb * _decay_dot(k, k, Ekk)
    X = torch.linalg.solve_triangular(L, torch.cat([bb * v, bb * Kt], -1), upper=False, unitriangular=True)
    Ut, W = X.split([v.shape[-1], k.shape[-1]], -1)
    gam = torch.exp(GC[..., 0, :]).expand(*k.shape[:-2], k.shape[-1])
    map_A = torch.diag_embed(gam) - Kh.transpose(-1, -2) @ W
    map_B = Kh.transpose(-1, -2) @ Ut
    if q is None:
        return map_A, map_B, None, None, None
    Eqk = _decay(G, strict=False)
    P = _decay_dot(q, k, Eqk)
    Qe = q * eG - P @ W
    Oi = P @ Ut
    return map_A, map_B, Qe, Oi, (G, eG, GC, Kt, Kh, Ekk, L, Ut, W, Eqk, P)


def _local_bwd(q, k, v, g, b, saved, dA, dB, dQe, dOi):
    """Hand-written gradients of `_local` for q, k, v, g (log-gate), b."""
    G, eG, GC, Kt, Kh, Ekk, L, Ut, W, Eqk, P = saved
    bb = b.unsqueeze(-1)
    tr = lambda x: x.transpose(-1, -2)  # noqa: E731
    dP = dOi @ tr(Ut) - dQe @ tr(W)
    dUt = tr(P) @ dOi + Kh @ dB
    dW = -tr(P) @ dQe - Kh @ dA
    dKh = Ut @ tr(dB) - W @ tr(dA)
    dgam = _sum_to(torch.diagonal(dA, dim1=-2, dim2=-1), G)
    # triangular solve X = L^-1 R: dR = L^-T dX, dL = -dR X^T (strictly lower part)
    dR = torch.linalg.solve_triangular(tr(L), torch.cat([dUt, dW], -1), upper=True, unitriangular=True)
    dRu, dRw = dR.split([v.shape[-1], k.shape[-1]], -1)
    dLow = -(dRu @ tr(Ut) + dRw @ tr(W))
    dv = bb * dRu
    dKt = bb * dRw
    db = (v * dRu).sum(-1) + (Kt * dRw).sum(-1)
    db = db + (dLow * _decay_dot(k, k, Ekk)).sum(-1)  # Ekk is 0 off the strict lower triangle
    dkx, dky, dG = _decay_dot_bwd(bb * dLow, k, k, Ekk, G)
    dq, dkp, dGp = _decay_dot_bwd(dP, q, k, Eqk, G)
    dq = dq + eG * dQe
    dk = dkx + dky + dkp + eG * dKt + torch.exp(GC - G) * dKh
    th = _sum_to(Kh * dKh, G)
    dG = dG + dGp + _sum_to(q * eG * dQe, G) + _sum_to(Kt * dKt, G) - th
    dGC = th.sum(-2) + torch.exp(GC[..., 0, :]) * dgam
    dG = dG.clone()
    dG[..., -1, :] += dGC
    dg = dG.flip(-2).cumsum(-2).flip(-2)
    return dq, dk, dv, dg, db


def _prepare(q, k, v, gate, beta, cu_seqlens, C):
    """Chunk layout and fp32/fp64 chunk tensors [N, H, C, ...] (log-gate last dim 1 or d_k)."""
    dt = torch.float64 if torch.float64 in {x.dtype for x in (k, v, gate, beta)} else torch.float32
    T = k.shape[0]
    cu = as_cu_seqlens(cu_seqlens, T)
    idx, starts = _chunk_index(cu, C, k.device)
    lg = torch.log(gate.to(dt))
    lg = lg.unsqueeze(-1) if lg.dim() == 2 else lg
    xs = [None if q is None else _gather(q.to(dt), idx, 0.0), _gather(k.to(dt), idx, 0.0),
          _gather(v.to(dt), idx, 0.0), _gather(lg, idx, 0.0), _gather(beta.to(dt), idx, 0.0)]
    return dt, idx, starts, xs


def _pair_size(k: Tensor, g: Tensor) -> int:
    return k.shape[1] * k.shape[2] ** 2 * g.shape[-1]


def _scan(map_A, map_B, starts, S0):
    """States entering each chunk and the state after the last: S <- A_n S + B_n."""
    H, dk, dv = map_B.shape[1:]
    zero = map_B.new_zeros(H, dk, dv)
    S = zero if S0 is None else S0.to(map_B.dtype)
    states = []
    for n, st in enumerate(starts):
        if st and n > 0:
            S = zero
        states.append(S)
        S = map_A[n] @ S + map_B[n]
    return torch.stack(states), S


class ChunkFactors:
    """The chunk-local WY factors of a span of tokens, computed once and reused.

    From them: the span's affine map (`span_map`), its outputs from any entering state
    (`outputs`), the entering state's gradient from the outputs alone (`state_grad`, cheap: one
    reverse sweep of d x d products) and every input gradient given the outputs' and the final
    state's gradients (`backward`). A context-parallel rank needs all four around its two
    collectives, and building the factors is most of the kernel's cost. `keep_saved` also keeps
    the backward's intermediates while they fit _KEEP_BUDGET (else `backward` rebuilds them group
    by group, bounding memory).
    """

    def __init__(self, q, k, v, gate, beta, cu_seqlens=None, chunk_size: int | None = None,
                 keep_saved: bool = False):
        self.T, self.kda = k.shape[0], gate.dim() == 3
        chunk_size = chunk_size or default_chunk(gate)
        self.dt, self.idx, self.starts, self.xs = _prepare(q, k, v, gate, beta, cu_seqlens, chunk_size)
        qc, kc, vc, gc, bc = self.xs
        self.groups = list(_groups(kc.shape[0], _pair_size(kc, gc)))
        keep = keep_saved and kc.shape[0] * _pair_size(kc, gc) <= _KEEP_BUDGET
        parts, self.saved = [], [] if keep else None
        for s in self.groups:  # unless kept, a group's intermediates are dropped once it is done
            *part, saved = _local(None if qc is None else qc[s], kc[s], vc[s], gc[s], bc[s])
            parts.append(part)
            if keep:
                self.saved.append(saved)
        self.map_A, self.map_B, self.Qe, self.Oi = (None if p[0] is None else torch.cat(p) for p in zip(*parts))

    def span_map(self) -> tuple[Tensor, Tensor]:
        """S_out = A S_in + B over the span (a document start inside it makes A zero)."""
        H, dk, dv = self.map_B.shape[1:]
        A = torch.eye(dk, dtype=self.dt, device=self.map_B.device).expand(H, dk, dk)
        B = self.map_B.new_zeros(H, dk, dv)
        for n, st in enumerate(self.starts):
            if st and n > 0:
                A, B = torch.zeros_like(A), torch.zeros_like(B)
            A, B = self.map_A[n] @ A, self.map_A[n] @ B + self.map_B[n]
        return A, B

    def outputs(self, S0: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(o [T, H, d_v], the states entering each chunk, the final state), internal dtype."""
        states, final = _scan(self.map_A, self.map_B, self.starts, S0)
        return _scatter(self.Oi + self.Qe @ states, self.idx, self.T), states, final

    def _sweep(self, dO: Tensor, dfinal: Tensor | None) -> tuple[Tensor, Tensor]:
        """Reverse sweep over chunks carrying dS: (dS leaving each chunk, dS entering the span)."""
        QdO = self.Qe.transpose(-1, -2) @ dO
        N = QdO.shape[0]
        dS_out = [None] * N
        dS = dfinal.to(self.dt) if dfinal is not None else torch.zeros_like(self.map_B[0])
        for n in range(N - 1, -1, -1):
            dS_out[n] = dS
            dS_in = QdO[n] + self.map_A[n].transpose(-1, -2) @ dS
            dS = torch.zeros_like(dS_in) if self.starts[n] else dS_in
            if n == 0:
                dS0 = dS_in
        return torch.stack(dS_out), dS0

    def state_grad(self, dout: Tensor) -> Tensor:
        """The entering state's gradient from the span's outputs only (no final-state gradient)."""
        return self._sweep(_gather(dout.to(self.dt), self.idx, 0.0), None)[1]

    def backward(self, dout: Tensor, states: Tensor, dfinal: Tensor | None, gate: Tensor):
        """(dq, dk, dv, dgate, dbeta, d entering state) in the internal dtype; `gate` is alpha."""
        qc, kc, vc, gc, bc = self.xs
        dO = _gather(dout.to(self.dt), self.idx, 0.0)
        dB, dS0 = self._sweep(dO, dfinal)
        dA = dB @ states.transpose(-1, -2)
        dQe = dO @ states.transpose(-1, -2)
        grads = [[] for _ in range(5)]
        for i, s in enumerate(self.groups):
            saved = self.saved[i] if self.saved is not None else _local(qc[s], kc[s], vc[s], gc[s], bc[s])[4]
            for acc, x in zip(grads, _local_bwd(qc[s], kc[s], vc[s], gc[s], bc[s], saved, dA[s], dB[s],
                                                dQe[s], dO[s])):
                acc.append(x)
        dq, dk, dv, dg, db = (_scatter(torch.cat(x), self.idx, self.T) for x in grads)
        dgate = (dg if self.kda else dg[..., 0]) / gate.to(self.dt)
        return dq, dk, dv, dgate, db, dS0


class _ChunkDeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gate, beta, initial_state, cu_seqlens, C):
        o, states, final = ChunkFactors(q, k, v, gate, beta, cu_seqlens, C).outputs(initial_state)
        ctx.save_for_backward(q, k, v, gate, beta, states)
        ctx.cfg = (cu_seqlens, C, None if initial_state is None else initial_state.dtype)
        return o.to(q.dtype), final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, gate, beta, states = ctx.saved_tensors
        cu_seqlens, C, init_dtype = ctx.cfg
        f = ChunkFactors(q, k, v, gate, beta, cu_seqlens, C, keep_saved=True)
        dq, dk, dv, dgate, db, dS0 = f.backward(do, states, dfinal, gate)
        dinit = dS0.to(init_dtype) if init_dtype is not None else None
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dgate.to(gate.dtype), db.to(beta.dtype),
                dinit, None, None)


def chunk_delta_rule(q: Tensor, k: Tensor, v: Tensor, gate: Tensor, beta: Tensor,
                     cu_seqlens: Sequence[int] | Tensor | None = None,
                     initial_state: Tensor | None = None, chunk_size: int | None = None,
                     output_final_state: bool = False):
    """Chunked delta rule (GDN gate [T, H], KDA gate [T, H, d_k]) with a written backward.

    Returns o [T, H, d_v] in q's dtype, or (o, final_state) with the fp32 (fp64)
    state after token T - 1 when `output_final_state`; `initial_state`
    [H, d_k, d_v] enters token 0. Gates must lie in (0, 1], beta in [0, 1].
    """
    _check(q, k, v, gate, beta, initial_state)
    if chunk_size is None:
        chunk_size = default_chunk(gate)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (or None: {default_chunk(gate)} for this "
                         f"gate), got {chunk_size!r}")
    cu = tuple(as_cu_seqlens(cu_seqlens, q.shape[0]))
    o, final = _ChunkDeltaRule.apply(q, k, v, gate, beta, initial_state, cu, chunk_size)
    return (o, final) if output_final_state else o


def chunk_affine_map(k: Tensor, gate: Tensor, beta: Tensor, v: Tensor,
                     cu_seqlens: Sequence[int] | Tensor | None = None,
                     chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """A span's state map S_out = A S_in + B: A [H, d_k, d_k], B [H, d_k, d_v] (fp32/fp64).

    A is the product of the per-token transitions, B the state reached from zero.
    A document start inside the span resets the state, so A is then 0. Gradients
    flow through autograd.
    """
    _check(None, k, v, gate, beta, None)
    return ChunkFactors(None, k, v, gate, beta, cu_seqlens, chunk_size).span_map()
