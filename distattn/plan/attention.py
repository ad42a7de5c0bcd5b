"""Per-rank peak memory of one attention layer's forward + backward, as `distattn sweep` runs it.

A sweep point makes each rank's shards of q, k, v and dout, then runs the
scheme's forward and backward once. Its peak is the largest sum of live
tensors at any moment, so the model walks the phases of the scheme's code
(`distattn.schemes`, `distattn.kernels`), sums what each phase holds, and
takes the maximum over phases and ranks. Shapes come from the scheme's own
layout and kernel-call plan; no term is a fitted factor. This is what the
sweep measures on CPU (the peak of live bytes, see `distattn.sweep`). Per
rank (T its tokens, s the element size, fp32 = 4 bytes):

inputs   the q, k, v and dout shards, T*(2H + 2Hkv)*D*s. bf16 shards are
         drawn in fp32 and cast, so making them briefly holds an fp32 copy.
outputs  forward: the fp32 out/lse accumulators. backward: the saved out and
         lse, the output the caller still holds (when it is a separate
         tensor) and the fp32 dq/dk/dv accumulators, which the schemes keep in
         fp32 because they are sums of partials.
comm     ring: the K/V block being computed and the next one in flight; in
         backward also the fp32 dK/dV accumulator being filled, the one in
         flight with its receive buffer, and the next receive buffer.
         allgather: the stacked and padded local K/V, the gathered [W, max T]
         buffer and gloo's flat copy of it while the gather runs, then the
         concatenated full-length K/V (the gathered buffer stays referenced);
         in backward the full-length fp32 dK/dV and the reduce-scatter's
         [W, T] receive pieces and their sum.
         ulysses / usp: the all-to-all send and receive buffers (q/k/v to
         head shards and out back; dout, then dq/dk/dv back) and the saved
         head-sharded q/k/v of the whole group; usp adds the ring terms on
         the group's tokens and heads.
         lasp2 / lasp1: the fp32 grouped copies of q, k, v (and dout) the
         linear kernels work on, and the H*D*D fp32 states (lasp2 gathers W
         of them; both are tiny next to the token terms).
kernel   softmax: per block call of the CPU flash kernel, its output and lse
         (forward) or dq/dk/dv (backward), the previous call's results (still
         bound while the next call runs), and its per-thread workspace of
         q-tile x kv-tile scores; the merge's fp32 temporaries. Linear: the
         [H, T, block] intra-block scores and matmul's broadcast copies of K/V
         over the query heads of a KV group.

Modelled schemes: 'ring', 'allgather', 'ulysses', 'usp:U', 'lasp2', 'lasp1',
'local', each optionally '@LAYOUT'. Other schemes (cad, hetero) return None:
their memory depends on a schedule the planner does not replay, and a sweep
then runs the point rather than guess. The kernel terms are those of the CPU
flash kernel; on CUDA the allocator peak differs by those workspaces.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

__all__ = ["AttentionMemory", "DTYPE_BYTES", "build_scheme", "has_model", "predict_attention_peak"]

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
F32 = 4
MODELLED = ("ring", "allgather", "ulysses", "usp", "lasp2", "lasp1", "local")


@dataclass
class AttentionMemory:
    """Predicted peak of the rank and phase where it is largest, split by what holds the bytes."""

    scheme: str
    n_tokens: int
    world: int
    rank: int
    phase: str
    inputs: int
    outputs: int
    comm: int
    kernel: int

    @property
    def total(self) -> int:
        return self.inputs + self.outputs + self.comm + self.kernel

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d


@dataclass
class _Phase:
    name: str
    inputs: int = 0
    outputs: int = 0
    comm: int = 0
    kernel: int = 0

    @property
    def total(self) -> int:
        return self.inputs + self.outputs + self.comm + self.kernel

    def plus(self, name: str, outputs: int = 0, comm: int = 0, kernel: int = 0) -> "_Phase":
        return _Phase(name, self.inputs, self.outputs + outputs, self.comm + comm, self.kernel + kernel)


@dataclass(frozen=True)
class _Shape:
    heads: int
    kv_heads: int
    head_dim: int
    s: int          # element bytes of q, k, v
    threads: int    # torch threads per rank (kernel workspaces are per thread)
    causal: bool

    def rows(self, tokens: int, heads: int, size: int | None = None) -> int:
        """Bytes of a [tokens, heads, D] tensor (element size s unless given)."""
        return tokens * heads * self.head_dim * (self.s if size is None else size)


# ----------------------------------------------------------------------------- schemes by name


def has_model(scheme: str) -> bool:
    """Whether predict_attention_peak models this scheme name ('usp:2@zigzag' -> usp)."""
    return scheme.partition("@")[0].partition(":")[0] in MODELLED


def build_scheme(name: str):
    """'ring', 'usp:2' (ulysses degree), 'ring@contiguous' (layout) -> a configured scheme."""
    from distattn.schemes import get_scheme
    name, _, layout = name.partition("@")
    base, _, degree = name.partition(":")
    opts: dict[str, Any] = {"layout_name": layout} if layout else {}
    if base == "usp":
        opts["ulysses"] = int(degree) if degree else 2
    return get_scheme(base, **opts)


# ----------------------------------------------------------------------------- kernels


def _q_tile(tq: int) -> int:
    """Query rows per tile of the CPU flash kernel (its size heuristic)."""
    return 256 if tq >= 768 else 64 if tq >= 192 else 32


def _fwd_workspace(tq: int, tk: int, sh: _Shape) -> int:
    """Per-thread scores, row max/sum and output tile of the CPU flash forward (fp32)."""
    qs, ks = _q_tile(tq), min(512, tk)
    per = (qs * ks + 2 * qs + qs * sh.head_dim) * F32 + (qs * ks * sh.s if sh.s != F32 else 0)
    return sh.threads * per


def _bwd_workspace(tq: int, tk: int, sh: _Shape) -> int:
    """Per-thread probabilities and their gradient tiles of the CPU flash backward."""
    qs, ks = _q_tile(tq), min(512, tk)
    per = 2 * qs * ks * F32 + (2 * qs * ks * sh.s if sh.s != F32 else 0)
    return sh.threads * per


def _call_sizes(calls) -> list[tuple[int, int]]:
    return [(c.q1 - c.q0, c.k1 - c.k0) for c in calls]


def flash_forward_peak(calls: Sequence[tuple[int, int]], h: int, sh: _Shape) -> int:
    """Kernel-side peak of `block_forward` over (q rows, k rows) calls with h query heads.

    A call's out and lse are bound until the next call returns, so two calls'
    results coexist while its workspace is live; the merge makes fp32 copies
    of the partial output (one for fp32 inputs, two for bf16).
    """
    peak = prev = 0
    for tq, tk in calls:
        res = sh.rows(tq, h) + tq * h * F32
        merge = sh.rows(tq, h, F32) * (1 if sh.s == F32 else 2)
        peak = max(peak, prev + res + _fwd_workspace(tq, tk, sh), res + merge)
        prev = res
    return peak


def flash_backward_peak(calls: Sequence[tuple[int, int]], h: int, hkv: int, sh: _Shape) -> int:
    """Kernel-side peak of `block_backward`: this call's and the previous call's dq/dk/dv, workspace.

    Adding bf16 gradients into the fp32 accumulators casts each to an fp32 copy first.
    """
    peak = prev = 0
    for tq, tk in calls:
        grads = sh.rows(tq, h) + 2 * sh.rows(tk, hkv)
        peak = max(peak, prev + grads + tq * h * F32 + _bwd_workspace(tq, tk, sh))
        if sh.s != F32:
            peak = max(peak, grads + max(sh.rows(tq, h, F32), sh.rows(tk, hkv, F32)))
        prev = grads
    return peak


# ----------------------------------------------------------------------------- inputs


def _inputs(sh: _Shape, t: int) -> tuple[int, int]:
    """(bytes of the four shards, creation peak): bf16 shards pass through an fp32 draw."""
    total = 2 * sh.rows(t, sh.heads) + 2 * sh.rows(t, sh.kv_heads)
    extra = sh.rows(t, sh.heads, F32) if sh.s != F32 else 0
    return total, total + extra


def _base(sh: _Shape, t: int) -> tuple[_Phase, _Phase]:
    """The input-making phase and the zero phase every later phase builds on."""
    total, making = _inputs(sh, t)
    return _Phase("inputs", inputs=making), _Phase("", inputs=total)


# ----------------------------------------------------------------------------- ring


def ring_phases(sh: _Shape, plan, h: int, n: int, fwd: _Phase, bwd: _Phase) -> list[_Phase]:
    """Ring forward and backward over `plan` (a RingPlan) with h query and n KV heads.

    `fwd`/`bwd` hold what the caller keeps live around the ring (inputs, and in
    backward the saved out and lse); the ring adds its accumulators, blocks and
    kernel terms.
    """
    W, mine = plan.world, plan.sizes[plan.rank]
    blk = [size * 2 * n * sh.head_dim for size in plan.sizes]  # K/V block elements per source rank
    acc = sh.rows(mine, h, F32) + mine * h * F32                # fp32 out and lse
    out: list[_Phase] = []
    for s in range(W):
        cur, nxt = blk[plan.src(s)] * sh.s, (blk[plan.src(s + 1)] * sh.s if s < W - 1 else 0)
        k = flash_forward_peak(_call_sizes(plan.calls[s]), h, sh)
        out.append(fwd.plus(f"forward step {s}", outputs=acc, comm=cur + nxt, kernel=k))
    if sh.s != F32:  # out.to(q.dtype) next to the fp32 accumulator
        out.append(fwd.plus("forward cast", outputs=acc + sh.rows(mine, h)))
    dq32 = sh.rows(mine, h, F32)
    for s in range(W):
        cur, nxt = blk[plan.src(s)] * sh.s, (blk[plan.src(s + 1)] * sh.s if s < W - 1 else 0)
        g = blk[plan.src(s)] * F32
        flight = (blk[plan.src(s - 1)] + blk[plan.src(s)]) * F32 if 0 < s else 0  # sent g, its recv
        k = flash_backward_peak(_call_sizes(plan.calls[s]), h, n, sh)
        out.append(bwd.plus(f"backward step {s}", outputs=dq32, comm=cur + nxt + g + flight, kernel=k))
        if W > 1:
            nxt_recv = blk[plan.src(s + 1)] * F32
            out.append(bwd.plus(f"backward send {s}", outputs=dq32, comm=cur + nxt + g + flight + nxt_recv))
    home = blk[plan.rank] * F32 if W > 1 else 0
    grads = 2 * sh.rows(mine, n) + (sh.rows(mine, h) if sh.s != F32 else 0)  # dk/dv copies, dq cast
    out.append(bwd.plus("backward end", outputs=dq32 + home + grads))
    return out


def _ring(sh: _Shape, scheme, n_tokens: int, world: int, rank: int) -> list[_Phase]:
    from distattn.schemes.ring import RingPlan
    lay = scheme.layout(n_tokens, world)
    plan = RingPlan(rank, [lay.runs(r) for r in range(world)], sh.causal)
    t = lay.size(rank)
    make, zero = _base(sh, t)
    bwd = zero.plus("", outputs=sh.rows(t, sh.heads) + t * sh.heads * F32)  # saved out and lse
    return [make] + ring_phases(sh, plan, sh.heads, sh.kv_heads, zero, bwd)


# ----------------------------------------------------------------------------- allgather


def _allgather(sh: _Shape, scheme, n_tokens: int, world: int, rank: int) -> list[_Phase]:
    from distattn.schemes.allgather import AllGatherPlan, head_pieces
    lay = scheme.layout(n_tokens, world)
    pieces = head_pieces(sh.heads, sh.kv_heads, scheme.head_stride)
    plan = AllGatherPlan(rank, [lay.runs(r) for r in range(world)], sh.causal, pieces)
    t, m, total = lay.size(rank), max(lay.sizes()), plan.n_tokens
    hs = pieces[0][0].stop - pieces[0][0].start
    hq = hs * (sh.heads // sh.kv_heads)
    row = 2 * hs * sh.head_dim                                   # K/V elements per token of a piece
    if world > 1:  # stack, zero-padded copy, [W, m] result, gloo's flat staging copy of it
        gather = (t + m + 2 * world * m) * row * sh.s
        held = (world * m + total) * row * sh.s                  # result (still referenced) + concatenation
    else:
        gather, held = 2 * t * row * sh.s, t * row * sh.s
    nxt = gather if len(pieces) > 1 else 0                       # the next piece travels during compute
    calls = _call_sizes(plan.calls)
    make, zero = _base(sh, t)
    acc = sh.rows(t, sh.heads, F32) + t * sh.heads * F32
    out = [make,
           zero.plus("forward gather", outputs=acc, comm=gather),
           zero.plus("forward compute", outputs=acc, comm=held + nxt,
                     kernel=flash_forward_peak(calls, hq, sh))]
    if sh.s != F32:
        out.append(zero.plus("forward cast", outputs=acc + sh.rows(t, sh.heads)))
    saved = (sh.rows(t, sh.heads) + t * sh.heads * F32 + sh.rows(t, sh.heads, F32)
             + 2 * sh.rows(t, sh.kv_heads, F32))                 # out, lse, fp32 dq/dk/dv
    g = total * row * F32                                        # full-length fp32 dK/dV of a piece
    scatter = (world * t + t) * row * F32 if world > 1 else t * row * F32
    out += [zero.plus("backward gather", outputs=saved, comm=gather),
            zero.plus("backward compute", outputs=saved, comm=held + g + nxt,
                      kernel=flash_backward_peak(calls, hq, hs, sh)),
            zero.plus("backward reduce-scatter", outputs=saved, comm=held - total * row * sh.s + g + scatter)]
    return out


# ----------------------------------------------------------------------------- ulysses / usp


def _head_parallel(sh: _Shape, scheme, n_tokens: int, world: int, rank: int) -> list[_Phase]:
    """Ulysses (one all-to-all group of W) and USP (groups of U, a ring of W/U groups)."""
    from distattn.schemes.ulysses import head_split, plan_by_doc
    usp = scheme.name == "usp"
    u = scheme.ulysses if usp else world
    split = head_split(sh.heads, sh.kv_heads, u)
    a, n = split.q_per, split.kv_per
    if usp:
        lay, ring_plan, local_calls = scheme._plan(n_tokens, world, rank, None, sh.causal)
        members = [lay.size(c) for c in lay.members(rank // u)]
    else:
        from distattn.schemes.base import concat_runs
        lay = scheme.layout(n_tokens, world)
        runs = concat_runs([lay.runs(r) for r in range(world)])
        ring_plan, local_calls = None, plan_by_doc(runs, runs, sh.causal)
        members = lay.sizes()
    t, group = lay.size(rank), sum(members)
    make, zero = _base(sh, t)
    a2a = u > 1
    kv_copy = 2 * sh.rows(t, u * n) if (a2a and split.replicated) else 0  # index_select of replicas
    send = sh.rows(t, u * (a + 2 * n)) if a2a else 0
    packed = sh.rows(group, a + 2 * n) if a2a else 0
    out = [make, zero.plus("forward to heads", comm=kv_copy + send + packed)]
    fwd = zero.plus("", comm=send + packed)
    # saved: head-sharded q/k/v (or the inputs themselves), out_h and lse; the caller's output
    held_out = sh.rows(t, sh.heads) if a2a else 0
    bwd = zero.plus("", outputs=sh.rows(group, a) + group * a * F32 + held_out, comm=packed)
    if a2a:
        bwd = bwd.plus("", comm=sh.rows(group, a))  # dout in head shards
        out.append(zero.plus("backward dout to heads", outputs=bwd.outputs, comm=packed
                             + sh.rows(t, sh.heads) + sh.rows(group, a)))
    if ring_plan is not None:
        inner = ring_phases(sh, ring_plan, a, n, fwd, bwd)
    else:
        calls = _call_sizes(local_calls)
        acc = sh.rows(group, a, F32) + group * a * F32
        inner = [fwd.plus("forward attention", outputs=acc, kernel=flash_forward_peak(calls, a, sh)),
                 bwd.plus("backward attention", outputs=sh.rows(group, a + 2 * n, F32),
                          kernel=flash_backward_peak(calls, a, n, sh))]
    out += inner
    if a2a:
        kv_wire = F32 if (split.replicated and scheme.dkv_dtype == "fp32") else sh.s
        wire = group * (a * sh.s + 2 * n * kv_wire) * sh.head_dim
        mixed = wire if kv_wire != sh.s else 0                     # dtype-split copies before the concat
        back = sh.rows(group, a) + group * a * F32 + sh.rows(t, u * a)  # out_h, lse, out
        out += [fwd.plus("forward to sequence", outputs=back, comm=sh.rows(t, u * a)),  # + its recv
                bwd.plus("backward to sequence", outputs=sh.rows(group, a + 2 * n, F32),
                         comm=2 * wire + mixed)]
    return out


# ----------------------------------------------------------------------------- linear


def _segment_forward(sh: _Shape, L: int, rep: int, block: int) -> int:
    """Peak of `segment_forward` on L tokens.

    Within blocks: the [H, L, block] scores, matmul's copy of K or V broadcast
    over the rep query heads of a KV group, the output. Across blocks: the
    output, the per-block states and the states entering each block, a
    contiguous copy of the shifted queries and their product with the states
    (which matmul first broadcasts over the group).
    """
    h, d = sh.heads, sh.head_dim
    scores = L * h * min(block, L) * F32
    full = L * h * d * F32
    bcast = full if rep > 1 else 0
    states = sh.kv_heads * max(1, L // block) * d * d * F32
    within = scores + bcast + full
    across = 3 * full + 2 * states + (states * rep if rep > 1 else 0)
    return max(within, across)


def _segment_backward(sh: _Shape, L: int, rep: int, block: int) -> int:
    """Peak of `segment_backward` on L tokens.

    First the scores p with a broadcast K, then dv (per query head, then summed
    over the group); then the score gradients dp next to dv, with dq and dk
    (again per query head before the sum).
    """
    h, d = sh.heads, sh.head_dim
    scores = L * h * min(block, L) * F32
    full, kv = L * h * d * F32, L * sh.kv_heads * d * F32
    grouped = full if rep > 1 else 0                              # broadcast copy, or a grad before its sum
    p_phase = scores + max(grouped, grouped + kv)
    dp_phase = kv + scores + max(grouped + full, full + grouped + kv)
    return max(p_phase, dp_phase)


def _linear(sh: _Shape, scheme, n_tokens: int, world: int, rank: int) -> list[_Phase]:
    lay = scheme.layout(n_tokens, world)
    runs = lay.runs(rank)
    t = lay.size(rank)
    rep = sh.heads // sh.kv_heads
    block = scheme.block
    longest = max((r.length for r in runs), default=0)
    many = len(runs) > 1                                          # per-run results go into full buffers
    make, zero = _base(sh, t)
    d2 = sh.kv_heads * sh.head_dim ** 2 * F32
    states = d2 * (world + 1) * 2 if scheme.name == "lasp2" else 2 * d2
    grouped = (sh.heads + 2 * sh.kv_heads) * t * sh.head_dim * F32    # fp32 phi(q), phi(k), v
    q32 = sh.rows(t, sh.heads, F32)
    fwd = zero.plus("", comm=grouped + states)
    k_f = _segment_forward(sh, longest, rep, block) + (q32 if many else 0)
    bwd = zero.plus("", outputs=sh.rows(t, sh.heads), comm=grouped + q32 + states)  # caller's out, dout
    full_grads = q32 + 2 * sh.rows(t, sh.kv_heads, F32) if many else 0
    k_b = _segment_backward(sh, longest, rep, block) + full_grads
    grads = q32 + 2 * sh.rows(t, sh.kv_heads, F32)
    return [make,
            fwd.plus("forward chunks", kernel=k_f),
            fwd.plus("forward out", outputs=q32 + sh.rows(t, sh.heads)),
            bwd.plus("backward chunks", kernel=k_b),
            bwd.plus("backward out", outputs=grads + q32)]


# ----------------------------------------------------------------------------- local


def _local(sh: _Shape, scheme, n_tokens: int, world: int, rank: int) -> list[_Phase]:
    from distattn.kernels.softmax import plan_calls
    lay = scheme.layout(n_tokens, 1)
    calls = _call_sizes(plan_calls(lay.runs(0), lay.runs(0), sh.causal))
    make, zero = _base(sh, n_tokens)
    acc = sh.rows(n_tokens, sh.heads, F32) + n_tokens * sh.heads * F32
    saved = sh.rows(n_tokens, sh.heads) + n_tokens * sh.heads * F32
    grads = sh.rows(n_tokens, sh.heads, F32) + 2 * sh.rows(n_tokens, sh.kv_heads, F32)
    return [make,
            zero.plus("forward attention", outputs=acc, kernel=flash_forward_peak(calls, sh.heads, sh)),
            zero.plus("backward attention", outputs=saved + grads,
                      kernel=flash_backward_peak(calls, sh.heads, sh.kv_heads, sh))]


_MODELS = {"ring": _ring, "allgather": _allgather, "ulysses": _head_parallel, "usp": _head_parallel,
           "lasp2": _linear, "lasp1": _linear, "local": _local}


# ----------------------------------------------------------------------------- entry point


def predict_attention_peak(scheme: str, n_tokens: int, world: int, heads: int, kv_heads: int,
                           head_dim: int, dtype: str = "fp32", causal: bool = True,
                           threads: int = 1) -> AttentionMemory | None:
    """Predicted peak bytes a rank adds for one fwd+bwd of `scheme` (max over ranks).

    None when the scheme has no model (see the module docstring) or cannot run
    this shape (the sweep reports that as an invalid point when it runs it).
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    if not has_model(scheme) or n_tokens < 1 or world < 1:
        return None
    base = scheme.partition("@")[0].partition(":")[0]
    try:
        obj = build_scheme(scheme)
        obj.validate(heads=heads, kv_heads=kv_heads, world=world)
        obj.layout(n_tokens, world)
    except ValueError:
        return None
    if base == "local" and world != 1:
        return None
    sh = _Shape(heads, kv_heads, head_dim, DTYPE_BYTES[dtype], max(1, threads), causal)
    best: tuple[int, _Phase] | None = None
    for rank in range(world):
        for ph in _MODELS[base](sh, obj, n_tokens, world, rank):
            if best is None or ph.total > best[1].total:
                best = (rank, ph)
    assert best is not None
    rank, ph = best
    return AttentionMemory(scheme, n_tokens, world, rank, ph.name, ph.inputs, ph.outputs, ph.comm, ph.kernel)
