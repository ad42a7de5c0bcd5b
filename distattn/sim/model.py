"""Per-scheme time of one attention layer (forward + backward) on a modelled cluster.

Every model takes its traffic from the scheme object the code runs
(``get_scheme(name).comm_bytes(AttnShape(...), W, rank)``, the formulas the
tests check against the ledger) and its compute from exact causal pair counts
of the scheme's layout (softmax: 4 FLOPs x pairs x heads x head_dim forward,
2.5x that backward). The schedule of each scheme follows its implementation:

``ring`` (any layout)
    W lock-step steps; step s computes my queries against the block of rank
    r - s while the next block travels (step time = max over ranks of compute,
    or the hop if slower). Backward replays the ring with the dK/dV accumulator
    travelling beside the K/V block; the last accumulator hop is exposed.
``allgather``
    all-gather K/V, then compute (exposed); backward gathers again, computes,
    reduce-scatters dK/dV (exposed).
``ulysses``
    all-to-all to heads, full-length attention on H/W heads, all-to-all back
    (exposed); the same twice in backward.
``usp``
    the ulysses all-to-all inside groups of U adjacent ranks around a zigzag
    ring over the W/U groups, each ring step on H/U heads.
``lasp2``
    local intra-chunk work overlaps one all-gather of d x d states each way;
    the prefix terms run after the gather.
``lasp1``
    local work, then a chain of W-1 hops each way; every hop carries one state
    and the receiving rank's state update (two C x d x d products per head).
    ``sync_every_layer`` (LASP-1's reference code barriers every forward) pays
    the chain in every layer; without it the chain pipelines across layers.
``ring-linear`` (simulator only: the Ring Attention baseline of the LASP-2
paper on a linear-attention model)
    K/V chunks rotate as in ``ring`` (same traffic formula); each step adds
    the incoming chunk's state product (right product per step).

Delta-rule layers (Gated DeltaNet, Kimi Delta Attention: ``rule=``) have their own FLOPs and
schedules on lasp2 and lasp1 (`distattn.sim.delta`).

Linear-attention FLOPs per token and head (block B, head dim d): forward
4·B·d (masked intra-block products) + 4·d² (block state and its application),
backward 2x forward.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from distattn.sim.cluster import Cluster

__all__ = ["AttnWorkload", "LayerTime", "SIM_SCHEMES", "layer_time", "single_device_time",
           "causal_pairs_np", "ring_pairs", "attention_memory", "scheme_for"]

BWD_FACTOR = 2.5  # attention backward FLOPs / forward FLOPs (flash-attention convention)
LINEAR_BLOCK = 64  # distattn.kernels.linear.DEFAULT_BLOCK


@dataclass(frozen=True)
class AttnWorkload:
    seq: int  # tokens of one sequence split over the CP group
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2
    causal: bool = True
    linear_block: int = LINEAR_BLOCK


@dataclass
class LayerTime:
    """One attention layer, forward + backward, on the critical path."""

    scheme: str
    world: int
    fwd_s: float
    bwd_s: float
    compute_s: float  # kernel work of the busiest rank
    comm_s: float  # transfer time on the critical path, hidden or not
    bytes_sent: int  # per rank (max), from the scheme's comm_bytes
    mem_bytes: float  # attention working set per rank (estimate)
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.fwd_s + self.bwd_s

    @property
    def exposed_s(self) -> float:
        return max(0.0, self.total_s - self.compute_s)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(total_s=self.total_s, exposed_s=self.exposed_s)
        return d


SIM_SCHEMES = ("ring", "ring-basic", "allgather", "ulysses", "usp", "lasp2", "lasp1", "ring-linear")


def scheme_for(name: str):
    """The scheme object behind a simulator name ('ring-basic' = ring on the contiguous layout)."""
    import distattn
    if name == "ring-basic":
        return distattn.get_scheme("ring", layout_name="contiguous")
    if name == "ring-linear":
        return distattn.get_scheme("ring", layout_name="contiguous")
    base, _, deg = name.partition(":")
    if base == "usp":
        return distattn.get_scheme("usp", ulysses=int(deg) if deg else 2)
    return distattn.get_scheme(base)


# ----------------------------------------------------------------------------- pair counts


def causal_pairs_np(qs, ql, ks, kl):
    """(query, key) pairs with key <= query between [qs, qs+ql) and [ks, ks+kl) (arrays, same document)."""
    qs, ql, ks, kl = (np.asarray(x, dtype=np.float64) for x in (qs, ql, ks, kl))

    def s(x):  # sum over queries < x of clamp(q - ks + 1, 0, kl)
        m = np.clip(x - ks, 0, kl)
        return m * (m + 1) / 2 + kl * np.maximum(x - ks - kl, 0)
    out = s(qs + ql) - s(qs)
    return np.where((ql > 0) & (kl > 0), out, 0.0)


def _run_arrays(layout, world: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-rank run starts and lengths, padded with zero-length runs: [W, R]."""
    runs = [layout.runs(r) for r in range(world)]
    width = max(len(r) for r in runs)
    st = np.zeros((world, width))
    ln = np.zeros((world, width))
    for r, rr in enumerate(runs):
        for i, run in enumerate(rr):
            st[r, i], ln[r, i] = run.start, run.length
    return st, ln


def _sample_ranks(world: int, k: int = 16) -> list[int]:
    if world <= k:
        return list(range(world))
    return sorted({round(i * (world - 1) / (k - 1)) for i in range(k)})


def _volumes(scheme, shape, world: int) -> list:
    return [scheme.comm_bytes(shape, world, r) for r in _sample_ranks(world)]


def _shape(w: AttnWorkload, heads: int | None = None, kv_heads: int | None = None):
    from distattn.schemes import AttnShape
    return AttnShape(n_tokens=w.seq, heads=heads or w.heads, kv_heads=kv_heads or w.kv_heads,
                     head_dim=w.head_dim, dtype_bytes=w.dtype_bytes)


def _attn_flops(pairs, heads: int, head_dim: int):
    return 4.0 * pairs * heads * head_dim


def single_device_time(w: AttnWorkload, cluster: Cluster, tokens: int | None = None) -> float:
    """Forward + backward of one causal call over ``tokens`` (default: the whole sequence) on one device."""
    n = tokens or w.seq
    pairs = n * (n + 1) / 2 if w.causal else n * n
    f = _attn_flops(pairs, w.heads, w.head_dim)
    return cluster.device.attn_time(f, n) + cluster.device.attn_time(f * BWD_FACTOR, n)


# ----------------------------------------------------------------------------- softmax schemes


def _ring_blocks(layout, world: int, causal: bool):
    """Yield (step, pairs, call length) per run pair; arrays over ranks: rank r vs the block of r - s."""
    st, ln = _run_arrays(layout, world)
    ranks = np.arange(world)
    for s in range(world):
        src = (ranks - s) % world
        for i in range(st.shape[1]):
            for j in range(st.shape[1]):
                qs, ql, ks, kl = st[:, i], ln[:, i], st[src, j], ln[src, j]
                pairs = causal_pairs_np(qs, ql, ks, kl) if causal else ql * kl
                yield s, pairs, np.minimum(ql, kl)


def ring_pairs(layout, world: int, causal: bool = True) -> np.ndarray:
    """[W, W] (query, key) pairs rank r computes at ring step s (single document)."""
    out = np.zeros((world, world))
    for s, pairs, _ in _ring_blocks(layout, world, causal):
        out[:, s] += pairs
    return out


def _ring_compute(w: AttnWorkload, cluster: Cluster, layout, world: int, heads: int):
    """Forward and backward kernel time per (rank, step): two [W, W] arrays."""
    dev = cluster.device
    fwd = np.zeros((world, world))
    bwd = np.zeros((world, world))
    for s, pairs, tok in _ring_blocks(layout, world, w.causal):
        flops = _attn_flops(pairs, heads, w.head_dim)
        eff = np.where(tok > 0, tok / (tok + dev.half_tokens), 1.0)
        call = np.where(pairs > 0, dev.call_overhead_s, 0.0)
        fwd[:, s] += np.where(pairs > 0, flops / (dev.attn_rate * eff), 0.0) + call
        bwd[:, s] += np.where(pairs > 0, BWD_FACTOR * flops / (dev.attn_rate * eff), 0.0) + call
    return fwd, bwd


def _ring(name: str, w: AttnWorkload, cluster: Cluster, world: int, scheme=None, heads=None, kv_heads=None,
          stride: int = 1, vol_scale: float = 1.0) -> LayerTime:
    scheme = scheme or scheme_for(name)
    heads, kv_heads = heads or w.heads, kv_heads or w.kv_heads
    shape = _shape(w, heads, kv_heads)
    vols = _volumes(scheme, shape, world)
    lay = scheme.layout(w.seq, world)
    fwd_c, bwd_c = _ring_compute(w, cluster, lay, world, heads)
    link = cluster.ring_link(world, stride)
    kv_total = max(v.fwd.get("exchange", 0) for v in vols)
    bwd_total = max(v.bwd.get("exchange", 0) for v in vols)
    hops = max(world - 1, 1)
    kv_hop = kv_total / hops if world > 1 else 0.0
    dkv_hop = (bwd_total - kv_total) / world if world > 1 else 0.0
    ov = cluster.step_overhead_s if world > 1 else 0.0
    fwd_t = comm = 0.0
    for s in range(world):
        hop = link.time(kv_hop) if s < world - 1 else 0.0
        comm += hop
        fwd_t += max(fwd_c[:, s].max(), hop) + ov
    bwd_t = 0.0
    for s in range(world):
        moving = (kv_hop if s < world - 1 else 0.0) + (dkv_hop if s > 0 else 0.0)
        hop = link.time(moving) if moving else 0.0
        comm += hop
        bwd_t += max(bwd_c[:, s].max(), hop) + ov
    if world > 1:  # the last dK/dV hop home is waited after the loop
        last = link.time(dkv_hop)
        bwd_t += last
        comm += last
    compute = float((fwd_c.sum(1) + bwd_c.sum(1)).max())
    mem = attention_memory(name, replace(w, heads=heads, kv_heads=kv_heads), world)
    return LayerTime(name, world, fwd_t, bwd_t, compute, comm, int(max(v.total for v in vols) * vol_scale),
                     mem, notes=f"layout {lay.name}; hop {kv_hop / 2**20:.1f} MiB over {link.name}")


def _local_pairs_time(w: AttnWorkload, cluster: Cluster, layout, rank: int, heads: int) -> tuple[float, float]:
    """Fwd and bwd kernel time of my queries against all keys (allgather's work)."""
    runs = layout.runs(rank)
    dev = cluster.device
    pairs = float(layout.cost(rank)) if w.causal else sum(r.length for r in runs) * w.seq
    f = _attn_flops(pairs, heads, w.head_dim)
    tok = max((r.length for r in runs), default=1)
    calls = 2 * len(runs)
    return dev.attn_time(f, tok, calls), dev.attn_time(BWD_FACTOR * f, tok, calls)


def _allgather(w: AttnWorkload, cluster: Cluster, world: int) -> LayerTime:
    scheme = scheme_for("allgather")
    shape = _shape(w)
    vols = _volumes(scheme, shape, world)
    lay = scheme.layout(w.seq, world)
    ag = max(v.fwd.get("all_gather_uneven", 0) for v in vols)
    rs = max(v.bwd.get("reduce_scatter", 0) for v in vols)
    t_ag = cluster.all_gather(ag, world)
    t_rs = cluster.reduce_scatter(rs, world)
    times = [_local_pairs_time(w, cluster, lay, r, w.heads) for r in _sample_ranks(world)]
    cf = max(t[0] for t in times)
    cb = max(t[1] for t in times)
    mem = attention_memory("allgather", w, world)
    return LayerTime("allgather", world, t_ag + cf, t_ag + cb + t_rs, cf + cb, 2 * t_ag + t_rs,
                     int(max(v.total for v in vols)), mem, notes="gather, then compute (no head pieces)")


def _ulysses(w: AttnWorkload, cluster: Cluster, world: int) -> LayerTime:
    scheme = scheme_for("ulysses")
    try:
        scheme.validate(heads=w.heads, kv_heads=w.kv_heads, world=world)
    except ValueError as e:
        raise ValueError(f"ulysses at W={world}: {e}") from None
    vols = _volumes(scheme, _shape(w), world)
    a_f = max(v.fwd.get("all_to_all", 0) for v in vols)
    a_b = max(v.bwd.get("all_to_all", 0) for v in vols)
    t_f, t_b = cluster.all_to_all(a_f, world), cluster.all_to_all(a_b, world)
    heads = w.heads / world
    pairs = w.seq * (w.seq + 1) / 2 if w.causal else w.seq ** 2
    f = _attn_flops(pairs, heads, w.head_dim)
    dev = cluster.device
    cf, cb = dev.attn_time(f, w.seq), dev.attn_time(BWD_FACTOR * f, w.seq)
    mem = attention_memory("ulysses", w, world)
    return LayerTime("ulysses", world, t_f + cf, t_b + cb, cf + cb, t_f + t_b,
                     int(max(v.total for v in vols)), mem, notes="all-to-all exposed")


def _usp(name: str, w: AttnWorkload, cluster: Cluster, world: int) -> LayerTime:
    scheme = scheme_for(name)
    u = scheme.ulysses
    if world % u:
        raise ValueError(f"{name}: W={world} is not a multiple of ulysses={u}")
    scheme.validate(heads=w.heads, kv_heads=w.kv_heads, world=world)
    vols = _volumes(scheme, _shape(w), world)
    a_f = max(v.fwd.get("all_to_all", 0) for v in vols)
    a_b = max(v.bwd.get("all_to_all", 0) for v in vols)
    t_f, t_b = cluster.all_to_all(a_f, u), cluster.all_to_all(a_b, u)
    from distattn.schemes.ulysses import head_split
    split = head_split(w.heads, w.kv_heads, u)
    ring_w = world // u
    inner = _ring("ring", w, cluster, ring_w, heads=split.q_per, kv_heads=split.kv_per, stride=u)
    return LayerTime(name, world, inner.fwd_s + t_f, inner.bwd_s + t_b, inner.compute_s,
                     inner.comm_s + t_f + t_b, int(max(v.total for v in vols)), inner.mem_bytes,
                     notes=f"ulysses {u} x ring {ring_w}")


# ----------------------------------------------------------------------------- linear schemes


def _linear_flops(w: AttnWorkload, tokens: float) -> dict[str, float]:
    """Forward FLOPs of the local parts of causal linear attention on ``tokens`` tokens."""
    b, d, h = w.linear_block, w.head_dim, w.heads
    a = w.kv_heads  # state heads (GQA, uniform decay)
    return {"intra": tokens * h * 4 * b * d + tokens * (h + a) * 2 * d * d,  # masked blocks + block states
            "state": tokens * a * 2 * d * d,  # M = K^T V of a run
            "apply": tokens * h * 2 * d * d}  # (Q * lam) P


def _state_bytes(scheme, w: AttnWorkload) -> int:
    return scheme.state_heads(w.heads, w.kv_heads) * w.head_dim ** 2 * 4


def _lasp2(w: AttnWorkload, cluster: Cluster, world: int) -> LayerTime:
    scheme = scheme_for("lasp2")
    vols = _volumes(scheme, _shape(w), world)
    t_local = math.ceil(w.seq / world)
    fl = _linear_flops(w, t_local)
    mm = cluster.device.matmul_time
    ag_f = cluster.all_gather(max(v.fwd.get("all_gather", 0) for v in vols), world)
    ag_b = cluster.all_gather(max(v.bwd.get("all_gather", 0) for v in vols), world)
    c_state, c_intra, c_apply = mm(fl["state"]), mm(fl["intra"], calls=4), mm(fl["apply"])
    fwd = c_state + max(c_intra, ag_f) + c_apply
    # backward: dP terms first, the gather travels during the intra-chunk backward, then dK/dV of the states
    b_grad, b_intra, b_after = mm(fl["apply"]), mm(2 * fl["intra"], calls=8), mm(2 * fl["state"] + fl["apply"])
    bwd = b_grad + max(b_intra, ag_b) + b_after
    compute = c_state + c_intra + c_apply + b_grad + b_intra + b_after
    mem = attention_memory("lasp2", w, world)
    return LayerTime("lasp2", world, fwd, bwd, compute, ag_f + ag_b, int(max(v.total for v in vols)), mem,
                     notes="one all-gather of states each way, overlapped with intra-chunk work")


def _lasp1(w: AttnWorkload, cluster: Cluster, world: int, sync_every_layer: bool = True,
           layers: int = 1) -> LayerTime:
    scheme = scheme_for("lasp1")
    vols = _volumes(scheme, _shape(w), world)
    t_local = math.ceil(w.seq / world)
    fl = _linear_flops(w, t_local)
    mm = cluster.device.matmul_time
    msg = _state_bytes(scheme, w)
    c_intra = mm(fl["intra"], calls=4)
    b_intra = mm(2 * fl["intra"], calls=8) + mm(fl["apply"])
    chain = world - 1
    # hop r -> r+1 crosses a node boundary when r+1 starts a node; a chain is not lock-step, so
    # every hop pays its own link
    n_inter = sum(1 for r in range(1, world) if r % cluster.gpus_per_node == 0)
    send = (chain - n_inter) * cluster.intra.time(msg) + n_inter * cluster.inter.time(msg)
    work_f = mm(fl["apply"]) + mm(fl["state"]) + cluster.step_overhead_s  # per hop, on the chain
    work_b = mm(2 * fl["state"]) + mm(fl["apply"]) + cluster.step_overhead_s
    if sync_every_layer:  # every layer waits for the whole chain
        fwd = c_intra + chain * work_f + send
        bwd = b_intra + chain * work_b + send
    else:  # wavefront: the chain's latency is paid once per step, spread over the layers
        layers = max(layers, 1)
        fwd = c_intra + work_f + (chain * work_f + send) / layers
        bwd = b_intra + work_b + (chain * work_b + send) / layers
    compute = c_intra + b_intra + 2 * (mm(fl["apply"]) + mm(fl["state"]))
    comm = 2 * send
    mem = attention_memory("lasp1", w, world)
    return LayerTime("lasp1", world, fwd, bwd, compute, comm, int(max(v.total for v in vols)), mem,
                     notes=f"chain of {chain} hops each way "
                           f"({'every layer' if sync_every_layer else 'pipelined across layers'})")


def _ring_linear(w: AttnWorkload, cluster: Cluster, world: int) -> LayerTime:
    """Ring Attention on a linear-attention layer: K/V chunks rotate, each step adds one state product."""
    scheme = scheme_for("ring-linear")
    vols = _volumes(scheme, _shape(w), world)
    t_local = math.ceil(w.seq / world)
    fl = _linear_flops(w, t_local)
    mm = cluster.device.matmul_time
    link = cluster.ring_link(world)
    hops = max(world - 1, 1)
    kv_hop = max(v.fwd.get("exchange", 0) for v in vols) / hops if world > 1 else 0.0
    dkv_hop = (max(v.bwd.get("exchange", 0) for v in vols) - kv_hop * (world - 1)) / world if world > 1 else 0
    step_f = mm(fl["state"]) + mm(fl["apply"])  # M_u of the incoming chunk, then Q_t M_u
    step_b = mm(2 * fl["state"]) + mm(2 * fl["apply"])
    c_intra, b_intra = mm(fl["intra"], calls=4), mm(2 * fl["intra"], calls=8)
    ov = cluster.step_overhead_s
    fwd = c_intra + sum(max(step_f, link.time(kv_hop)) + ov for _ in range(world - 1))
    bwd = b_intra + sum(max(step_b, link.time(kv_hop + dkv_hop)) + ov for _ in range(world - 1))
    if world > 1:
        bwd += link.time(dkv_hop)
    compute = c_intra + b_intra + (world - 1) * (step_f + step_b)
    comm = (world - 1) * (link.time(kv_hop) + link.time(kv_hop + dkv_hop))
    mem = attention_memory("ring-linear", w, world)
    return LayerTime("ring-linear", world, fwd, bwd, compute, comm, int(max(v.total for v in vols)), mem,
                     notes=f"K/V chunk {kv_hop / 2**20:.1f} MiB per hop over {link.name}")


def attention_memory(name: str, w: AttnWorkload, world: int) -> float:
    """Working set of one attention layer per rank in bytes (inputs, outputs, gradients, scheme buffers).

    Local tensors: q, k, v, out and their gradients in the input dtype, lse in
    fp32. Scheme buffers: ring keeps the travelling K/V block twice (current and
    incoming) and the fp32 dK/dV accumulator twice; allgather holds the whole
    sequence's K/V and its fp32 dK/dV; ulysses holds the whole sequence for
    H/W heads; linear schemes hold d x d fp32 states (W of them for lasp2).
    """
    e, d = w.dtype_bytes, w.head_dim
    t = math.ceil(w.seq / world)
    local = t * (2 * w.heads + 2 * w.kv_heads) * d * e * 2 + t * w.heads * 4
    kv_row = 2 * w.kv_heads * d
    state = w.kv_heads * d * d * 4
    base = name.partition(":")[0]
    if base in ("ring", "ring-basic", "ring-linear"):
        return local + t * kv_row * (2 * e + 2 * 4)
    if base == "usp":
        return local + t * kv_row * (2 * e + 2 * 4)
    if base == "allgather":
        return local + w.seq * kv_row * (e + 4)
    if base == "ulysses":
        h = w.heads / world
        hk = max(1.0, w.kv_heads / world)
        return local + w.seq * (2 * h + 2 * hk) * d * e * 2
    if base == "lasp2":
        return local + 2 * world * state
    if base == "lasp1":
        return local + 2 * state
    raise ValueError(f"no memory model for scheme {name!r}")


def check_workload(w: AttnWorkload, world: int) -> None:
    """The workload and world size a model can run, else a ConfigError naming the field and value."""
    from distattn.config import ConfigError
    for key in ("seq", "heads", "kv_heads", "head_dim", "dtype_bytes", "linear_block"):
        v = getattr(w, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key}={v!r}: expected an integer >= 1")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"world={world!r}: expected an integer >= 1")
    if w.heads % w.kv_heads:
        raise ConfigError(f"heads={w.heads} is not a multiple of kv_heads={w.kv_heads}")
    if w.seq < world:
        raise ConfigError(f"seq={w.seq} is smaller than world={world}: every device needs a token")


def layer_time(name: str, w: AttnWorkload, cluster: Cluster, world: int, **opts) -> LayerTime:
    """Forward + backward of one attention layer of scheme ``name`` on ``world`` devices.

    ``rule="gated_delta"`` or ``"kda"`` makes it a delta-rule layer on lasp2 or lasp1
    (`distattn.sim.delta`). Arguments no model can run (and shapes a scheme cannot split) raise ConfigError."""
    from distattn.config import ConfigError
    check_workload(w, world)
    try:
        return _layer_time(name, w, cluster, world, **opts)
    except ConfigError:
        raise
    except ValueError as e:  # a scheme refusing the shape: its message names the numbers
        raise ConfigError(str(e)) from None


def _layer_time(name: str, w: AttnWorkload, cluster: Cluster, world: int, rule: str | None = None,
                **opts) -> LayerTime:
    if rule is not None:  # a delta-rule layer (Gated DeltaNet, Kimi Delta Attention): distattn.sim.delta
        from distattn.sim.delta import delta_layer_time
        return delta_layer_time(name, w, cluster, world, rule, **opts)
    if not isinstance(name, str):
        raise ValueError(f"scheme {name!r}: expected a name from {', '.join(SIM_SCHEMES)} or usp:U")
    base, _, deg = name.partition(":")
    if base == "usp" and deg and not (deg.isdigit() and int(deg) >= 1):
        raise ValueError(f"scheme {name!r}: usp:U needs a ulysses degree U >= 1")
    if name in ("ring", "ring-basic"):
        return _ring(name, w, cluster, world)
    if name == "allgather":
        return _allgather(w, cluster, world)
    if name == "ulysses":
        return _ulysses(w, cluster, world)
    if base == "usp":
        return _usp(name, w, cluster, world)
    if name == "lasp2":
        return _lasp2(w, cluster, world)
    if name == "lasp1":
        return _lasp1(w, cluster, world, **opts)
    if name == "ring-linear":
        return _ring_linear(w, cluster, world)
    raise ValueError(f"no simulator model for scheme {name!r}; choose from {', '.join(SIM_SCHEMES)} or usp:U")
