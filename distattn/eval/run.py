"""What `distattn eval` computes on every rank: loss by position and the retrieval grid.

Sequences are dealt to dp ranks round-robin; the cp ranks of a dp group run each
one through the scheme together. Sums are all-reduced over the trainer ranks
through the ledger, so rank 0 ends with the totals.
"""
from __future__ import annotations

import torch

from distattn.comm import Comm
from distattn.eval.forward import forward_local, sequence_of
from distattn.eval.probes import VALUE_LEN, probe


def _curve_sequences(tr, length: int):
    """Held-out sequences of `length` tokens: probe-task documents, or the data section's (eval.seed)."""
    e = tr.cfg.eval
    if e.curve_data == "task":
        for i in range(e.curve_sequences):
            depth = (i + 0.5) / e.curve_sequences
            doc, _ = probe(e.task, length, depth, trial=10_000 + i, seed=e.seed)
            yield sequence_of(torch.from_numpy(doc))
        return
    from distattn.train.data import build_stream
    data = tr.cfg.data.model_copy(update={"seq_len": length, "micro_batch_size": 1})
    stream = build_stream(data, 0, 1, e.seed, vocab_size=tr.cfg.model.vocab_size)
    for _ in range(e.curve_sequences):
        b = stream.next_step(1)[0]
        yield b.tokens, b.labels, b.loss_mask, list(b.cu_seqlens)


def position_curve(tr, comm: Comm) -> dict:
    """Mean loss per position bucket (position inside the document) over the held-out sequences."""
    e = tr.cfg.eval
    length = e.curve_length or tr.cfg.data.seq_len
    sums = torch.zeros(e.buckets, dtype=torch.float64)
    counts = torch.zeros(e.buckets, dtype=torch.float64)
    for i, (tokens, labels, mask, cu) in enumerate(_curve_sequences(tr, length)):
        if i % tr.cfg.parallel.dp != tr.dp_rank:
            continue
        r = forward_local(tr, tokens, labels, mask, cu)
        bucket = (r.position * e.buckets // length).clamp(max=e.buckets - 1)
        sums.index_add_(0, bucket, r.loss.double())
        counts.index_add_(0, bucket, r.mask.double())
    comm.all_reduce(sums, op="sum")
    comm.all_reduce(counts, op="sum")
    width = length / e.buckets
    return {"length": length, "starts": [int(round(b * width)) for b in range(e.buckets)],
            "loss": [float(s / c) if c > 0 else float("nan") for s, c in zip(sums, counts)],
            "tokens": [int(c) for c in counts]}


def retrieval_grid(tr, comm: Comm) -> dict:
    """Accuracy per (length, depth): a probe counts when every answer token is the argmax prediction."""
    e = tr.cfg.eval
    cells = [(L, d) for L in e.lengths for d in e.depths]
    hits = torch.zeros(len(cells), e.trials, dtype=torch.float64)  # correct answer tokens per probe
    k = 0
    for c, (length, depth) in enumerate(cells):
        for t in range(e.trials):
            k += 1
            if (k - 1) % tr.cfg.parallel.dp != tr.dp_rank:
                continue
            doc, answer = probe(e.task, length, depth, trial=t, seed=e.seed)
            r = forward_local(tr, *sequence_of(torch.from_numpy(doc)))
            rows = (r.index >= answer - 1) & (r.index < answer - 1 + VALUE_LEN)  # predicting the answer
            hits[c, t] = float(r.correct[rows].sum())
    comm.all_reduce(hits, op="sum")
    solved = (hits >= VALUE_LEN).double().mean(dim=1)
    return {"task": e.task, "lengths": list(e.lengths), "depths": list(e.depths), "trials": e.trials,
            "accuracy": [[float(solved[i * len(e.depths) + j]) for j in range(len(e.depths))]
                         for i in range(len(e.lengths))]}


def eval_on_rank(cfg_dict: dict, checkpoint: str) -> dict | None:
    """One rank of `distattn eval`: the model from `checkpoint`, the curve and the grid (rank 0 returns)."""
    import torch.distributed as dist

    from distattn.config import Config
    from distattn.train import quiet
    from distattn.train.trainer import Trainer
    quiet.install()
    cfg = Config.model_validate(cfg_dict)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": checkpoint})})
    tr = Trainer(cfg, quiet=True)
    comm = Comm(tr.mesh.trainer_group, tr.ledger)
    try:
        out = {"curve": position_curve(tr, comm), "grid": retrieval_grid(tr, comm)}
    finally:
        tr.mesh.destroy()
    return out if dist.get_rank() == 0 else None


def validation_loss(tr) -> float:
    """Mean loss over eval.val_sequences held-out sequences of data.seq_len (train.eval_every)."""
    e = tr.cfg.eval
    comm = Comm(tr.mesh.trainer_group, tr.ledger)
    if getattr(tr, "_val_batches", None) is None:
        from distattn.train.data import build_stream
        # synthetic data: another seed's documents, held out by construction; file sources: the same
        # files in eval.seed's order (not a split: train on other files for a held-out validation set)
        data = tr.cfg.data.model_copy(update={"micro_batch_size": 1})
        stream = build_stream(data, 0, 1, e.seed, vocab_size=tr.cfg.model.vocab_size)
        tr._val_batches = [stream.next_step(1)[0] for _ in range(e.val_sequences)]
    total = torch.zeros(2, dtype=torch.float64)
    for i, b in enumerate(tr._val_batches):
        if i % tr.cfg.parallel.dp != tr.dp_rank:
            continue
        r = forward_local(tr, b.tokens, b.labels, b.loss_mask, list(b.cu_seqlens))
        total += torch.tensor([float(r.loss.sum()), float(r.mask.sum())], dtype=torch.float64)
    comm.all_reduce(total, op="sum")
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


__all__ = ["eval_on_rank", "position_curve", "retrieval_grid", "validation_loss"]
