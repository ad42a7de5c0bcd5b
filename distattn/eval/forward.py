"""One sequence through a trainer's model and CP scheme, without gradients: this rank's part.

Evaluation goes through the configured scheme, like training, so it reaches
lengths one rank cannot hold: every cp rank of a dp group gets the same whole
sequence, keeps its layout's tokens and returns per-token losses and argmax
predictions for them, with the global index and document position of each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LocalResult:
    index: torch.Tensor      # global token index of each local row
    position: torch.Tensor   # position of the token inside its document
    loss: torch.Tensor       # cross-entropy of predicting labels[index] (fp32; 0 where masked)
    mask: torch.Tensor       # 1 where the loss counts
    correct: torch.Tensor    # argmax prediction == label


def forward_local(tr, tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                  cu_seqlens: list[int]) -> LocalResult:
    """The local rows of one whole sequence (tokens, labels, mask [N]) through `tr`'s model."""
    n = int(tokens.numel())
    lay = tr.softmax_scheme.layout(n, tr.cfg.parallel.cp, cu_seqlens)
    idx, pos = lay.indices(tr.cp_rank), lay.positions(tr.cp_rank)
    model = tr.engine.module if tr.engine is not None else tr.model
    was_training = model.training
    model.eval()
    tr.ctx.set_batch(cu_seqlens, pos, n)
    try:
        with torch.no_grad():
            logits = model(tokens[idx][None], pos[None], None)[0].float()
            if getattr(tr, "tp_comm", None) is not None:  # vocabulary shards of tp ranks, in rank order
                logits = torch.cat(list(tr.tp_comm.all_gather(logits)), dim=-1)
    finally:
        model.train(was_training)
    y, m = labels[idx], mask[idx].float()
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="none") * m
    return LocalResult(index=idx, position=pos, loss=loss, mask=m, correct=logits.argmax(-1) == y)


def sequence_of(doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """A one-document sequence: tokens = the document, labels = the next token (the last one masked)."""
    doc = torch.as_tensor(doc, dtype=torch.long)
    labels = torch.cat([doc[1:], doc[:1]])
    mask = torch.ones_like(doc)
    mask[-1] = 0
    return doc, labels, mask, [0, int(doc.numel())]


__all__ = ["LocalResult", "forward_local", "sequence_of"]
