"""Dense single-device reference attention: the ground truth every test compares to.

Plain fp32 math with an explicit document + causal mask, autograd for gradients.
Memory is O(T^2): for tests and small checks only.
"""
from __future__ import annotations

import math

import torch


def document_mask(n_tokens: int, cu_seqlens=None, causal: bool = True, device=None) -> torch.Tensor:
    """[T, T] bool: query i may attend key j."""
    idx = torch.arange(n_tokens, device=device)
    if cu_seqlens is None:
        doc = torch.zeros(n_tokens, dtype=torch.long, device=device)
    else:
        cu = torch.as_tensor(list(cu_seqlens), dtype=torch.long, device=device)
        doc = torch.searchsorted(cu[1:], idx, right=True)
    mask = doc[:, None] == doc[None, :]
    if causal:
        mask &= idx[None, :] <= idx[:, None]
    return mask


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens=None,
                        causal: bool = True, softmax_scale: float | None = None,
                        return_lse: bool = False):
    """softmax(q k^T * scale + mask) v over the whole packed sequence, in fp32.

    q [T, H, D]; k, v [T, Hkv, D] with H % Hkv == 0 (GQA). Output is fp32.
    Rows with no visible key (impossible with a causal mask) give 0.
    """
    mask = document_mask(q.shape[0], cu_seqlens, causal, device=q.device)
    out, lse = masked_attention(q, k, v, mask, softmax_scale)
    return (out, lse.t()) if return_lse else out


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     softmax_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fp32 softmax attention under a boolean mask ([T, T], or [H, T, T] per head).

    Returns out [T, H, D] and lse [H, T]; rows with no visible key give 0 (lse -inf).
    """
    t, h, d = q.shape
    hkv = k.shape[1]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    qf, kf, vf = (x.to(torch.float32) for x in (q, k, v))
    if hkv != h:
        kf = kf.repeat_interleave(h // hkv, dim=1)
        vf = vf.repeat_interleave(h // hkv, dim=1)
    s = torch.einsum("thd,shd->hts", qf, kf) * scale
    s = s.masked_fill(~mask.to(s.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [H, T]
    p = torch.exp(s - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)[..., None])
    return torch.einsum("hts,shd->thd", p, vf), lse
