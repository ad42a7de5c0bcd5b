"""The trainer's tensor-parallel pieces: the loss over a vocabulary split over tp, and the gradient norm.

Under tp the model stops at the final norm and the output projection with the
cross-entropy runs here, on this rank's vocabulary shard of the output weight
(`tiled_linear_cross_entropy` with a `VocabShard`): the `[T, vocab]` logits are
never gathered. The hidden states enter through megatron's copy region (all
tokens on every tp rank) or, with sequence parallelism, its sequence gather;
either one's backward sums the shards' gradient parts over tp.
"""
from __future__ import annotations

import math

import torch


def tp_loss(model, tokens, labels, mask, pos, denom: float, tile: int, tp_comm, sequence_parallel: bool):
    """This micro-batch's share of the step loss under tensor parallelism (every tp rank gets it)."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
    )

    from distattn.model.tiled_loss import VocabShard, tiled_linear_cross_entropy
    model.post_process = False  # megatron returns the final hidden states [s, 1, h] (s/tp with SP)
    try:
        hidden = model(tokens[None], pos[None], None)
    finally:
        model.post_process = True
    group = tp_comm.group
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=group)
    else:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=group)
    weight = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
              else model.output_layer.weight)
    vocab = VocabShard(tp_comm, tp_comm.rank * weight.shape[0])
    n = hidden.shape[0]
    return tiled_linear_cross_entropy(hidden[:, 0], weight, labels, mask.float() / denom, tile or n, vocab)


def clip_tp_grads(params, names, tp_comm, clip: float) -> float:
    """The global gradient norm over tp-split and whole weights (a whole one counted once), then clipping.

    The gradients are already summed over dp x cp, so they are the same on every
    rank of this tp index; the norm's square is summed over the tp group.
    """
    from distattn.model.tp_weights import split_of
    sq = torch.zeros((), dtype=torch.float32)
    for name, q in zip(names, params):
        if q.grad is not None and (tp_comm.rank == 0 or split_of(name) is not None):
            sq += q.grad.float().square().sum()
    tp_comm.all_reduce(sq, op="sum")
    norm = float(sq.sqrt())
    if clip > 0 and math.isfinite(norm):
        coef = clip / (norm + 1e-6)
        if coef < 1.0:
            for q in params:
                if q.grad is not None:
                    q.grad.mul_(coef)
    return norm


__all__ = ["clip_tp_grads", "tp_loss"]
