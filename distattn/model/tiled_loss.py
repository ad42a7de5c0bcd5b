"""Output projection and cross-entropy over token tiles: no `[T, vocab]` tensor ever exists.

At long context the logits are the largest tensor of a training step: 1M tokens
x a 128K vocabulary in fp32 is 512 GB. Here the loss of each tile of tokens is
computed from the final hidden states and the output weight, and, since the
loss is a scalar, its gradients are formed in the same pass (the logits'
gradient is `softmax - onehot`, known once the tile's log-sum-exp is): the
backward only scales them by the incoming gradient. So there are as many
matmuls as in the untiled forward and backward, and at most one tile of logits
lives at a time.

Numerics follow the untiled path `cross_entropy((h @ W.T).float(), y)`: the
projection runs in the input dtype, softmax and log-sum-exp in fp32, the
logits' gradient is cast back to the input dtype before the two backward
matmuls, and the weight gradient is accumulated over tiles in fp32.
"""
from __future__ import annotations

import torch
from torch import Tensor


class _TiledLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, scale: Tensor, tile: int) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], tile):
            end = min(start + tile, hidden.shape[0])
            h, y, s = hidden[start:end], labels[start:end], scale[start:end].float()
            logits = (h @ weight.t()).float()                       # [tile, V]
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, y[:, None]).squeeze(1)
            total += ((lse - picked) * s).sum()
            if need_h or need_w:
                grad = torch.softmax(logits, dim=-1)                # d loss_t / d logits, per unit scale
                grad.scatter_add_(1, y[:, None], -torch.ones_like(picked)[:, None])
                grad.mul_(s[:, None])
                grad = grad.to(hidden.dtype)
                if need_h:
                    dh[start:end] = grad @ weight
                if need_w:
                    dw += (grad.t() @ h).float()
            del logits
        ctx.w_dtype = weight.dtype
        ctx.save_for_backward(dh if need_h else None, dw if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        dh, dw = ctx.saved_tensors
        g = grad_out.float()
        gh = (dh.float() * g).to(dh.dtype) if dh is not None else None
        gw = (dw * g).to(ctx.w_dtype) if dw is not None else None
        return gh, gw, None, None, None


def tiled_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, scale: Tensor,
                               tile: int) -> Tensor:
    """sum_t scale_t * CE(hidden_t @ weight.T, labels_t), one tile of `tile` tokens at a time.

    hidden [T, H], weight [V, H] (the output layer's), labels [T] (int64), scale [T]
    (the loss mask divided by the step's loss-token count, as the trainer uses it).
    The weight gradient is accumulated in fp32 and cast to the weight's dtype.
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1 tokens, got {tile}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [T, H] and weight [V, H] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1] or scale.shape != hidden.shape[:1]:
        raise ValueError(f"labels and scale must be [T] = [{hidden.shape[0]}], got {tuple(labels.shape)} "
                         f"and {tuple(scale.shape)}")
    return _TiledLinearCrossEntropy.apply(hidden, weight, labels, scale, int(tile))


__all__ = ["tiled_linear_cross_entropy"]
