"""Cost model of core-attention tasks: exact (query, key) pair counts, plus linear layers.

A *task* is a query shard ``[a, b)`` of one document (positions inside the
document, ``0 <= a < b <= L``) together with the keys it may see. Under a causal
mask query ``p`` sees keys ``0..p``, so the task's KV is the document prefix
``[0, b)`` and its cost is

    pairs(a, b) = sum_{p=a}^{b-1} (p + 1) = (b - a) * (a + b + 1) / 2.

Without a causal mask every query sees the whole document: ``(b - a) * L``
pairs, and the task's KV is ``[0, L)``.

The FLOPs of a task are ``4 * head_dim * heads * pairs`` forward (QK^T and PV)
and about 2.5 times that backward; every factor but ``pairs`` is the same for all
tasks of a model, so planners balance ``pairs`` directly.

Linear layers (QKV/O projections, MLP) cost the same per token wherever the
token is, and they run on the rank that owns the token, not on the attention
server. A planner that wants to balance the whole step adds
``linear_cost * tokens_owned`` to a rank's attention pairs. In pair units a
dense layer with hidden size ``h`` and a 4h MLP costs about ``24 h^2`` FLOPs
per token against ``4 h`` per pair, so ``linear_cost ~= 6 * h`` (forward and
backward scale alike); ``linear_cost = 0`` balances attention alone.

Kernels also pay per query row, not only per pair: loading the row, writing
and rescaling its output, a per-call overhead that small shards pay more often.
``task_cost`` adds ``token_cost`` pairs-equivalents per query token of a task;
with ``token_cost = 0`` (the default everywhere) cost is the exact pair count.
A kernel's ``token_cost`` can be fitted from two timings (see
``distattn.bench.cad.calibrate_token_cost``).

All functions are pure and use exact integer arithmetic for pair counts.
"""
from __future__ import annotations

import math

__all__ = [
    "doc_pairs",
    "head_len_for",
    "kv_end",
    "linear_load",
    "pairs",
    "step_cost",
    "tail_len_for",
    "task_cost",
    "task_flops",
]


def pairs(a: int, b: int, doc_len: int | None = None, causal: bool = True) -> int:
    """(query, key) pairs of the queries ``[a, b)`` of a document over the keys they see.

    Causal: ``(b - a)(a + b + 1) / 2`` (``doc_len`` unused). Non-causal:
    ``(b - a) * doc_len``. Empty shards (``b <= a``) cost 0.
    """
    if b <= a:
        return 0
    if causal:
        return (b - a) * (a + b + 1) // 2
    if doc_len is None:
        raise ValueError("non-causal pairs need doc_len")
    return (b - a) * doc_len


def doc_pairs(length: int, causal: bool = True) -> int:
    """Pairs of a whole document: ``L (L + 1) / 2`` causal, ``L^2`` otherwise."""
    return pairs(0, length, length, causal)


def kv_end(q_end: int, doc_len: int, causal: bool = True) -> int:
    """End of the KV prefix a task needs: ``q_end`` causal, the document end otherwise."""
    return q_end if causal else doc_len


def task_cost(a: int, b: int, doc_len: int | None = None, causal: bool = True,
              token_cost: float = 0.0) -> float:
    """Server work of a task in pair units: ``pairs + token_cost * (b - a)``."""
    p = pairs(a, b, doc_len, causal)
    return p + token_cost * (b - a) if token_cost else p


def task_flops(a: int, b: int, heads: int, head_dim: int, doc_len: int | None = None,
               causal: bool = True, backward: bool = True) -> int:
    """Matmul FLOPs of a task: ``4 * D * H * pairs`` forward, plus ``10 * D * H * pairs``
    backward (five matmuls of the same shape when the probabilities are recomputed)."""
    p = pairs(a, b, doc_len, causal)
    return (4 + (10 if backward else 0)) * head_dim * heads * p


def linear_load(tokens: int, linear_cost: float) -> float:
    """Linear-layer work of a rank owning ``tokens`` tokens, in pair units."""
    return float(linear_cost) * tokens


def step_cost(attn_pairs: int, tokens: int, linear_cost: float) -> float:
    """Whole-step work of a rank: its attention pairs plus its linear-layer work."""
    return attn_pairs + linear_load(tokens, linear_cost)


def _nearest(n_float: float, lo: int, hi: int, cost, target: float) -> int:
    """The integer in [lo, hi] near ``n_float`` whose cost is closest to ``target``."""
    if hi < lo:
        return lo
    base = min(max(int(math.floor(n_float)), lo), hi)
    best, best_err = base, abs(cost(base) - target)
    for n in (base - 1, base + 1, base + 2):
        if lo <= n <= hi:
            err = abs(cost(n) - target)
            if err < best_err:
                best, best_err = n, err
    return best


def head_len_for(a: int, b: int, target: float, doc_len: int | None = None,
                 causal: bool = True, lo: int = 0, hi: int | None = None,
                 token_cost: float = 0.0) -> int:
    """Length ``n`` of the head ``[a, a + n)`` of shard ``[a, b)`` whose cost is closest to ``target``.

    Causal: solves ``n^2 + (2(a + token_cost) + 1) n - 2 target = 0`` (the
    per-token cost acts as a shift of the start); the result is clamped to
    ``[lo, hi]`` (``hi`` defaults to ``b - a``).
    """
    hi = b - a if hi is None else hi
    if causal:
        c = 2 * (a + token_cost) + 1
        n = (-c + math.sqrt(c * c + 8.0 * max(target, 0.0))) / 2.0
    else:
        n = max(target, 0.0) / max((doc_len or 1) + token_cost, 1)
    return _nearest(n, lo, hi, lambda m: task_cost(a, a + m, doc_len, causal, token_cost), target)


def tail_len_for(a: int, b: int, target: float, doc_len: int | None = None,
                 causal: bool = True, lo: int = 0, hi: int | None = None,
                 token_cost: float = 0.0) -> int:
    """Length ``m`` of the tail ``[b - m, b)`` of shard ``[a, b)`` whose cost is closest to ``target``.

    Causal: solves ``m^2 - (2(b + token_cost) + 1) m + 2 target = 0`` (smaller root).
    """
    hi = b - a if hi is None else hi
    if causal:
        c = 2 * (b + token_cost) + 1
        disc = c * c - 8.0 * max(target, 0.0)
        m = (c - math.sqrt(max(disc, 0.0))) / 2.0
    else:
        m = max(target, 0.0) / max((doc_len or 1) + token_cost, 1)
    return _nearest(m, lo, hi, lambda t: task_cost(b - t, b, doc_len, causal, token_cost), target)
