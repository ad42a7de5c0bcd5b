"""Predicted dp imbalance of token packing vs the balanced packer (``distattn plan batch``,
``distattn bench balance``): per-step, per-rank work in pair units, and its summary."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from distattn.config import ConfigError
from distattn.sched.cost import doc_pairs, step_cost
from distattn.sched.packer import BalancedPacker, _u64, _whole, check_linear_cost, check_seed

__all__ = ["token_packing_loads", "balanced_loads", "plan_stats", "lognormal_lengths", "check_lognormal",
           "compare"]


def token_packing_loads(lengths: Sequence[int], seq_len: int, dp: int, micro: int, steps: int,
                        seed: int = 0, linear_cost: float = 0.0, shuffle: bool = True) -> list[list[float]]:
    """Per-step, per-rank work of the fixed-window packing of ``BatchStream`` (sample i to rank i % dp).

    Same epoch permutation rule; documents are cut at window ends.
    """
    lengths = _lengths(lengths)
    T = _whole("seq_len", seq_len, 1)
    _whole("dp", dp, 1), _whole("micro-batches per rank", micro, 1), _whole("steps", steps, 1)
    check_linear_cost(linear_cost), check_seed(seed)
    out = []
    epoch, cur, off = 0, 0, 0
    perm = (np.random.default_rng(_u64(seed)).permutation(lengths.size) if shuffle
            else np.arange(lengths.size))
    for _ in range(steps):
        loads = [0.0] * dp
        for s in range(dp * micro):
            need, pairs = T, 0
            while need > 0:
                if cur >= perm.size:
                    epoch, cur, off = epoch + 1, 0, 0
                    perm = (np.random.default_rng(_u64(seed + epoch)).permutation(lengths.size) if shuffle
                            else np.arange(lengths.size))
                L = int(lengths[perm[cur]])
                take = min(L - off, need)
                pairs += doc_pairs(take)
                need -= take
                off += take
                if off == L:
                    cur, off = cur + 1, 0
            loads[s % dp] += step_cost(pairs, T, linear_cost)
        out.append(loads)
    return out


def balanced_loads(lengths: Sequence[int], seq_len: int, dp: int, micro: int, steps: int, seed: int = 0,
                   linear_cost: float = 0.0, max_defer: int = 0, pad_chunk: int = 64,
                   balance: str = "attention") -> tuple[list[list[float]], float]:
    """Per-step, per-rank work of the balanced packer (padding included) and its padding fraction.

    With fixed ``T`` every rank runs ``micro * seq_len`` tokens through the linear
    layers; padding documents add their (small) attention pairs.
    """
    _whole("steps", steps, 1), _whole("pad_chunk", pad_chunk, 1)
    pk = BalancedPacker(lengths, seq_len, seed=seed, linear_cost=linear_cost, max_defer=max_defer,
                        balance=balance)
    out, real = [], 0
    for _ in range(steps):
        plan = pk.plan(dp, micro)
        loads = []
        for rank in plan.bins:
            pairs = 0
            for b in rank:
                used = sum(p.length for p in b)
                real += used
                pairs += sum(doc_pairs(p.length) for p in b)
                pad = seq_len - used
                q, rem = divmod(pad, pad_chunk)
                pairs += q * doc_pairs(pad_chunk) + doc_pairs(rem)
            loads.append(step_cost(pairs, micro * seq_len, linear_cost))
        out.append(loads)
    return out, 1.0 - real / (steps * dp * micro * seq_len)


def plan_stats(loads: list[list[float]]) -> dict[str, float]:
    """Mean over steps of max/mean per-rank work and of the idle fraction sum(max - t_i) / (N max)."""
    if not loads or not all(loads):
        raise ConfigError("plan_stats needs at least one step of per-rank loads")
    ratios, idles = [], []
    for step in loads:
        mx, mean = max(step), sum(step) / len(step)
        ratios.append(mx / mean if mean > 0 else 1.0)
        idles.append(sum(mx - t for t in step) / (len(step) * mx) if mx > 0 else 0.0)
    return {"max_over_mean": float(np.mean(ratios)), "idle": float(np.mean(idles)),
            "worst_idle": float(np.max(idles))}


MAX_MEAN, MAX_SIGMA = 1e9, 10.0


def check_lognormal(mean, sigma) -> tuple[float, float]:
    """A lognormal's mean length (1 to 1e9 tokens) and log-sigma (0 to 10), else a ConfigError."""
    for name, v, lo, hi in (("mean", mean, 1.0, MAX_MEAN), ("sigma", sigma, 0.0, MAX_SIGMA)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ConfigError(f"lognormal {name}={v!r}: expected a number in [{lo:g}, {hi:g}]")
    return float(mean), float(sigma)


def _lengths(lengths) -> np.ndarray:
    try:
        out = np.asarray(lengths, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        out = np.zeros(0, dtype=np.int64)
    if out.ndim != 1 or out.size == 0 or (out <= 0).any():
        raise ConfigError("lengths must be a non-empty list of positive document lengths")
    return out


def lognormal_lengths(mean: float, sigma: float, docs: int, seed: int = 0, max_len: int | None = None) -> np.ndarray:
    """``docs`` lengths from a lognormal with the given *mean* length and log-sigma."""
    check_lognormal(mean, sigma)
    _whole("docs", docs, 1), check_seed(seed)
    mu = math.log(mean) - sigma * sigma / 2
    x = np.random.default_rng(_u64(seed)).lognormal(mu, sigma, size=docs)
    x = np.clip(np.round(x), 1, 1 << 40).astype(np.int64)
    return np.minimum(x, max_len) if max_len else x


def compare(lengths, seq_len: int, dp: int, micro: int, steps: int, seed: int = 0, linear_cost: float = 0.0,
            max_defer: int = 0) -> dict[str, dict[str, float]]:
    """Predicted imbalance of token packing vs attention-aware packing."""
    tok = plan_stats(token_packing_loads(lengths, seq_len, dp, micro, steps, seed, linear_cost))
    loads, pad = balanced_loads(lengths, seq_len, dp, micro, steps, seed, linear_cost, max_defer)
    att = plan_stats(loads)
    att["padding"] = pad
    tok["padding"] = 0.0
    return {"tokens": tok, "attention": att}
