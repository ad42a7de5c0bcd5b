"""Online-softmax merge of partial attention results, in fp32.

Every scheme that splits the keys of a query across blocks (ring steps, all-gather
pieces, CAD tasks) combines the partial `(out, lse)` pairs here. Rows that saw no
key carry lse = -inf and out = 0; merging them is an identity, never a NaN.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def merge_into(out: torch.Tensor, lse: torch.Tensor,
               out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """In place: (out, lse) <- merge((out, lse), (out_b, lse_b)).

    out/out_b: [..., D] (out is fp32), lse/lse_b: [...] fp32, same leading shape.
    """
    lse_b = lse_b.to(torch.float32)
    m = torch.maximum(lse, lse_b)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa = torch.exp(lse - m)
    wb = torch.exp(lse_b - m)
    s = wa + wb
    new_lse = m + torch.log(s)
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    out.mul_((wa * inv).unsqueeze(-1)).add_(out_b.to(torch.float32) * (wb * inv).unsqueeze(-1))
    lse.copy_(new_lse)


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a list of partial results into one fp32 (out, lse)."""
    if not outs:
        raise ValueError("merge_partials needs at least one partial result")
    out = outs[0].to(torch.float32).clone()
    lse = lses[0].to(torch.float32).clone()
    for o, l in zip(outs[1:], lses[1:]):
        merge_into(out, lse, o, l)
    return out, lse
