"""Synthetic long-context tasks (associative recall, needle) whose answer lies far back.

Where the answer goes decides what a run can promise: see ``min_answer_distance``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from distattn.train.sources import DataError, DocSource, _bytes_doc, _u64

__all__ = ["SyntheticSource"]


# Filler for the needle task: lowercase words, no digits and no word "secret".
_FILLER_WORDS = (
    "the a of and to in is was on for with as by at from that this it his her their our an be are were "
    "river stone garden window morning evening quiet bright slowly across under over near city road house "
    "light water tree field cloud summer winter green old new small large long short warm cold people "
    "walked looked found kept told made went came saw said little great open closed along behind"
).split()
_ALNUM = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", dtype=np.uint8)


class SyntheticSource(DocSource):
    """Long-context tasks; every document is exactly ``seq_len`` bytes, one per sample.

    ``recall``: ``key:value;`` pairs of random strings over ``[a-z0-9]`` (keys
    unique within a document), then ``?key=value\\n`` asking for a pair that
    starts in the first half. ``needle``: filler sentences with
    ``the secret is NNNN. `` planted in the first half, then
    ``\\nQ: what is the secret? A: NNNN\\n``. The answer (``value`` / ``NNNN``)
    is the document's ``answer_spans``; it lies at least ``seq_len/2`` tokens
    after its only earlier occurrence. Document ``i`` depends only on ``(seed, i)``.
    """

    kind = "synthetic"
    has_answers = True
    MIN_SEQ_LEN = 128
    VALUE_LEN = 4

    def __init__(self, seq_len: int, task: str = "recall", num_docs: int = 65536, seed: int = 0):
        if task not in ("recall", "needle"):
            raise DataError(f"data.synthetic_task={task!r} is not a synthetic task; choose recall or needle")
        if seq_len < self.MIN_SEQ_LEN:
            raise DataError(f"data.source=synthetic needs data.seq_len >= {self.MIN_SEQ_LEN} so the answer "
                            f"can lie seq_len/2 tokens back, got {seq_len}")
        self.seq_len = int(seq_len)
        self.task = task
        self.seed = int(seed)
        if task == "recall":
            k = 3
            while True:
                pair = k + self.VALUE_LEN + 2
                n_pairs = (self.seq_len - (k + self.VALUE_LEN + 3)) // pair
                if len(_ALNUM) ** k >= 4 * n_pairs:
                    break
                k += 1
            self._key_len, self._n_pairs = k, n_pairs
            self._answer = (self.seq_len - 1 - self.VALUE_LEN, self.seq_len - 1)
        else:
            self._answer = (self.seq_len - 5, self.seq_len - 1)
        # Documents are generated on demand; keep only a few in memory.
        super().__init__(np.full(num_docs, self.seq_len, dtype=np.int64),
                         cache_bytes=max(4 * self.seq_len, 1 << 20))

    def answer_spans(self, i: int) -> list[tuple[int, int]]:
        return [self._answer]

    @staticmethod
    def min_answer_distance(seq_len: int) -> int:
        """The fewest tokens between an answer and its earlier occurrence, for either task.

        Recall asks for a pair that ends in the first half and puts the answer at the
        end, needle plants the secret in the first half and asks at the end: both at
        least ceil(seq_len / 2) tokens apart (tested in test_data).
        """
        return (int(seq_len) + 1) // 2

    def vocab_needed(self) -> int:
        """One more than the largest byte a document of this task holds (``z`` for recall)."""
        if self.task == "recall":
            used = bytes(_ALNUM) + b":;?=\n "
        else:
            used = (" ".join(_FILLER_WORDS) + ". the secret is 0123456789. \nQ: what is the secret? A: \n").encode()
        return max(used) + 1

    def _load(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([_u64(self.seed), int(i), 0 if self.task == "recall" else 1])
        return self._recall(rng) if self.task == "recall" else self._needle(rng)

    def _recall(self, rng: np.random.Generator) -> np.ndarray:
        T, k, v, n = self.seq_len, self._key_len, self.VALUE_LEN, self._n_pairs
        base = len(_ALNUM)
        keys = rng.choice(base ** k, size=n, replace=False)
        key_digits = (keys[:, None] // base ** np.arange(k - 1, -1, -1)) % base
        pairs = np.empty((n, k + v + 2), dtype=np.uint8)
        pairs[:, :k] = _ALNUM[key_digits]
        pairs[:, k] = ord(":")
        pairs[:, k + 1:k + 1 + v] = _ALNUM[rng.integers(0, base, size=(n, v))]
        pairs[:, -1] = ord(";")
        last_in_first_half = (T // 2 - pairs.shape[1]) // pairs.shape[1]
        q = int(rng.integers(0, last_in_first_half + 1))
        query = np.concatenate([[ord("?")], pairs[q, :k], [ord("=")], pairs[q, k + 1:k + 1 + v], [ord("\n")]])
        pad = np.full(T - pairs.size - query.size, ord(" "), dtype=np.uint8)
        return np.concatenate([pairs.reshape(-1), pad, query.astype(np.uint8)])

    def _needle(self, rng: np.random.Generator) -> np.ndarray:
        T = self.seq_len
        secret = f"{int(rng.integers(0, 10000)):04d}"
        needle = f"the secret is {secret}. ".encode()
        question = f"\nQ: what is the secret? A: {secret}\n".encode()
        room = T - len(needle) - len(question)
        words = np.array(_FILLER_WORDS, dtype=object)[rng.integers(0, len(_FILLER_WORDS), size=room // 2 + 8)]
        filler = (" ".join(words) + ". ").encode()
        while len(filler) < room:
            filler += filler
        at = int(rng.integers(0, T // 2 - len(needle) + 1))
        at = filler.rfind(b" ", 0, at) + 1  # plant it between words
        text = filler[:at] + needle + filler[at:room] + question
        return _bytes_doc(text)

    def describe(self) -> str:
        return f"data.source=synthetic (task {self.task}, seq_len {self.seq_len})"

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "task": self.task, "seed": self.seed}
