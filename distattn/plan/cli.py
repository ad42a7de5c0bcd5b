"""`distattn plan memory | batch`: predictions that launch nothing.

Every argument is checked by its argparse type, so a bad value is refused
before the config loads or any planning starts: one line naming the option,
the value and what would work, exit code 2.
"""
from __future__ import annotations

import argparse

from distattn.cli_args import (HelpFormatter, UsageError, add_config_args, choice_list, int_list, load,
                               nonneg_float, nonneg_int, positive_float, positive_int, write_json)

def recompute_list(text: str) -> list[str]:
    """Comma-separated recompute modes (`model.recompute` values)."""
    from distattn.plan.memory import RECOMPUTE
    return choice_list(RECOMPUTE)(text)


def scheme_list(text: str) -> list[str]:
    """Comma-separated attention schemes of the config (`attention.scheme` values)."""
    from distattn.config.sections import SCHEMES
    return choice_list(SCHEMES)(text)


def lognormal_spec(text: str) -> tuple[float, float]:
    """`MEAN,SIGMA` of a lognormal length distribution, in the ranges the sampler accepts."""
    from distattn.sched.pack_stats import MAX_MEAN, MAX_SIGMA
    parts = [x.strip() for x in text.split(",")]
    try:
        mean, sigma = (float(x) for x in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected MEAN,SIGMA (two numbers, e.g. 8192,1.5), got {text!r}") from None
    if not 1 <= mean <= MAX_MEAN or not 0 <= sigma <= MAX_SIGMA:
        raise argparse.ArgumentTypeError(
            f"expected MEAN in [1, {MAX_MEAN:g}] tokens and SIGMA in [0, {MAX_SIGMA:g}], got {text!r}")
    return mean, sigma


def plan_subparsers(sub):
    """The `plan` command's subcommands: the existing group, or a new `plan` command."""
    existing = sub.choices.get("plan")
    if existing is None:
        p = sub.add_parser("plan", help="predict without launching anything", formatter_class=HelpFormatter)
        return p.add_subparsers(dest="what", required=True, metavar="WHAT")
    for action in existing._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return existing.add_subparsers(dest="what", required=True, metavar="WHAT")


# ----------------------------------------------------------------------------- plan memory


def add_memory_parser(sub):
    """`distattn plan memory` (joins `plan` if it exists)."""
    pm = plan_subparsers(sub).add_parser(
        "memory", formatter_class=HelpFormatter,
        help="predicted per-rank peak memory and the longest context that fits a per-device budget, "
             "per scheme and world size")
    add_config_args(pm)
    pm.add_argument("--budget-gib", type=positive_float, default=80.0, help="per-device memory budget in GiB")
    pm.add_argument("--worlds", type=int_list, default=None, metavar="W1,W2,...",
                    help="comma-separated cp sizes, each >= 1 (default: 1 and the config's parallel.cp)")
    pm.add_argument("--schemes", type=scheme_list, default=None, metavar="S1,S2,...",
                    help="comma-separated schemes (default: the config's attention.scheme)")
    pm.add_argument("--recompute", type=recompute_list, default=None, metavar="MODE,...",
                    help="comma-separated recompute modes among none, selective, full "
                         "(default: the config's model.recompute)")
    pm.add_argument("--options", action="store_true",
                    help="every combination of train.shard, model.recompute, model.loss_tile, model.mlp_tile "
                         "and model.offload_activations at the config's cp and seq_len, and the cheapest that fits")
    pm.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON here")
    pm.set_defaults(fn=cmd_plan_memory)
    return pm


def cmd_plan_memory(args) -> int:
    from distattn.plan.memory import format_table, plan_table
    cfg = load(args)
    if args.options:
        from distattn.plan.options import format_options, option_rows
        rows = option_rows(cfg, args.budget_gib)
        print(format_options(rows, args.budget_gib, cfg.data.seq_len))
        write_json(args.json, rows)
        return 0
    worlds = args.worlds or sorted({1, cfg.parallel.cp})
    schemes = args.schemes or [cfg.attention.scheme]
    rcs = args.recompute or [cfg.model.recompute]
    rows = plan_table(cfg, args.budget_gib, worlds, schemes, rcs)
    print(format_table(rows, args.budget_gib))
    if cfg.model.dtype != "fp32":
        print(f"note: model.dtype={cfg.model.dtype} is planned at its element size, but only fp32 has been "
              f"checked against measurement; on CPU, bf16 steps measured 1.25-2x the plan (the CPU "
              f"RMSNorm and attention kernels keep fp32 copies)")
    write_json(args.json, rows)
    return 0


# ----------------------------------------------------------------------------- plan batch


def add_plan_parser(sub) -> None:
    """`distattn plan batch` (creates `plan` unless it exists)."""
    b = plan_subparsers(sub).add_parser(
        "batch", formatter_class=HelpFormatter,
        help="predicted dp imbalance of token packing vs attention-aware packing")
    add_config_args(b)
    b.add_argument("--config", dest="config_option", default=None, help=argparse.SUPPRESS)
    b.add_argument("--lognormal", type=lognormal_spec, default=None, metavar="MEAN,SIGMA",
                   help="use lognormal document lengths (mean length, log-sigma) instead of data.source")
    b.add_argument("--docs", type=positive_int, default=2000, help="documents drawn with --lognormal")
    b.add_argument("--dp", type=positive_int, default=None, help="dp ranks (default: parallel.dp)")
    b.add_argument("--seq-len", type=positive_int, default=None,
                   help="tokens per micro-batch (default: data.seq_len)")
    b.add_argument("--micro", type=positive_int, default=None,
                   help="micro-batches per rank per step (default: train.grad_accum * data.micro_batch_size)")
    b.add_argument("--steps", type=positive_int, default=50, help="steps averaged")
    b.add_argument("--max-defer", type=nonneg_int, default=None,
                   help="deferral bound K in steps (default: data.balance_max_defer)")
    b.add_argument("--linear-cost", type=nonneg_float, default=None,
                   help="linear-layer work per token in pair units (default: 6 * model.hidden_size)")
    b.set_defaults(fn=cmd_plan_batch)


def cmd_plan_batch(args) -> int:
    from distattn.sched.pack_stats import compare, lognormal_lengths
    if args.config_option is not None:  # the old spelling, kept working
        if args.config is not None and args.config != args.config_option:
            raise UsageError(f"two configs given: CONFIG {args.config!r} and --config {args.config_option!r}; "
                             f"pass one (the positional CONFIG)")
        args.config = args.config_option
    cfg = load(args)
    seq_len = args.seq_len or cfg.data.seq_len
    if args.lognormal:
        mean, sigma = args.lognormal
        lengths = lognormal_lengths(mean, sigma, args.docs, seed=cfg.run.seed)
        what = f"lognormal(mean {mean:g}, sigma {sigma:g}), {args.docs} documents"
    else:
        from distattn.train.data import build_source
        src = build_source(cfg.data, seed=cfg.run.seed)
        lengths, what = src.lengths, src.describe()
    micro = args.micro or cfg.train.grad_accum * cfg.data.micro_batch_size
    dp = args.dp or cfg.parallel.dp
    linear = args.linear_cost if args.linear_cost is not None else 6.0 * cfg.model.hidden_size
    K = args.max_defer if args.max_defer is not None else cfg.data.balance_max_defer
    res = compare(lengths, seq_len, dp, micro, args.steps, cfg.run.seed, linear, K)
    print(f"{what}; dp {dp}, {micro} micro-batch(es) of {seq_len} tokens per rank, linear cost "
          f"{linear:g} pairs/token, {args.steps} steps")
    print(f"{'packing':<12} {'max/mean':>9} {'idle':>7} {'worst idle':>11} {'padding':>8}")
    for name, r in res.items():
        print(f"{name:<12} {r['max_over_mean']:>9.3f} {r['idle']:>6.1%} {r['worst_idle']:>10.1%} "
              f"{r['padding']:>7.1%}")
    return 0
