"""Packing documents into fixed-length samples, and the per-dp-rank stream of them.

See ``distattn.train.data`` for the packing and data-parallel rules.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distattn.train.sources import DataError, DocSource, _u64

STATE_VERSION = 1

__all__ = ["STATE_VERSION", "Batch", "BatchStream"]


@dataclass
class Batch:
    """One packed sample of ``T`` tokens (micro-batch of one sequence, THD layout).

    ``labels[t]`` is the byte after ``tokens[t]``; ``loss_mask[t]`` is 0 where
    ``tokens[t]`` ends its document; ``cu_seqlens`` are the document boundaries
    (``[0, ..., T]``); ``answer_mask[t]`` is 1 where ``labels[t]`` is an answer
    byte of a synthetic task (all zeros otherwise); ``index`` is the sample's
    position in the single-rank stream.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    cu_seqlens: list[int]
    answer_mask: torch.Tensor
    index: int = -1

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_docs(self) -> int:
        return len(self.cu_seqlens) - 1

    def doc_positions(self) -> torch.Tensor:
        """Position of every token inside its document (restarting at 0 at each boundary)."""
        cu = torch.tensor(self.cu_seqlens, dtype=torch.long)
        starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1])
        return torch.arange(self.seq_len, dtype=torch.long) - starts

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.tokens.to(device), self.labels.to(device), self.loss_mask.to(device),
                     list(self.cu_seqlens), self.answer_mask.to(device), self.index)


class BatchStream:
    """An infinite, deterministic stream of packed samples for one dp rank.

    Sample ``i`` of the single-rank stream goes to dp rank ``i % dp_size``.
    ``next_step(grad_accum)`` returns ``grad_accum * micro_batch_size`` samples.
    ``state_dict()`` is identical on every dp rank and restores the exact
    position (also under a different ``dp_size``).
    """

    def __init__(self, source: DocSource, seq_len: int, micro_batch_size: int = 1, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True):
        for name, value, low in (("seq_len", seq_len, 1), ("micro_batch_size", micro_batch_size, 1),
                                 ("dp_size", dp_size, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank must be in [0, {dp_size}), got {dp_rank!r}")
        self.source = source
        self.seq_len = int(seq_len)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._lengths = source.lengths
        self._epoch_tokens = int(self._lengths.sum())
        need = self.seq_len + 1
        if self._epoch_tokens < need:
            raise DataError(f"{source.describe()} has {self._epoch_tokens} bytes in {len(source)} documents, "
                            f"but data.seq_len={self.seq_len} needs at least {need} (one sequence plus the "
                            f"shifted label); add data or lower data.seq_len")
        self._orders: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._served = 0  # samples of the single-rank stream consumed by all dp ranks together

    # positions ---------------------------------------------------------------------
    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative end offsets) of one epoch."""
        hit = self._orders.get(epoch)
        if hit is not None:
            return hit
        n = len(self.source)
        perm = (np.random.default_rng(_u64(self.seed + epoch)).permutation(n) if self.shuffle
                else np.arange(n))
        ends = np.cumsum(self._lengths[perm])
        self._orders[epoch] = (perm, ends)
        while len(self._orders) > 3:
            self._orders.popitem(last=False)
        return perm, ends

    def _where(self, sample: int) -> tuple[int, int]:
        """(epoch, token offset into that epoch) where a sample starts."""
        return divmod(sample * self.seq_len, self._epoch_tokens)

    def _locate(self, epoch: int, pos: int) -> tuple[int, int, int]:
        """(cursor into the epoch's document order, offset inside that document, document id)."""
        perm, ends = self._order(epoch)
        cursor = int(np.searchsorted(ends, pos, side="right"))
        start = int(ends[cursor - 1]) if cursor else 0
        return cursor, pos - start, int(perm[cursor])

    def _pieces(self, epoch: int, pos: int, count: int) -> list[tuple[int, int, int]]:
        """(document id, start, stop) slices covering ``count`` stream tokens from a position."""
        out = []
        while count > 0:
            perm, ends = self._order(epoch)
            cursor = int(np.searchsorted(ends, pos, side="right"))
            while count > 0 and cursor < len(perm):
                doc = int(perm[cursor])
                length = int(self._lengths[doc])
                start = pos - (int(ends[cursor]) - length)
                take = min(length - start, count)
                out.append((doc, start, start + take))
                pos += take
                count -= take
                cursor += 1
            epoch, pos = epoch + 1, 0
        return out

    # samples -----------------------------------------------------------------------
    def _sample(self, index: int) -> Batch:
        T = self.seq_len
        chunk = np.empty(T + 1, dtype=np.int64)
        loss = np.ones(T, dtype=np.float32)
        answer = np.zeros(T, dtype=np.float32)
        cu = [0]
        c = 0
        for doc, start, stop in self._pieces(*self._where(index), T + 1):
            n = stop - start
            chunk[c:c + n] = self.source[doc][start:stop]
            if 0 < c < T:
                cu.append(c)
            if stop == self._lengths[doc] and c + n - 1 < T:
                loss[c + n - 1] = 0.0  # last token of its document: its label is another document's
            if self.source.has_answers:
                for a0, a1 in self.source.answer_spans(doc):
                    # answer byte p is the label of the token before it, inside this piece
                    lo, hi = max(a0, start + 1), min(a1, stop)
                    if lo < hi:
                        t0, t1 = c + lo - start - 1, min(c + hi - start - 1, T)
                        answer[t0:t1] = 1.0
            c += n
        cu.append(T)
        full = torch.from_numpy(chunk)
        return Batch(tokens=full[:T].clone(), labels=full[1:].clone(), loss_mask=torch.from_numpy(loss),
                     cu_seqlens=cu, answer_mask=torch.from_numpy(answer * loss), index=index)

    def sample_at(self, index: int) -> Batch:
        """Sample ``index`` of the single-rank stream, whichever rank owns it (no state change)."""
        return self._sample(int(index))

    def next_sample(self) -> Batch:
        """This rank's next sample."""
        batch = self._sample(self._served + self.dp_rank)
        self._served += self.dp_size
        return batch

    def next_step(self, grad_accum: int = 1) -> list[Batch]:
        """``grad_accum * micro_batch_size`` samples for this rank, in stream order."""
        if isinstance(grad_accum, bool) or not isinstance(grad_accum, (int, np.integer)) or grad_accum < 1:
            raise DataError(f"grad_accum must be an integer >= 1, got {grad_accum!r}")
        return [self.next_sample() for _ in range(int(grad_accum) * self.micro_batch_size)]

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Batch:
        return self.next_sample()

    @property
    def samples_served(self) -> int:
        """Samples of the single-rank stream consumed by all dp ranks together."""
        return self._served

    # state -------------------------------------------------------------------------
    def peek_position(self) -> dict[str, Any]:
        """Where the next step starts (for logs): epoch, document cursor and offset, counts."""
        epoch, pos = self._where(self._served)
        cursor, offset, doc = self._locate(epoch, pos)
        return {"epoch": epoch, "doc_cursor": cursor, "doc_offset": offset, "doc_id": doc,
                "doc_name": self.source.name(doc), "samples_served": self._served,
                "tokens_served": self._served * self.seq_len,
                "epoch_fraction": pos / self._epoch_tokens}

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and strings: the position of the next step, the same on every dp rank."""
        epoch, pos = self._where(self._served)
        cursor, offset, doc = self._locate(epoch, pos)
        return {"version": STATE_VERSION, "epoch": epoch, "doc_cursor": cursor, "doc_offset": offset,
                "doc_id": doc, "samples_served": self._served, "seq_len": self.seq_len, "seed": self.seed,
                "shuffle": self.shuffle, "source": dict(self.source.fingerprint())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken: no sample skipped or repeated."""
        required = ("version", "epoch", "doc_cursor", "doc_offset", "samples_served", "seq_len", "seed",
                    "shuffle", "source")
        missing = [k for k in required if k not in state]
        if missing:
            raise DataError(f"data stream state lacks {', '.join(missing)}; it was not written by "
                            f"BatchStream.state_dict()")
        if state["version"] != STATE_VERSION:
            raise DataError(f"data stream state version {state['version']} is not supported "
                            f"(expected {STATE_VERSION})")
        ours = {"seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle,
                "source": dict(self.source.fingerprint())}
        diffs = [f"{k}: saved {state[k]!r}, now {v!r}" for k, v in ours.items() if state[k] != v]
        if diffs:
            raise DataError("cannot resume the data stream: it was saved for different data ("
                            + "; ".join(diffs) + "); resume with the same data section and run.seed")
        served = int(state["samples_served"])
        if served < 0:
            raise DataError(f"data stream state has samples_served={served}, expected >= 0")
        epoch, pos = self._where(served)
        cursor, offset, doc = self._locate(epoch, pos)
        saved = (int(state["epoch"]), int(state["doc_cursor"]), int(state["doc_offset"]))
        if saved != (epoch, cursor, offset) or int(state.get("doc_id", doc)) != doc:
            raise DataError(f"data stream state is inconsistent: samples_served={served} means epoch {epoch}, "
                            f"document cursor {cursor}, offset {offset}, but it says epoch {saved[0]}, "
                            f"cursor {saved[1]}, offset {saved[2]}")
        self._served = served
