"""`distattn` command line: train, bench, config.

Every command takes a YAML config (default: the embedded configs/default.yaml)
and `--set a.b=c` overrides, validated before anything starts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config (default: the embedded configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set bench.seq_len=16384 (repeatable)")


def _load(args):
    from distattn.config import load_config
    return load_config(args.config, args.overrides)


def cmd_bench_attention(args) -> int:
    from distattn.bench.attention import BenchSpec, format_table, run_attention_bench

    cfg = _load(args)
    b = cfg.bench
    spec = BenchSpec(seq_len=b.seq_len, heads=b.heads, kv_heads=b.kv_heads, head_dim=b.head_dim,
                     dtype=b.dtype, causal=b.causal, doc_lens=b.doc_lens, schemes=list(b.schemes),
                     iters=b.iters, warmup=b.warmup, world_size=b.world_size)
    if args.peers:
        spec.schemes += [p for p in ("ring-unbalanced", "deepspeed-ulysses") if p not in spec.schemes]
    rows, single = run_attention_bench(spec)
    print(format_table(rows, single, spec))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"spec": asdict(spec), "single_s": single,
                                               "rows": [asdict(r) for r in rows]}, indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_train(args) -> int:
    from distattn.train.launch import train_local, train_torchrun, under_torchrun

    cfg = _load(args)  # validated before any process starts
    if under_torchrun():
        train_torchrun(cfg, resume=args.resume)
    else:
        hist = train_local(cfg, resume=args.resume)
        if hist:
            first, last = hist[0], hist[-1]
            print(f"done: {len(hist)} steps, loss {first['loss']:.4f} -> {last['loss']:.4f}; "
                  f"run directory {cfg.run.output_dir}")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def cmd_bench_linear(args) -> int:
    from distattn.bench.linear import LinearBenchSpec, format_table, rows_as_dicts, run_linear_bench

    cfg = _load(args)
    b = cfg.bench
    try:
        spec = LinearBenchSpec(lengths=args.lengths, worlds=args.worlds, heads=b.heads,
                               kv_heads=b.kv_heads, head_dim=b.head_dim, dtype=b.dtype,
                               schemes=[s for s in args.schemes.split(",") if s], decay=args.decay,
                               block=args.block, iters=b.iters, warmup=b.warmup,
                               softmax_max_len=args.softmax_max_len or None)
    except ValueError as e:
        print(f"distattn: bench linear: {e}", file=sys.stderr)
        return 2
    rows = run_linear_bench(spec, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(rows, spec))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"spec": asdict(spec), "rows": rows_as_dicts(rows)},
                                              indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_config(args) -> int:
    cfg = _load(args)
    sys.stdout.write(cfg.to_yaml())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distattn", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="what", required=True)
    ba = bsub.add_parser("attention", help="softmax CP schemes side by side (fwd+bwd) on local ranks")
    _add_config_args(ba)
    ba.add_argument("--peers", action="store_true",
                    help="also run DeepSpeed-Ulysses and a non-balanced ring in the same job")
    ba.add_argument("--json", default=None, help="also write the results as JSON here")
    ba.set_defaults(fn=cmd_bench_attention)
    bl = bsub.add_parser("linear", help="linear attention (lasp2, lasp1) next to softmax (ring, "
                                        "allgather), fwd+bwd, over lengths and world sizes")
    _add_config_args(bl)
    bl.add_argument("--lengths", type=_int_list, default=[4096, 8192, 16384],
                    help="comma-separated sequence lengths (default 4096,8192,16384)")
    bl.add_argument("--worlds", type=_int_list, default=[2, 4],
                    help="comma-separated world sizes (default 2,4)")
    bl.add_argument("--schemes", default="lasp2,lasp1,ring,allgather",
                    help="comma-separated schemes among lasp2, lasp1, ring, allgather")
    bl.add_argument("--decay", type=float, default=None, help="per-head decay lambda in (0, 1]")
    bl.add_argument("--block", type=int, default=64, help="linear kernel block size (tokens)")
    bl.add_argument("--softmax-max-len", type=int, default=16384,
                    help="skip softmax schemes above this length (0: never skip)")
    bl.add_argument("--json", default=None, help="also write the results as JSON here")
    bl.set_defaults(fn=cmd_bench_linear)

    t = sub.add_parser("train", help="train a model (local ranks, or one rank per process under torchrun)")
    _add_config_args(t)
    t.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser("config", help="print the resolved config as YAML")
    _add_config_args(c)
    c.set_defaults(fn=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args = build_parser().parse_args(argv)
    from distattn.config import ConfigError
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"distattn: config error:\n{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
