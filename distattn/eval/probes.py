"""Retrieval probes at a chosen context length and depth: the needle and associative-recall tasks.

The training tasks (`distattn.train.synthetic`) put the answer at a random place
in the first half; a heatmap needs it at a given depth. Here depth 0 puts the
needle (or the queried pair) at the start of the context and depth 1 just
before the question, so the distance to the answer is (1 - depth) of the
length. Documents are byte-level, like the training tasks, and depend only on
(length, depth, trial, seed).
"""
from __future__ import annotations

import numpy as np

from distattn.train.synthetic import _ALNUM, _FILLER_WORDS

TASKS = ("needle", "recall")
VALUE_LEN = 4


def _rng(length: int, depth: float, trial: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & (2**63 - 1), int(length), int(round(depth * 1e6)), int(trial)])


def needle(length: int, depth: float, trial: int = 0, seed: int = 0) -> tuple[np.ndarray, int]:
    """(bytes of the document, index of the first answer byte); the answer is the last 4 digits + newline."""
    rng = _rng(length, depth, trial, seed)
    secret = f"{int(rng.integers(0, 10000)):04d}"
    pin = f"the secret is {secret}. ".encode()
    question = f"\nQ: what is the secret? A: {secret}\n".encode()
    room = length - len(pin) - len(question)
    if room < 0:
        raise ValueError(f"a needle probe needs at least {len(pin) + len(question)} tokens, got {length}")
    words = np.array(_FILLER_WORDS, dtype=object)[rng.integers(0, len(_FILLER_WORDS), size=room // 2 + 8)]
    filler = (" ".join(words) + ". ").encode()
    while len(filler) < room:
        filler += filler
    at = int(round(depth * room))
    at = filler.rfind(b" ", 0, at) + 1 if at > 0 else 0  # between words
    text = filler[:at] + pin + filler[at:room] + question
    return np.frombuffer(text, dtype=np.uint8).astype(np.int64), length - VALUE_LEN - 1


def recall(length: int, depth: float, trial: int = 0, seed: int = 0) -> tuple[np.ndarray, int]:
    """`key:value;` pairs, then `?key=value\\n` asking for the pair at `depth`; the answer is the value."""
    rng = _rng(length, depth, trial, seed)
    k = 3
    while True:
        pair = k + VALUE_LEN + 2
        n = (length - (k + VALUE_LEN + 3)) // pair
        if len(_ALNUM) ** k >= 4 * max(n, 1):
            break
        k += 1
    if n < 1:
        raise ValueError(f"a recall probe needs at least {2 * (k + VALUE_LEN) + 5} tokens, got {length}")
    base = len(_ALNUM)
    keys = rng.choice(base ** k, size=n, replace=False)
    digits = (keys[:, None] // base ** np.arange(k - 1, -1, -1)) % base
    pairs = np.empty((n, pair), dtype=np.uint8)
    pairs[:, :k] = _ALNUM[digits]
    pairs[:, k] = ord(":")
    pairs[:, k + 1:k + 1 + VALUE_LEN] = _ALNUM[rng.integers(0, base, size=(n, VALUE_LEN))]
    pairs[:, -1] = ord(";")
    q = min(n - 1, int(depth * n))
    query = np.concatenate([[ord("?")], pairs[q, :k], [ord("=")], pairs[q, k + 1:k + 1 + VALUE_LEN], [ord("\n")]])
    pad = np.full(length - pairs.size - query.size, ord(" "), dtype=np.uint8)
    doc = np.concatenate([pairs.reshape(-1), pad, query.astype(np.uint8)]).astype(np.int64)
    return doc, length - VALUE_LEN - 1


def probe(task: str, length: int, depth: float, trial: int = 0, seed: int = 0) -> tuple[np.ndarray, int]:
    if task not in TASKS:
        raise ValueError(f"probe task {task!r} is not one of {', '.join(TASKS)}")
    return (needle if task == "needle" else recall)(length, depth, trial, seed)


__all__ = ["TASKS", "VALUE_LEN", "needle", "probe", "recall"]
