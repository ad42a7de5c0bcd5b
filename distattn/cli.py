"""`distattn` command line: train, eval, convert, bench, config, profile, sweep, simulate, plan.

Every command takes a YAML config (default: the embedded configs/default.yaml)
and `--set a.b=c` overrides, validated before anything starts.
"""
from __future__ import annotations

import argparse
import os
import sys

from distattn.cli_args import HelpFormatter, UsageError, add_config_args, int_list, load

# kept importable from here: older scripts and tests use these names
_add_config_args, _int_list, _load = add_config_args, int_list, load


def pick_launcher(requested: str, address: str | None) -> str:
    from distattn.train.cli import pick_launcher as pick
    return pick(requested, address)


def cmd_config(args) -> int:
    cfg = load(args)
    sys.stdout.write(cfg.to_yaml())
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("distattn")
    except PackageNotFoundError:  # run from a source tree without an install
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distattn", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"distattn {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from distattn.bench.cli import add_parser as add_bench
    add_bench(sub)
    from distattn.train.cli import add_parser as add_train
    add_train(sub)
    c = sub.add_parser("config", help="print the resolved, validated config as YAML",
                       formatter_class=HelpFormatter)
    add_config_args(c)
    c.set_defaults(fn=cmd_config)

    # profiling, context-length sweeps and cluster projections (their own modules)
    from distattn.profile.cli import add_parser as add_profile
    from distattn.sim.cli import add_parser as add_simulate
    from distattn.sweep import add_parser as add_sweep
    add_profile(sub)
    add_sweep(sub)
    add_simulate(sub)
    from distattn.sched.pack import add_plan_parser
    add_plan_parser(sub)  # distattn plan batch
    from distattn.plan.memory import add_parser as add_plan_memory
    add_plan_memory(sub)  # distattn plan memory (joins `plan` if it exists)
    from distattn.plan.parallel_cli import add_parallel_parser
    add_parallel_parser(sub)  # distattn plan parallel
    from distattn.hf.cli import add_parser as add_convert
    add_convert(sub)
    from distattn.eval.cli import add_parser as add_eval
    add_eval(sub)
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
    except UsageError as e:
        print(f"distattn {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
