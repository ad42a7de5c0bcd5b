"""The dp-rank view of the balanced packer: ``BalancedBatchStream`` builds this rank's micro-batches
from the global plan (``distattn.sched.packer``), a drop-in for the trainer's ``BatchStream``."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distattn.sched.packer import BalancedPacker, Piece, StepPlan

__all__ = ["BalancedBatchStream", "build_balanced_stream"]


class BalancedBatchStream:
    """Drop-in for ``BatchStream`` (``next_step``, ``state_dict``, ``load_state_dict``).

    Every dp rank runs the same global plan and keeps its own micro-batches. A
    sequence holds whole pieces (cut only where a document exceeds ``seq_len``);
    the label of a piece's last token is the document's next byte when there is
    one (loss 1), else the token ends its document (loss 0). Padding follows the
    pieces up to ``seq_len`` as documents of at most ``pad_chunk`` zero tokens,
    loss 0.
    """

    def __init__(self, source, seq_len: int, micro_batch_size: int = 1, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True, linear_cost: float = 0.0, max_defer: int = 0,
                 pad_chunk: int = 64):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank!r}")
        self.source = source
        self.seq_len = int(seq_len)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.pad_chunk = max(1, int(pad_chunk))
        self.packer = BalancedPacker(source.lengths, seq_len, seed=seed, shuffle=shuffle,
                                     linear_cost=linear_cost, max_defer=max_defer)
        self.last_plan: StepPlan | None = None

    def _sequence(self, pieces: list[Piece], index: int):
        from distattn.train.data import Batch
        T = self.seq_len
        tokens = np.zeros(T, dtype=np.int64)
        labels = np.zeros(T, dtype=np.int64)
        loss = np.zeros(T, dtype=np.float32)
        answer = np.zeros(T, dtype=np.float32)
        cu = [0]
        c = 0
        for p in pieces:
            doc = self.source[p.doc]
            L, n = doc.shape[0], p.length
            tokens[c:c + n] = doc[p.start:p.stop]
            nxt = min(p.stop + 1, L)
            labels[c:c + nxt - p.start - 1] = doc[p.start + 1:nxt]
            loss[c:c + n] = 1.0
            if p.stop == L:
                loss[c + n - 1] = 0.0  # last token of its document: nothing to predict
            if self.source.has_answers:
                for a0, a1 in self.source.answer_spans(p.doc):
                    lo, hi = max(a0, p.start + 1), min(a1, p.stop + 1, L)
                    if lo < hi:
                        answer[c + lo - p.start - 1:c + hi - p.start - 1] = 1.0
            c += n
            cu.append(c)
        while c < T:
            c = min(T, c + self.pad_chunk)
            cu.append(c)
        return Batch(tokens=torch.from_numpy(tokens), labels=torch.from_numpy(labels),
                     loss_mask=torch.from_numpy(loss), cu_seqlens=cu,
                     answer_mask=torch.from_numpy(answer * loss), index=index)

    def next_step(self, grad_accum: int = 1) -> list:
        micro = int(grad_accum) * self.micro_batch_size
        if micro < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum!r}")
        step = self.packer.steps
        plan = self.packer.plan(self.dp_size, micro)
        self.last_plan = plan
        base = (step * self.dp_size + self.dp_rank) * micro
        return [self._sequence(b, base + m) for m, b in enumerate(plan.bins[self.dp_rank])]

    def state_dict(self) -> dict[str, Any]:
        return {"balanced": self.packer.state_dict(), "source": dict(self.source.fingerprint())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "balanced" not in state:
            raise ValueError("data stream state was not written by the balanced packer "
                             "(data.balance=attention); resume with the data.balance it was saved with")
        if state.get("source") != dict(self.source.fingerprint()):
            raise ValueError(f"cannot resume: saved for data {state.get('source')!r}, "
                             f"now {self.source.fingerprint()!r}")
        self.packer.load_state_dict(state["balanced"])


def build_balanced_stream(data_cfg, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                          linear_cost: float = 0.0, vocab_size: int | None = None) -> BalancedBatchStream:
    """The ``data.balance=attention`` stream of this dp rank (token ids checked against `vocab_size`)."""
    from distattn.train.data import build_source
    source = build_source(data_cfg, seed=seed) if vocab_size is None else \
        build_source(data_cfg, seed=seed, vocab_size=vocab_size)
    return BalancedBatchStream(source, data_cfg.seq_len, data_cfg.micro_batch_size, dp_rank, dp_size, seed,
                               linear_cost=linear_cost, max_defer=getattr(data_cfg, "balance_max_defer", 0))
