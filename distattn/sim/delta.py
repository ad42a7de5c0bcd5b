"""Delta-rule layers (Gated DeltaNet 'D', Kimi Delta Attention 'K') on a modelled cluster.

Traffic is the delta schemes' own: ``get_scheme(name).comm_bytes(shape, W, rank, rule=...)``, the
formulas the ledger tests check (``schemes/delta.py``: one all-gather of every run's (A, B) maps
forward and of the entering states' gradients backward; ``schemes/delta_ring.py``: one d x d state
per hop). Compute is the FLOP count of the chunked WY algorithm (``kernels/delta.py``; per head, key
and value dim d, chunk C, per chunk of C tokens):

forward   k k^T with its decays, the triangular solve for [U~ | W] (2 C^2 d each); q k^T with
          its decays, P W and P U~ (2 C^2 d each); the chunk maps K^T W and K^T U~ (2 C d^2
          each); the scan S <- A S + B (2 d^3) and the outputs Qe S (2 C d^2):
          10 C^2 d + 6 C d^2 + 2 d^3
backward  the factors rebuilt (the forward's 10 C^2 d + 4 C d^2); the reverse sweep Qe^T dO and
          A^T dS (2 C d^2 + 2 d^3) and dA, dQe (2 d^3 + 2 C d^2); then dP, dU~, dW, dK^ (8 C^2 d
          + 8 C d^2), the solve's backward and dL (6 C^2 d), the two decayed products'
          backward (8 C^2 d) and d beta (2 C^2 d): 34 C^2 d + 16 C d^2 + 4 d^3
KDA       decays per key channel: every decayed product (2 forward, 5 backward) also multiplies by
          its [C, C, d] decays: + 2 C^2 d each

C = 64 (flash-linear-attention's chunk, what runs on GPUs). Under lasp2 each rank also composes
its span's map (4 d^3 per chunk) and the prefix of up to W - 1 maps (4 d^3 each).

Schedules follow the code: lasp2 builds the factors, sends the maps, composes the prefix, then
computes the outputs, so its all-gather is exposed each way; lasp1 passes the state rank to rank,
and a rank's run needs the state its predecessor leaves, which exists only after that rank's whole
run: a chain of W runs and W - 1 hops each way. Without ``sync_every_layer`` the chain pipelines
over ``layers`` consecutive delta layers (a softmax layer's exchange ends the pipeline).
"""
from __future__ import annotations

import math
from dataclasses import replace

from distattn.sim.cluster import Cluster

__all__ = ["DELTA_CHUNK", "RULE_OF_KIND", "delta_flops", "delta_layer_time", "delta_memory"]

DELTA_CHUNK = 64
RULE_OF_KIND = {"D": "gated_delta", "K": "kda"}
RULES = ("gated_delta", "kda")


def delta_flops(rule: str, head_dim: int, chunk: int = DELTA_CHUNK) -> tuple[float, float]:
    """(forward, backward) FLOPs per token and head of the chunked delta rule."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}: the delta rules are {', '.join(RULES)}")
    C, d = chunk, head_dim
    fwd = 10 * C * d + 6 * d * d + 2 * d ** 3 / C
    bwd = 34 * C * d + 16 * d * d + 4 * d ** 3 / C
    if rule == "kda":
        fwd, bwd = fwd + 2 * 2 * C * d, bwd + 5 * 2 * C * d
    return fwd, bwd


def _volumes(scheme, shape, world: int, rule: str) -> list:
    from distattn.sim.model import _sample_ranks
    return [scheme.comm_bytes(shape, world, r, rule=rule) for r in _sample_ranks(world)]


def delta_memory(name: str, w, world: int) -> float:
    """Working set of one delta-rule layer per rank: q, k, v, out and their gradients in the input
    dtype, the fp32 gates and beta, and the d x d fp32 maps (W of them for lasp2, one state for lasp1)."""
    t = math.ceil(w.seq / world)
    hd = w.heads * w.head_dim
    local = t * 4 * hd * w.dtype_bytes * 2 + t * (hd + w.heads) * 4 * 2
    maps = w.heads * 2 * w.head_dim ** 2 * 4
    return local + (2 * world * maps if name == "lasp2" else 2 * maps)


def delta_layer_time(name: str, w, cluster: Cluster, world: int, rule: str, sync_every_layer: bool = True,
                     layers: int = 1):
    """Forward + backward of one delta-rule layer under scheme ``name`` (lasp2 or lasp1)."""
    from distattn.sim.model import LayerTime, _shape, scheme_for
    if name not in ("lasp2", "lasp1"):
        raise ValueError(f"rule={rule!r} runs on schemes lasp2 and lasp1, got {name!r}")
    w = replace(w, kv_heads=w.heads)  # q, k and v share their heads
    scheme = scheme_for(name)
    vols = _volumes(scheme, _shape(w), world, rule)
    t_local = math.ceil(w.seq / world)
    f, b = delta_flops(rule, w.head_dim, DELTA_CHUNK)
    d3 = 4.0 * w.head_dim ** 3 * w.heads
    mm = cluster.device.matmul_time
    c_fwd, c_bwd = mm(f * w.heads * t_local, calls=4), mm(b * w.heads * t_local, calls=8)
    sent = int(max(v.total for v in vols))
    mem = delta_memory(name, w, world)
    if name == "lasp2":
        maps = mm(d3 * math.ceil(t_local / DELTA_CHUNK)) + mm(d3 * (world - 1))  # span map, prefix
        ag_f = cluster.all_gather(max(v.fwd.get("all_gather", 0) for v in vols), world)
        ag_b = cluster.all_gather(max(v.bwd.get("all_gather", 0) for v in vols), world)
        return LayerTime("lasp2", world, c_fwd + maps + ag_f, c_bwd + ag_b, c_fwd + maps + c_bwd, ag_f + ag_b,
                         sent, mem, notes=f"{rule}: one all-gather of (A, B) maps forward, of state "
                                          f"gradients backward, each exposed")
    msg = max(max(v.fwd.get("send", 0), v.bwd.get("send", 0)) for v in vols)
    chain = world - 1
    # hop r -> r+1 crosses a node boundary when r+1 starts a node; each hop pays its own link
    n_inter = sum(1 for r in range(1, world) if r % cluster.gpus_per_node == 0)
    send = (chain - n_inter) * cluster.intra.time(msg) + n_inter * cluster.inter.time(msg) \
        + chain * cluster.step_overhead_s
    if sync_every_layer:  # every layer waits for the whole chain
        fwd, bwd = world * c_fwd + send, world * c_bwd + send
    else:  # wavefront over the consecutive delta layers
        layers = max(layers, 1)
        fwd = c_fwd + (chain * c_fwd + send) / layers
        bwd = c_bwd + (chain * c_bwd + send) / layers
    return LayerTime("lasp1", world, fwd, bwd, c_fwd + c_bwd, 2 * send, sent, mem,
                     notes=f"{rule}: a chain of {world} runs and {chain} hops each way "
                           f"({'every layer' if sync_every_layer else f'pipelined over {layers} layers'})")
