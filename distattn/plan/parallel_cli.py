"""`distattn plan parallel`: arguments, the ranked table, the reasons, and the winning config."""
from __future__ import annotations

import collections
import sys
from pathlib import Path

from distattn.cli_args import (HelpFormatter, UsageError, add_config_args, load, positive_float,
                               positive_int, write_json)


def add_parallel_parser(sub) -> None:
    from distattn.plan.cli import plan_subparsers
    from distattn.sim.cluster import PRESETS
    p = plan_subparsers(sub).add_parser(
        "parallel", formatter_class=HelpFormatter,
        help="rank every scheme x cp x tp x dp x layout x sharding x recomputation for N devices by "
             "predicted step time, within the memory budget; write the winner as a config")
    add_config_args(p)
    p.add_argument("--gpus", type=positive_int, required=True, help="devices the job may use")
    p.add_argument("--cluster", default="h100", choices=sorted(PRESETS), help="cluster model")
    p.add_argument("--calibrate", default=None, metavar="JSON",
                   help="device rates measured here: `distattn bench attention --json` output, or a JSON "
                        "object with attn_flops_per_s / matmul_flops_per_s / call_overhead_s")
    p.add_argument("--lengths", default="data", metavar="data|none|FILE",
                   help="document lengths for the attention work per layout: the config's data source "
                        "(data), one document per sequence (none), or a file of integers")
    p.add_argument("--budget-gib", type=positive_float, default=None,
                   help="per-device memory budget in GiB (default: the cluster's device memory)")
    p.add_argument("--step-overhead", type=float, default=0.0, metavar="S",
                   help="seconds per step outside the model (optimizer, host work), e.g. from a measurement")
    p.add_argument("--top", type=positive_int, default=10, help="candidates shown")
    p.add_argument("--out", default=None, metavar="PATH", help="write the winning config here (YAML)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every candidate as JSON here")
    p.set_defaults(fn=cmd_plan_parallel)


def read_lengths(spec: str, cfg) -> tuple[list[int] | None, str]:
    """Document lengths from the config's data, none, or a file of integers (spaces, commas, lines)."""
    if spec == "none":
        return None, "one document per sequence"
    if spec == "data":
        from distattn.train.data import build_source
        src = build_source(cfg.data, seed=cfg.run.seed)
        return [int(x) for x in src.lengths], src.describe()
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"--lengths {spec}: no such file; pass data, none, or a file of document lengths")
    text = path.read_text().replace(",", " ").replace("[", " ").replace("]", " ")
    try:
        vals = [int(float(x)) for x in text.split()]
    except ValueError:
        raise UsageError(f"--lengths {spec}: expected whole numbers (token counts per document)") from None
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"--lengths {spec}: expected at least one document length, each >= 1")
    return vals, f"{len(vals)} document lengths from {spec}"


def format_plan(plan, top: int) -> str:
    gib = 2 ** 30
    head = (f"{'#':>2}  {'attention':<28} {'tp':>2} {'cp':>3} {'dp':>3} {'shard':<5} {'recompute':<9} {'tiles':<5} "
            f"{'tok/s/GPU':>10} {'step s':>8} {'GiB':>6} {'exposed':>7} {'work':>5}  why not first")
    lines = [head, "-" * len(head)]
    for i, c in enumerate(plan.ranked[:top], 1):
        e = c.estimate
        lines.append(f"{i:>2}  {c.label:<28} {c.tp:>2} {c.cp:>3} {c.dp:>3} {c.shard:<5} {c.recompute:<9} "
                     f"{'yes' if c.tiles else 'no':<5} "
                     f"{e.tokens_per_s_per_gpu:>10,.0f} {e.step_s:>8.3f} {e.mem_bytes / gib:>6.1f} "
                     f"{e.exposed_fraction:>7.0%} {e.balance.work:>5.2f}  {c.reason}")
    if not plan.ranked:
        lines.append("   (no candidate fits)")
    dropped = collections.OrderedDict()
    fit = [c for c in plan.dropped if c.reason.startswith("doesn't fit")]
    for c in plan.dropped:
        if not c.reason.startswith("doesn't fit"):
            dropped.setdefault(c.reason, []).append(c)
    lines.append("")
    lines.append(f"dropped: {len(plan.dropped)} of {len(plan.dropped) + len(plan.ranked)}")
    if fit:
        small = min(fit, key=lambda c: c.estimate.mem_bytes)
        lines.append(f"  {len(fit)} don't fit {plan.budget_bytes / gib:.1f} GiB; the smallest of them, "
                     f"{small.label} tp={small.tp} cp={small.cp} {small.shard}/{small.recompute}{'/tiles' if small.tiles else ''}, needs "
                     f"{small.estimate.mem_bytes / gib:.1f} GiB")
    for reason, cs in dropped.items():
        ex = cs[0]
        lines.append(f"  {ex.label} tp={ex.tp} cp={ex.cp}" + (f" (+{len(cs) - 1} alike)" if len(cs) > 1 else "")
                     + f": {reason}")
    return "\n".join(lines)


def cmd_plan_parallel(args) -> int:
    from distattn.config import ConfigError
    from distattn.plan.parallel import best_config, plan_parallel
    from distattn.sim.cluster import calibrate, get_cluster
    cfg = load(args)
    if args.out and Path(args.out).exists() and not args.force:
        raise UsageError(f"--out {args.out} exists; pass --force to overwrite it or choose another path")
    if args.calibrate and not Path(args.calibrate).is_file():
        raise UsageError(f"--calibrate {args.calibrate}: no such file; pass the JSON of "
                         f"`distattn bench attention --json PATH`")
    if args.step_overhead < 0 or args.step_overhead != args.step_overhead:
        raise UsageError(f"--step-overhead {args.step_overhead}: expected seconds >= 0")
    cluster = get_cluster(args.cluster)
    note = ""
    if args.calibrate:
        try:
            cal = calibrate(args.calibrate, cluster)
        except (ValueError, OSError, KeyError) as e:
            raise UsageError(f"--calibrate {args.calibrate}: {e}") from None
        cluster, note = cal.apply(cluster), "; ".join(cal.notes) or f"calibrated from {args.calibrate}"
    lengths, what = read_lengths(args.lengths, cfg)
    plan = plan_parallel(args.config, args.overrides, args.gpus, cluster, args.budget_gib, lengths, what,
                         args.step_overhead)
    m = cfg.model
    print(f"distattn plan parallel: {args.gpus} devices, {m.num_layers} layers ({m.layer_kinds()}), hidden "
          f"{m.hidden_size}, {m.num_attention_heads}/{m.num_query_groups} heads, seq_len {cfg.data.seq_len:,}, "
          f"{m.dtype}; documents: {what}")
    print(cluster.describe() + (f"\ncalibration: {note}" if note else ""))
    print(format_plan(plan, args.top))
    write_json(args.json, {"gpus": args.gpus, "cluster": cluster.name, "documents": what,
                           "ranked": [_row(c) for c in plan.ranked], "dropped": [_row(c) for c in plan.dropped]})
    if plan.best is None:
        print("no candidate fits: raise --budget-gib, add --gpus, or lower data.seq_len", file=sys.stderr)
        return 1
    if args.out:
        try:
            best = best_config(args.config, args.overrides, plan)
        except ConfigError as e:  # pragma: no cover - the winner loaded once already
            raise UsageError(str(e)) from None
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(best.to_yaml())
        print(f"wrote {args.out}: {plan.best.label}, tp={plan.best.tp} cp={plan.best.cp} dp={plan.best.dp}, "
              f"{plan.best.shard}, recompute {plan.best.recompute} (distattn train {args.out})")
    return 0


def _row(c) -> dict:
    d = {k: v for k, v in c.__dict__.items() if k != "estimate"}
    d["label"] = c.label
    if c.estimate is not None:
        d["estimate"] = c.estimate.as_dict()
    return d


__all__ = ["add_parallel_parser", "cmd_plan_parallel", "read_lengths"]
