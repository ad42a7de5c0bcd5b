"""Attention-aware batch scheduling: dp stragglers of token packing vs balanced packing.

For each length distribution and dp size the benchmark plans ``steps`` global
batches three ways:

- ``tokens``        the fixed-window packing of ``BatchStream`` (same tokens per rank);
- ``attention``     ``BalancedPacker`` without deferral (``max_defer=0``);
- ``attention K=k`` ``BalancedPacker`` with outlier deferral bounded by ``k`` steps;

and reports the predicted per-rank step work (attention pairs + linear cost per
token, padding included) as max/mean and the idle fraction
``sum(max - t_i) / (N max)`` averaged over steps, plus the padding the balanced
packer adds. The distributions: ``stdlib`` (Python stdlib file sizes),
``lognormal`` (mean, sigma), and ``data``: the document lengths of the
config's ``data`` section (``--set data.source=jsonl --set data.path=...``).
With ``measure_steps > 0`` it also times, on this machine, causal
attention forward+backward of every rank's documents (lengths scaled by
``measure_scale``, one thread, ``time.thread_time``) and reports the measured
critical path (max over ranks) against the mean the same way.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from distattn.config import ConfigError
from distattn.sched.pack_stats import balanced_loads, lognormal_lengths, plan_stats, token_packing_loads
from distattn.sched.packer import BalancedPacker

__all__ = ["BalanceRow", "run_balance_bench", "format_table", "add_parser", "DISTS"]

DISTS = ("stdlib", "lognormal", "data")


@dataclass
class BalanceRow:
    dist: str
    dp: int
    packing: str
    max_over_mean: float
    idle: float
    worst_idle: float
    padding: float
    measured_max_over_mean: float | None = None
    measured_idle: float | None = None


def _windows(lengths, seq_len: int, dp: int, micro: int, steps: int, seed: int):
    """Per step, per rank: document-piece lengths of every sequence of the fixed-window packing."""
    lengths = np.asarray(lengths, dtype=np.int64)
    out, epoch, cur, off = [], 0, 0, 0
    perm = np.random.default_rng(seed).permutation(lengths.size)
    for _ in range(steps):
        ranks = [[] for _ in range(dp)]
        for s in range(dp * micro):
            need, seq = seq_len, []
            while need:
                if cur >= perm.size:
                    epoch, cur, off = epoch + 1, 0, 0
                    perm = np.random.default_rng(seed + epoch).permutation(lengths.size)
                L = int(lengths[perm[cur]])
                take = min(L - off, need)
                seq.append(take)
                need -= take
                off += take
                if off == L:
                    cur, off = cur + 1, 0
            ranks[s % dp].append(seq)
        out.append(ranks)
    return out


def _balanced_docs(lengths, seq_len: int, dp: int, micro: int, steps: int, seed: int, max_defer: int,
                   pad_chunk: int = 64):
    pk = BalancedPacker(lengths, seq_len, seed=seed, max_defer=max_defer)
    out = []
    for _ in range(steps):
        plan = pk.plan(dp, micro)
        ranks = []
        for rank in plan.bins:
            seqs = []
            for b in rank:
                seq = [p.length for p in b]
                pad = seq_len - sum(seq)
                seq += [pad_chunk] * (pad // pad_chunk) + ([pad % pad_chunk] if pad % pad_chunk else [])
                seqs.append(seq)
            ranks.append(seqs)
        out.append(ranks)
    return out


def _time_attention(seqs, heads: int, head_dim: int) -> float:
    """CPU seconds of causal attention fwd+bwd over every document of a rank's sequences."""
    import torch
    total = 0.0
    for seq in seqs:
        for n in seq:
            q, k, v = (torch.randn(1, heads, n, head_dim, requires_grad=True) for _ in range(3))
            t0 = time.thread_time()
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            o.sum().backward()
            total += time.thread_time() - t0
    return total


def _measured(per_step, heads: int, head_dim: int) -> tuple[float, float]:
    ratios, idles = [], []
    for ranks in per_step:
        t = [_time_attention(seqs, heads, head_dim) for seqs in ranks]
        mx, mean = max(t), sum(t) / len(t)
        ratios.append(mx / mean)
        idles.append(sum(mx - x for x in t) / (len(t) * mx))
    return float(np.mean(ratios)), float(np.mean(idles))


def run_balance_bench(dists=("stdlib", "lognormal"), dps=(2, 4), seq_len: int = 65536, micro: int = 4,
                      steps: int = 30, seed: int = 0, linear_cost: float = 0.0, max_defer: int = 2,
                      lognormal=(8192.0, 1.5), docs: int = 4000, measure_steps: int = 0,
                      measure_scale: float = 1 / 16, heads: int = 4, head_dim: int = 32,
                      data_lengths=None, log=lambda m: None) -> list[BalanceRow]:
    """Rows per distribution, dp size and packing; ``data_lengths``: the lengths of the ``data`` dist."""
    import torch
    bad = [d for d in dists if d not in DISTS]
    if bad or not dists:
        raise ConfigError(f"distributions {list(dists)!r}: choose among {', '.join(DISTS)}")
    if "data" in dists and data_lengths is None:
        raise ConfigError("distribution 'data' needs data_lengths (the config's document lengths)")
    if not dps or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dps):
        raise ConfigError(f"dp sizes {list(dps)!r}: expected integers >= 1")
    if isinstance(measure_steps, bool) or not isinstance(measure_steps, int) or measure_steps < 0 \
            or not measure_scale > 0:
        raise ConfigError(f"measure_steps={measure_steps!r} must be an integer >= 0 and "
                          f"measure_scale={measure_scale!r} > 0")
    rows: list[BalanceRow] = []
    for dist in dists:
        if dist == "stdlib":
            from distattn.train.data import StdlibSource
            lengths = StdlibSource().lengths
        elif dist == "lognormal":
            lengths = lognormal_lengths(lognormal[0], lognormal[1], docs, seed=seed)
        else:
            lengths = data_lengths
        for dp in dps:
            log(f"{dist} dp={dp}")
            tok = plan_stats(token_packing_loads(lengths, seq_len, dp, micro, steps, seed, linear_cost))
            rows.append(BalanceRow(dist, dp, "tokens", tok["max_over_mean"], tok["idle"], tok["worst_idle"], 0.0))
            for k in sorted({0, max_defer}):
                loads, pad = balanced_loads(lengths, seq_len, dp, micro, steps, seed, linear_cost, k)
                st = plan_stats(loads)
                rows.append(BalanceRow(dist, dp, "attention" + (f" K={k}" if k else ""), st["max_over_mean"],
                                       st["idle"], st["worst_idle"], pad))
            if measure_steps:
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    small = np.maximum(1, np.ceil(lengths * measure_scale)).astype(np.int64)
                    T = max(1, int(seq_len * measure_scale))
                    base = len(rows) - (2 if max_defer else 1) - 1
                    r, i = _measured(_windows(small, T, dp, micro, measure_steps, seed), heads, head_dim)
                    rows[base].measured_max_over_mean, rows[base].measured_idle = r, i
                    for j, k in enumerate(sorted({0, max_defer})):
                        per = _balanced_docs(small, T, dp, micro, measure_steps, seed, k)
                        r, i = _measured(per, heads, head_dim)
                        rows[base + 1 + j].measured_max_over_mean, rows[base + 1 + j].measured_idle = r, i
                finally:
                    torch.set_num_threads(threads)
    return rows


def format_table(rows: list[BalanceRow]) -> str:
    head = (f"| dist | dp | packing | predicted max/mean | predicted idle | worst-step idle | padding "
            f"| measured max/mean | measured idle |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        m1 = f"{r.measured_max_over_mean:.3f}" if r.measured_max_over_mean is not None else "-"
        m2 = f"{r.measured_idle:.1%}" if r.measured_idle is not None else "-"
        lines.append(f"| {r.dist} | {r.dp} | {r.packing} | {r.max_over_mean:.3f} | {r.idle:.1%} | "
                     f"{r.worst_idle:.1%} | {r.padding:.1%} | {m1} | {m2} |")
    return "\n".join(lines)


def _cmd(args) -> int:
    from distattn.cli_args import load, write_json
    cfg = load(args)
    data_lengths, note = None, ""
    if "data" in args.dists:
        from distattn.train.data import build_source
        src = build_source(cfg.data, seed=cfg.run.seed)
        data_lengths, note = src.lengths, f"; data = {src.describe()}"
    mean, sigma = args.lognormal
    rows = run_balance_bench(dists=args.dists, dps=args.dp, seq_len=args.seq_len,
                             micro=args.micro, steps=args.steps, seed=args.seed, linear_cost=args.linear_cost,
                             max_defer=args.max_defer, lognormal=(mean, sigma), docs=args.docs,
                             measure_steps=args.measure_steps, measure_scale=args.measure_scale,
                             data_lengths=data_lengths, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"seq_len {args.seq_len}, {args.micro} micro-batches per rank, {args.steps} steps, linear cost "
          f"{args.linear_cost:g} pairs/token; measured: {args.measure_steps} steps at lengths x "
          f"{args.measure_scale:g}, causal attention fwd+bwd, 1 thread{note}")
    print(format_table(rows))
    write_json(args.json, [asdict(r) for r in rows])
    return 0


def add_parser(bsub) -> None:
    """``distattn bench balance`` under ``bench``."""
    from distattn.cli_args import (HelpFormatter, add_config_args, choice_list, int_list, nonneg_float,
                                   nonneg_int, positive_float, positive_int)
    from distattn.plan.cli import lognormal_spec
    b = bsub.add_parser("balance", formatter_class=HelpFormatter,
                        help="dp imbalance of token packing vs attention-aware packing "
                             "(predicted, and measured attention CPU time)")
    add_config_args(b)  # the config's data section is the 'data' distribution
    b.add_argument("--dists", type=choice_list(DISTS), default="stdlib,lognormal", metavar="D1,D2,...",
                   help="stdlib (Python stdlib file sizes), lognormal (--lognormal), data (the config's "
                        "data section, e.g. --set data.source=jsonl --set data.path=FILE)")
    b.add_argument("--dp", type=int_list, default="2,4", metavar="DP1,DP2,...",
                   help="comma-separated dp sizes, each >= 1")
    b.add_argument("--seq-len", type=positive_int, default=65536, help="tokens per micro-batch")
    b.add_argument("--micro", type=positive_int, default=4, help="micro-batches per rank per step")
    b.add_argument("--steps", type=positive_int, default=30, help="planned steps averaged")
    b.add_argument("--seed", type=nonneg_int, default=0, help="seed of the epoch order and the lognormal draw")
    b.add_argument("--linear-cost", type=nonneg_float, default=0.0, help="linear work per token, pair units")
    b.add_argument("--max-defer", type=nonneg_int, default=2,
                   help="also run with outlier deferral bound K (0: only without deferral)")
    b.add_argument("--lognormal", type=lognormal_spec, default="8192,1.5", metavar="MEAN,SIGMA",
                   help="the lognormal distribution's mean length and log-sigma")
    b.add_argument("--docs", type=positive_int, default=4000, help="documents drawn from the lognormal")
    b.add_argument("--measure-steps", type=nonneg_int, default=2, help="steps timed on this machine (0: none)")
    b.add_argument("--measure-scale", type=positive_float, default=1 / 16,
                   help="length scale of the timed steps")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON here")
    b.set_defaults(fn=_cmd)
