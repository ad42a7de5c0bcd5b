"""Rank-side helpers for the Gated DeltaNet layer tests (module level so spawned ranks can import them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

C = 5  # channels of the convolution tests
# (tokens, documents): odd lengths; the short one gives zigzag runs of 2 and 1 tokens at W = 4
CASES = [(96, [0, 37, 70, 96]), (22, [0, 7, 15, 22])]


def conv_inputs(n: int, seed: int = 0):
    """fp64 x [n, C], weight [C, 4], output gradient [n, C]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, C, dtype=torch.float64, generator=g),
            torch.randn(C, 4, dtype=torch.float64, generator=g),
            torch.randn(n, C, dtype=torch.float64, generator=g))


def conv_reference(x: torch.Tensor, w: torch.Tensor, cu: list[int]) -> torch.Tensor:
    """Causal depthwise convolution of every document on its own (torch's conv1d, zeros before it)."""
    outs = []
    for a, b in zip(cu, cu[1:]):
        seg = x[a:b].T.unsqueeze(0)
        outs.append(F.conv1d(seg, w.unsqueeze(1), padding=w.shape[1] - 1, groups=x.shape[1])[0, :, :b - a].T)
    return torch.cat(outs)


def conv_cp(layout: str):
    """Per case: this rank's output, dx and dweight next to the reference's shards, the ledger's
    (op, calls, bytes sent) per direction and the bytes `halo_comm_bytes` predicts."""
    import torch.distributed as dist

    from distattn.comm import Comm, CommLedger
    from distattn.layout import get_layout
    from distattn.model.conv_halo import causal_conv_with_halo, halo_comm_bytes
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for n, cu in CASES:
        x, w, dout = conv_inputs(n)
        xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref = conv_reference(xf, wf, cu)
        dx_ref, dw_ref = torch.autograd.grad(ref, (xf, wf), dout)
        lay = get_layout(layout, n, world, cu)
        runs = [lay.runs(r) for r in range(world)]
        ledger = CommLedger()
        xl, wl = lay.shard(x, rank).requires_grad_(), w.clone().requires_grad_()
        out = causal_conv_with_halo(xl, wl, runs, rank, Comm(None, ledger))
        dx, dw = torch.autograd.grad(out, (xl, wl), lay.shard(dout, rank))
        comm = {tag: {op: (s.calls, s.bytes_sent) for op, s in ledger.summary(tag).items()}
                for tag in ("fwd", "bwd")}
        results.append({"out": (out.detach(), lay.shard(ref.detach(), rank)),
                        "dx": (dx, lay.shard(dx_ref, rank)), "dw": dw, "dw_ref": dw_ref, "comm": comm,
                        "expect": halo_comm_bytes(runs, C, 8)})
    return results
