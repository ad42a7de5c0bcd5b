"""Rank-side helper for the delta-rule CP tests (module level so spawned ranks can import it)."""
from __future__ import annotations

import torch

T, H, DK, DV = 96, 2, 8, 8
CU = [0, 37, 70, 96]  # three documents of odd lengths


def inputs(rule: str, seed: int = 0):
    """fp64 q, k (L2-normalised rows), v, gate in (0.5, 1), beta in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, DK, dtype=torch.float64, generator=g)
    k = torch.nn.functional.normalize(torch.randn(T, H, DK, dtype=torch.float64, generator=g), dim=-1)
    v = torch.randn(T, H, DV, dtype=torch.float64, generator=g)
    shape = (T, H, DK) if rule == "kda" else (T, H)
    gate = 0.5 + 0.5 * torch.rand(*shape, dtype=torch.float64, generator=g)
    beta = torch.rand(T, H, dtype=torch.float64, generator=g)
    do = torch.randn(T, H, DV, dtype=torch.float64, generator=g)
    return q, k, v, gate, beta, do


def delta_cp_errors(layout: str, rule: str):
    """LASP-2 (one all-gather of affine maps) on this rank: see `delta_scheme_errors`."""
    return delta_scheme_errors("lasp2", layout, rule)


def delta_ring_errors(rule: str, cu=CU):
    """LASP-1 (the state hops rank to rank) on this rank, contiguous layout: see `delta_scheme_errors`."""
    return delta_scheme_errors("lasp1", "contiguous", rule, cu)


def delta_scheme_errors(scheme_name: str, layout: str, rule: str, cu=CU):
    """This rank's fp32 CP output and five gradients vs the fp64 sequential recurrence (relative errors),
    and the ledger's bytes sent per phase against the scheme's comm_bytes."""
    import torch.distributed as dist

    import distattn
    from distattn.comm import CommLedger
    from distattn.kernels.delta import delta_rule_reference
    from distattn.schemes.base import AttnShape
    q, k, v, gate, beta, do = inputs(rule)
    full = [x.clone().requires_grad_() for x in (q, k, v, gate, beta)]
    o_ref, _ = delta_rule_reference(*full, cu_seqlens=cu)
    refs = [o_ref.detach()] + list(torch.autograd.grad(o_ref, full, do))
    scheme = distattn.get_scheme(scheme_name, layout_name=layout)

    def mine(x):
        return distattn.shard(x.float(), scheme=scheme, cu_seqlens=cu)
    loc = [mine(x).requires_grad_() for x in (q, k, v, gate, beta)]
    ledger = CommLedger()
    out = distattn.linear_attention(*loc[:3], scheme=scheme, cu_seqlens=cu, rule=rule, gate=loc[3],
                                    beta=loc[4], ledger=ledger, n_tokens=T)
    got = [out.detach()] + list(torch.autograd.grad(out, loc, mine(do)))
    errs = [float((g - mine(r)).norm() / mine(r).norm()) for g, r in zip(got, refs)]
    expect = scheme.comm_bytes(AttnShape(T, H, H, DK, 4, tuple(cu)), dist.get_world_size(), dist.get_rank(),
                               rule=rule)
    sent = {tag: {op: s.bytes_sent for op, s in ledger.summary(tag).items()} for tag in ("fwd", "bwd")}
    return errs, sent, {"fwd": expect.fwd, "bwd": expect.bwd}
