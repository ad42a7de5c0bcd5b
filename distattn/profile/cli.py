"""`distattn profile`: argument parsing and the command (registered by `distattn.cli`).

Every argument is checked before anything is written or any rank starts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

TRACE_SUFFIXES = (".json", ".json.gz")


def add_parser(sub) -> argparse.ArgumentParser:
    from distattn.cli_args import HelpFormatter, add_config_args, nonneg_int, positive_int
    from distattn.plan.cli import scheme_list

    p = sub.add_parser(
        "profile", formatter_class=HelpFormatter,
        help="a few training steps under torch.profiler: Chrome traces per rank, compute / "
             "communication / exposed time and overlap per rank and scheme, timeline PNGs")
    add_config_args(p)
    p.add_argument("--schemes", type=scheme_list, default=None, metavar="S1,S2,...",
                   help="comma-separated schemes to profile one after the other (default: the config's "
                        "attention.scheme); lasp2 / lasp1 profile the model with linear layers")
    p.add_argument("--steps", type=positive_int, default=3, help="profiled training steps")
    p.add_argument("--warmup", type=nonneg_int, default=1, help="unprofiled steps first")
    p.add_argument("--out", default="runs/profile", metavar="DIR",
                   help="output directory: traces/<scheme>/rank<r>.json, report.md/.csv/.json, "
                        "timeline_<scheme>.png, tensorboard/")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per rank")
    p.add_argument("--mode", choices=("auto", "cpu", "gpu"), default="auto",
                   help="trace analysis: gpu reads device kernels (NCCL = communication), cpu reads "
                        "the host labels and gloo events; auto picks gpu when kernels are present")
    p.add_argument("--analyze", nargs="+", default=None, metavar="TRACE",
                   help="analyse existing Chrome traces (files, directories of rank traces, or a "
                        "traces/ directory of per-scheme directories) instead of running; e.g. traces "
                        "from a torchrun job on GPUs")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard scalars")
    p.set_defaults(fn=cmd_profile)
    return p


def _is_trace(p: Path) -> bool:
    return p.is_file() and p.name.endswith(TRACE_SUFFIXES)


def _trace_files(items) -> list[Path]:
    """Trace files named directly, in a directory, or one level down (traces/<scheme>/rank<r>.json)."""
    from distattn.cli_args import UsageError
    files: list[Path] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            here = sorted(x for x in p.iterdir() if _is_trace(x))
            if not here:
                here = sorted(x for d in sorted(p.iterdir()) if d.is_dir() for x in d.iterdir() if _is_trace(x))
            files += here
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"--analyze {it}: no such trace file or directory")
    if not files:
        raise UsageError(f"--analyze {' '.join(map(str, items))}: no .json / .json.gz traces found")
    return files


def scheme_of(path: Path, meta: dict) -> str:
    """The scheme a trace was taken with: its metadata, else the runner's traces/<scheme>/ directory,
    else "trace"."""
    from distattn.config.sections import SCHEMES
    from distattn.profile.trace import SCHEME_KEY
    named = meta.get(SCHEME_KEY)
    if isinstance(named, str) and named:
        return named
    parent = path.parent
    if parent.name in SCHEMES or parent.parent.name == "traces":
        return parent.name
    return "trace"


def _analyze(args) -> int:
    from distattn.profile.report import build_rows, format_report, summarize, write_report
    from distattn.profile.trace import analyze, load_trace
    from distattn.profile.timeline import plot_timeline

    files = _trace_files(args.analyze)
    by_scheme: dict[str, list] = {}
    for f in files:
        try:
            trace = load_trace(f)
        except (OSError, ValueError, UnicodeDecodeError, EOFError) as e:
            from distattn.cli_args import UsageError
            raise UsageError(f"--analyze {f}: not a readable Chrome trace ({str(e).splitlines()[0]})") from None
        by_scheme.setdefault(scheme_of(f, trace.meta), []).append(analyze(trace, mode=args.mode))
    out = Path(args.out)
    rows, summaries, pngs = [], [], []
    for scheme, analyses in by_scheme.items():
        analyses.sort(key=lambda a: a.rank)
        srows = build_rows(scheme, analyses, None)
        rows += srows
        summaries.append(summarize(srows))
        png = plot_timeline(analyses, out / f"timeline_{scheme}.png", title=f"{scheme}: {len(analyses)} trace(s)")
        pngs.append(Path(png).name)
    write_report(out, rows, summaries, title="distattn profile --analyze (traces alone: ledger columns n/a)")
    print(format_report(rows, summaries))
    print(f"wrote {out}/report.md, report.csv, report.json, {', '.join(pngs)}")
    return 0


def cmd_profile(args) -> int:
    if args.analyze:
        return _analyze(args)
    from distattn.cli_args import load
    from distattn.profile.report import format_report
    from distattn.profile.run import ProfileSpec, run_profile

    cfg = load(args)
    spec = ProfileSpec(steps=args.steps, warmup=args.warmup, schemes=args.schemes, out_dir=args.out,
                       threads=args.threads, mode=args.mode, tensorboard=not args.no_tensorboard)
    res = run_profile(cfg, spec, log=lambda m: print(m, file=sys.stderr, flush=True))
    if res.rows:
        print(format_report(res.rows, res.summaries))
    for k in sorted(res.paths):
        print(f"{k}: {res.paths[k]}")
    for scheme, err in res.errors.items():
        print(f"distattn profile: {scheme}: {err}", file=sys.stderr)
    return 0 if res.rows and not res.errors else 1

