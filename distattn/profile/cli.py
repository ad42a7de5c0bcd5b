"""`distattn profile`: argument parsing and the command (registered by `distattn.cli`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    from distattn.cli_args import add_config_args as _add_config_args

    p = sub.add_parser(
        "profile", help="a few training steps under torch.profiler: Chrome traces per rank, compute / "
                        "communication / exposed time and overlap per rank and scheme, timeline PNGs")
    _add_config_args(p)
    p.add_argument("--schemes", default=None,
                   help="comma-separated schemes to profile one after the other (default: the config's "
                        "attention.scheme); lasp2 / lasp1 profile the model with linear layers")
    p.add_argument("--steps", type=int, default=3, help="profiled training steps (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="unprofiled steps first (default 1)")
    p.add_argument("--out", default="runs/profile",
                   help="output directory: traces/<scheme>/rank<r>.json, report.md/.csv/.json, "
                        "timeline_<scheme>.png, tensorboard/ (default runs/profile)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--mode", choices=("auto", "cpu", "gpu"), default="auto",
                   help="trace analysis: gpu reads device kernels (NCCL = communication), cpu reads "
                        "the host labels and gloo events; auto picks gpu when kernels are present")
    p.add_argument("--analyze", nargs="+", default=None, metavar="TRACE",
                   help="analyse existing Chrome traces (files or directories of rank traces) instead of "
                        "running; e.g. traces from a torchrun job on GPUs")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard scalars")
    p.set_defaults(fn=cmd_profile)
    return p


def _trace_files(items) -> list[Path]:
    files: list[Path] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            files += sorted(x for x in p.iterdir() if x.name.endswith((".json", ".json.gz")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such trace file or directory: {it}")
    return files


def cmd_profile(args) -> int:
    from distattn.profile.report import build_rows, format_report, summarize, write_report
    from distattn.profile.run import ProfileSpec, analyze_traces, run_profile
    from distattn.profile.timeline import plot_timeline

    if args.steps < 1 or args.warmup < 0:
        print("distattn profile: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    if args.analyze:
        try:
            files = _trace_files(args.analyze)
        except FileNotFoundError as e:
            print(f"distattn profile: {e}", file=sys.stderr)
            return 2
        if not files:
            print("distattn profile: no .json / .json.gz traces found", file=sys.stderr)
            return 2
        analyses = analyze_traces(files, mode=args.mode)
        rows = build_rows("trace", analyses, None)
        summaries = [summarize(rows)]
        out = Path(args.out)
        write_report(out, rows, summaries, title="distattn profile --analyze (no ledger: ledger columns are 0)")
        plot_timeline(analyses, out / "timeline_trace.png", title=f"{len(files)} trace(s)")
        print(format_report(rows, summaries))
        print(f"wrote {out}/report.md, report.csv, report.json, timeline_trace.png")
        return 0
    from distattn.cli_args import load as _load
    cfg = _load(args)
    spec = ProfileSpec(steps=args.steps, warmup=args.warmup,
                       schemes=[s for s in args.schemes.split(",") if s] if args.schemes else None,
                       out_dir=args.out, threads=args.threads, mode=args.mode,
                       tensorboard=not args.no_tensorboard)
    res = run_profile(cfg, spec, log=lambda m: print(m, file=sys.stderr, flush=True))
    if res.rows:
        print(format_report(res.rows, res.summaries))
    for k in sorted(res.paths):
        print(f"{k}: {res.paths[k]}")
    for scheme, err in res.errors.items():
        print(f"distattn profile: {scheme}: {err}", file=sys.stderr)
    return 0 if res.rows and not res.errors else 1
