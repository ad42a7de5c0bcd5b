"""`distattn bench attention | linear | hetero | cad | balance`: argument parsing and commands."""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from distattn.cli_args import (HelpFormatter, UsageError, add_config_args, choice_list, int_list, load, nonneg_float,
                               nonneg_int, positive_float, positive_int, write_json)

# the names each benchmark accepts (kept here so parsing needs no torch import)
LINEAR_BENCH_SCHEMES = ("lasp2", "lasp1", "ring", "allgather")
CAD_DISTS = ("stdlib", "lognormal")
CAD_MODES = ("packing", "per-doc CP", "cad colocated", "cad colocated+pingpong", "cad dedicated")


def decay(text: str) -> float:
    """A per-head decay lambda in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a decay in (0, 1], got {text!r}")
    return value


def token_cost(text: str) -> float | None:
    """'auto' (None: fit to this machine) or a number of pairs >= 0."""
    if text.strip().lower() == "auto":
        return None
    try:
        return nonneg_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number >= 0, got {text!r}") from None


def _run_and_report(args, spec, run, format_table, rows_as_dicts) -> int:
    """The tail of a sweep-style benchmark: run it (progress on stderr), print its table, --json."""
    rows = run(spec, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(rows, spec))
    write_json(args.json, {"spec": asdict(spec), "rows": rows_as_dicts(rows)})
    return 0


def cmd_bench_attention(args) -> int:
    from distattn.bench.attention import BenchSpec, format_table, run_attention_bench

    cfg = load(args)
    b = cfg.bench
    spec = BenchSpec(seq_len=b.seq_len, heads=b.heads, kv_heads=b.kv_heads, head_dim=b.head_dim,
                     dtype=b.dtype, causal=b.causal, doc_lens=b.doc_lens, schemes=list(b.schemes),
                     iters=b.iters, warmup=b.warmup, world_size=b.world_size)
    if args.peers:
        from distattn.config import BENCH_PEERS
        spec.schemes += [p for p in BENCH_PEERS if p not in spec.schemes]
    rows, single = run_attention_bench(spec)
    print(format_table(rows, single, spec))
    write_json(args.json, {"spec": asdict(spec), "single_s": single, "rows": [asdict(r) for r in rows]})
    return 0


def cmd_bench_linear(args) -> int:
    from distattn.bench.linear import LinearBenchSpec, format_table, rows_as_dicts, run_linear_bench

    cfg = load(args)
    b = cfg.bench
    try:
        spec = LinearBenchSpec(lengths=args.lengths, worlds=args.worlds, heads=b.heads,
                               kv_heads=b.kv_heads, head_dim=b.head_dim, dtype=b.dtype,
                               schemes=args.schemes, decay=args.decay, rule=args.rule,
                               block=args.block, iters=b.iters, warmup=b.warmup,
                               softmax_max_len=args.softmax_max_len or None)
    except ValueError as e:
        raise UsageError(f"linear: {e}") from None
    return _run_and_report(args, spec, run_linear_bench, format_table, rows_as_dicts)


def cmd_bench_hetero(args) -> int:
    from distattn.bench.hetero import HeteroBenchSpec, format_table, rows_as_dicts, run_hetero_bench
    from distattn.train.trainer import hetero_options

    cfg = load(args)
    b, a = cfg.bench, cfg.attention
    spec = HeteroBenchSpec(
        lengths=args.lengths, heads=b.heads, kv_heads=b.kv_heads, head_dim=b.head_dim, dtype=b.dtype,
        world_size=b.world_size, iters=b.iters, warmup=b.warmup,
        layout=a.layout if a.layout != "weighted" else "zigzag",
        hetero=hetero_options(a))
    try:
        spec.scheme("hetero").validate(heads=b.heads, kv_heads=b.kv_heads, world=b.world_size)
    except ValueError as e:
        raise UsageError(f"hetero: {e}") from None
    return _run_and_report(args, spec, run_hetero_bench, format_table, rows_as_dicts)


def cmd_bench_cad(args) -> int:
    from distattn.bench.cad import CadBenchSpec, format_measured, format_planner, run_cad_bench

    if args.heads % args.kv_heads:
        raise UsageError(f"cad: --heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}; "
                         f"pick --kv-heads among {_divisors(args.heads)}")
    cfg = load(args)
    b = cfg.bench
    try:
        spec = CadBenchSpec(
            dists=args.dists, world=args.world, servers=args.servers,
            tokens_per_rank=args.tokens_per_rank, length_scale=args.length_scale, heads=args.heads,
            kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=b.dtype, iters=b.iters,
            warmup=b.warmup, modes=args.modes, plan_world=args.plan_world,
            plan_tokens=args.plan_tokens, plan_batches=args.plan_batches, tolerance=args.tolerance,
            min_shard=args.min_shard, token_cost=args.token_cost)
    except ValueError as e:
        raise UsageError(f"cad: {e}") from None
    res = run_cad_bench(spec, planner=not args.no_planner, measured=not args.no_measured,
                        log=lambda m: print(m, file=sys.stderr, flush=True))
    from distattn.bench.cad import PlanRow, RunRow
    if "planner" in res:
        print(format_planner([PlanRow(**r) for r in res["planner"]], spec))
    if "measured" in res:
        print(format_measured([RunRow(**r) for r in res["measured"]], spec, res["token_cost"]))
    write_json(args.json, res)
    return 0


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks", formatter_class=HelpFormatter)
    bsub = bench.add_subparsers(dest="what", required=True, metavar="WHAT")
    ba = bsub.add_parser("attention", help="softmax CP schemes side by side (fwd+bwd) on local ranks",
                         formatter_class=HelpFormatter)
    add_config_args(ba)
    ba.add_argument("--peers", action="store_true",
                    help="also run DeepSpeed-Ulysses, a non-balanced ring and ring-flash-attn's zigzag ring "
                         "(on our CPU kernel) in the same job")
    ba.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    ba.set_defaults(fn=cmd_bench_attention)
    bl = bsub.add_parser("linear", help="linear attention (lasp2, lasp1) next to softmax (ring, "
                                        "allgather), fwd+bwd, over lengths and world sizes",
                         formatter_class=HelpFormatter)
    add_config_args(bl)
    bl.add_argument("--lengths", type=int_list, default="4096,8192,16384", metavar="N1,N2,...",
                    help="comma-separated sequence lengths")
    bl.add_argument("--worlds", type=int_list, default="2,4", metavar="W1,W2,...",
                    help="comma-separated world sizes")
    bl.add_argument("--schemes", type=choice_list(LINEAR_BENCH_SCHEMES), default="lasp2,lasp1,ring,allgather",
                    metavar="S1,S2,...", help=f"comma-separated schemes among {', '.join(LINEAR_BENCH_SCHEMES)}")
    bl.add_argument("--decay", type=decay, default=None,
                    help="per-head decay lambda in (0, 1] (default: none, plain linear attention)")
    bl.add_argument("--rule", choices=("decay", "gated_delta", "kda"), default="decay",
                    help="what lasp2/lasp1 run: (decayed) linear attention, or the delta rule with Gated "
                         "DeltaNet's scalar gate or KDA's per-channel gate (needs kv_heads = heads)")
    bl.add_argument("--block", type=positive_int, default=64, help="linear kernel block size (tokens)")
    bl.add_argument("--softmax-max-len", type=nonneg_int, default=16384,
                    help="skip softmax schemes above this length (0: never skip)")
    bl.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    bl.set_defaults(fn=cmd_bench_linear)
    bh = bsub.add_parser("hetero", help="heterogeneous per-head shards (hetero) vs dense ring, fwd+bwd, "
                                        "over lengths: speed-up and bytes ratio", formatter_class=HelpFormatter)
    add_config_args(bh)
    bh.add_argument("--lengths", type=int_list, default="2048,4096,8192", metavar="N1,N2,...",
                    help="comma-separated sequence lengths")
    bh.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    bh.set_defaults(fn=cmd_bench_hetero)
    bc = bsub.add_parser("cad", help="core attention disaggregation vs packing and per-document CP on "
                                     "long-tailed document lengths (planner figures + measured fwd+bwd)",
                         formatter_class=HelpFormatter)
    add_config_args(bc)
    bc.add_argument("--dists", type=choice_list(CAD_DISTS), default="stdlib,lognormal", metavar="D1,D2",
                    help="length distributions: stdlib (Python stdlib file sizes), lognormal")
    bc.add_argument("--world", type=positive_int, default=4, help="token-owning ranks of the measured run")
    bc.add_argument("--servers", type=nonneg_int, default=0,
                    help="dedicated attention servers of 'cad dedicated' (0: as many as --world)")
    bc.add_argument("--tokens-per-rank", type=positive_int, default=8192, help="measured run: tokens per rank")
    bc.add_argument("--length-scale", type=positive_float, default=1 / 8,
                    help="measured run: document lengths are multiplied by this")
    bc.add_argument("--heads", type=positive_int, default=4, help="measured run: attention heads")
    bc.add_argument("--kv-heads", type=positive_int, default=2,
                    help="measured run: KV heads (must divide --heads)")
    bc.add_argument("--head-dim", type=positive_int, default=32, help="measured run: head dimension")
    bc.add_argument("--modes", type=choice_list(CAD_MODES), default=",".join(CAD_MODES), metavar="M1,M2,...",
                    help="comma-separated regimes to measure")
    bc.add_argument("--plan-world", type=positive_int, default=8, help="planner figures: ranks")
    bc.add_argument("--plan-tokens", type=int_list, default="65536,131072,262144,524288", metavar="T1,T2,...",
                    help="planner figures: tokens per rank (comma-separated)")
    bc.add_argument("--plan-batches", type=positive_int, default=5, help="planner figures: batches per row")
    bc.add_argument("--tolerance", type=nonneg_float, default=0.02, help="CAD planner tolerance")
    bc.add_argument("--min-shard", type=positive_int, default=128, help="CAD planner minimum shard (tokens)")
    bc.add_argument("--token-cost", type=token_cost, default="auto",
                    help="measured run: CAD planner cost per query token in pairs, or 'auto' to fit "
                         "it to this machine's kernel (planner figures use 0)")
    bc.add_argument("--no-planner", action="store_true", help="skip the planner figures")
    bc.add_argument("--no-measured", action="store_true", help="skip the measured run")
    bc.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    bc.set_defaults(fn=cmd_bench_cad)
    from distattn.bench.balance import add_parser as add_bench_balance
    add_bench_balance(bsub)
