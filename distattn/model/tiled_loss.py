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


def _tile_stats(logits: Tensor, y: Tensor, vocab: "VocabShard | None"):
    """(lse, picked logit, softmax) of one tile; over the tp ranks' vocabulary shards when `vocab`."""
    if vocab is None:
        lse = torch.logsumexp(logits, dim=-1)
        return lse, logits.gather(1, y[:, None]).squeeze(1), lambda: torch.softmax(logits, dim=-1), y
    # the row maximum, then the sum of exponentials and the label's logit, each over the shards
    m = logits.max(dim=-1).values
    vocab.comm.all_reduce(m, op="max")
    local = y - vocab.start
    mine = (local >= 0) & (local < logits.shape[1])
    local = torch.where(mine, local, torch.zeros_like(local))
    picked = torch.where(mine, logits.gather(1, local[:, None]).squeeze(1), torch.zeros_like(m))
    both = torch.stack([torch.exp(logits - m[:, None]).sum(-1), picked])
    vocab.comm.all_reduce(both, op="sum")
    lse = m + torch.log(both[0])
    onehot_at = torch.where(mine, local, torch.full_like(local, -1))
    return lse, both[1], lambda: torch.exp(logits - lse[:, None]), onehot_at


class VocabShard:
    """This rank's slice [start, start + V/tp) of a vocabulary split over a tp group (a `Comm`)."""

    def __init__(self, comm, start: int):
        self.comm, self.start = comm, int(start)


class _TiledLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, scale: Tensor, tile: int,
                vocab: "VocabShard | None" = None) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], tile):
            end = min(start + tile, hidden.shape[0])
            h, y, s = hidden[start:end], labels[start:end], scale[start:end].float()
            logits = (h @ weight.t()).float()                       # [tile, V] (V/tp with a vocab shard)
            lse, picked, softmax, at = _tile_stats(logits, y, vocab)
            total += ((lse - picked) * s).sum()
            if need_h or need_w:
                grad = softmax()                                    # d loss_t / d logits, per unit scale
                hit = at >= 0
                rows = torch.arange(len(at), device=at.device)[hit]
                grad[rows, at[hit]] -= 1.0
                grad.mul_(s[:, None])
                grad = grad.to(hidden.dtype)
                if need_h:
                    dh[start:end] = grad @ weight
                if need_w:
                    dw += (grad.t() @ h).float()
            del logits, softmax  # the closure holds the tile's logits too
        ctx.w_dtype = weight.dtype
        ctx.save_for_backward(dh if need_h else None, dw if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        dh, dw = ctx.saved_tensors
        g = grad_out.float()
        gh = (dh.float() * g).to(dh.dtype) if dh is not None else None
        gw = (dw * g).to(ctx.w_dtype) if dw is not None else None
        return gh, gw, None, None, None, None


def tiled_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, scale: Tensor,
                               tile: int, vocab: VocabShard | None = None) -> Tensor:
    """sum_t scale_t * CE(hidden_t @ weight.T, labels_t), one tile of `tile` tokens at a time.

    hidden [T, H], weight [V, H] (the output layer's), labels [T] (int64), scale [T]
    (the loss mask divided by the step's loss-token count, as the trainer uses it).
    The weight gradient is accumulated in fp32 and cast to the weight's dtype.

    With tensor parallelism, `weight` is this rank's vocabulary shard and `vocab` says
    where it starts: the log-sum-exp and the label's logit are reduced over the tp
    group per tile (a max and one sum of two floats per token), every rank returns
    the same loss, and the hidden states' gradient is this shard's part; the caller
    sums the parts over tp (megatron's copy/gather region does, in its backward).
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1 tokens, got {tile}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [T, H] and weight [V, H] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1] or scale.shape != hidden.shape[:1]:
        raise ValueError(f"labels and scale must be [T] = [{hidden.shape[0]}], got {tuple(labels.shape)} "
                         f"and {tuple(scale.shape)}")
    return _TiledLinearCrossEntropy.apply(hidden, weight, labels, scale, int(tile), vocab)


__all__ = ["VocabShard", "tiled_linear_cross_entropy"]
