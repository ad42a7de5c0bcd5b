"""Rank-side helpers for scheme tests (module level so spawned ranks can import them)."""
from __future__ import annotations

import torch

import distattn
from distattn.comm import CommLedger
from distattn.schemes.base import AttnShape

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def full_inputs(n, h, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, h, d, generator=g).to(dtype)
    k = torch.randn(n, hkv, d, generator=g).to(dtype)
    v = torch.randn(n, hkv, d, generator=g).to(dtype)
    dout = torch.randn(n, h, d, generator=g).to(dtype)
    return q, k, v, dout


def run_scheme(spec, n, h, hkv, d, dtype_name, cu, causal, seed=0):
    """On each rank: shard, attention fwd+bwd; return local results, indices and ledger."""
    import torch.distributed as dist
    name, opts = spec
    scheme = distattn.get_scheme(name, **opts)
    dtype = DTYPES[dtype_name]
    q, k, v, dout = full_inputs(n, h, hkv, d, dtype, seed)
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    lay = scheme.layout(n, world, cu)
    ql, kl, vl, dl = (distattn.shard(x, scheme=scheme, group=group, cu_seqlens=cu) for x in (q, k, v, dout))
    ql, kl, vl = (x.requires_grad_(True) for x in (ql, kl, vl))
    ledger = CommLedger()
    out = distattn.attention(ql, kl, vl, scheme=scheme, group=group, cu_seqlens=cu, causal=causal,
                             ledger=ledger, n_tokens=n)
    out.backward(dl)
    expect = scheme.comm_bytes(AttnShape(n, h, hkv, d, q.element_size(), tuple(cu) if cu else None),
                               world, rank)
    got = {tag: {op: s.bytes_sent for op, s in ledger.summary(tag).items()} for tag in ("fwd", "bwd")}
    return dict(idx=lay.indices(rank), out=out.detach(), dq=ql.grad, dk=kl.grad, dv=vl.grad,
                ledger=got, expect={"fwd": expect.fwd, "bwd": expect.bwd},
                dtype_out=str(out.dtype))


def run_causality(spec, n, h, hkv, d, cu, cut):
    """Outputs for the original input and one whose tokens >= cut were changed."""
    import torch.distributed as dist
    name, opts = spec
    scheme = distattn.get_scheme(name, **opts)
    group = dist.group.WORLD
    rank = dist.get_rank()
    lay = scheme.layout(n, dist.get_world_size(), cu)
    outs = []
    for perturb in (False, True):
        q, k, v, _ = full_inputs(n, h, hkv, d, torch.float32)
        if perturb:
            for x in (q, k, v):
                x[cut:] = torch.randn_like(x[cut:]) * 3
        ql, kl, vl = (distattn.shard(x, scheme=scheme, group=group, cu_seqlens=cu) for x in (q, k, v))
        outs.append(distattn.attention(ql, kl, vl, scheme=scheme, group=group, cu_seqlens=cu,
                                       n_tokens=n))
    return lay.indices(rank), outs[0], outs[1]
