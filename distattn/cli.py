"""`distattn` command line: bench, config.

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
