"""Rank-side helpers for CAD tests (module level so spawned ranks can import them)."""
from __future__ import annotations

import torch

import distattn
from distattn.comm import CommLedger
from distattn.schemes.base import AttnShape
from schemes_util import DTYPES, full_inputs


def run_cad(opts, n, h, hkv, d, dtype_name, cu, causal=True, seed=0, until_stop=False):
    """Forward + backward of the cad scheme on every rank; servers (if any) run the serve loop.

    Returns per rank: its role, global indices of its rows, out/grads (trainers),
    the ledger's bytes per tag and the scheme's comm_bytes for this rank.
    """
    import torch.distributed as dist

    from distattn.cad.server import serve, stop_servers
    scheme = distattn.get_scheme("cad", **opts)
    dtype = DTYPES[dtype_name]
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    roles = scheme.roles(world)
    ledger = CommLedger()
    res: dict = {}
    if rank in roles.servers and rank not in roles.sources:
        res["passes"] = serve(scheme, group, passes=None if until_stop else 2, ledger=ledger)
        res["role"] = "server"
    else:
        q, k, v, dout = full_inputs(n, h, hkv, d, dtype, seed)
        lay = scheme.layout(n, len(roles.sources), cu)
        me = roles.sources.index(rank)
        ql, kl, vl, dl = (lay.shard(x, me) for x in (q, k, v, dout))
        ql, kl, vl = (x.requires_grad_(True) for x in (ql, kl, vl))
        out = distattn.attention(ql, kl, vl, scheme=scheme, group=group, cu_seqlens=cu, causal=causal,
                                 ledger=ledger, n_tokens=n)
        out.backward(dl)
        if until_stop:
            stop_servers(scheme, group, ledger=CommLedger())  # not counted: comm_bytes has no stop
        res.update(role="trainer", idx=lay.indices(me), out=out.detach(), dq=ql.grad, dk=kl.grad,
                   dv=vl.grad, dtype_out=str(out.dtype), imbalance=scheme.last_imbalance)
    expect = scheme.comm_bytes(AttnShape(n, h, hkv, d, torch.empty((), dtype=dtype).element_size(),
                                         tuple(cu) if cu else None), world, rank)
    res["ledger"] = {tag: {op: s.bytes_sent for op, s in ledger.summary(tag).items()}
                     for tag in ("fwd", "bwd")}
    res["expect"] = {"fwd": expect.fwd, "bwd": expect.bwd}
    return res
