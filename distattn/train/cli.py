"""`distattn train`: argument parsing and the command (registered by `distattn.cli`)."""
from __future__ import annotations

import sys

from distattn.cli_args import HelpFormatter, UsageError, add_config_args, load


def pick_launcher(requested: str, address: str | None) -> str:
    """auto: torchrun's env if present, else Ray (a dependency), else local processes."""
    import importlib.util

    from distattn.train.launch import under_torchrun
    if requested != "auto":
        return requested
    if under_torchrun():
        return "torchrun"
    return "ray" if importlib.util.find_spec("ray") is not None else "local"


def _torchrun_rank() -> int:
    import os
    return int(os.environ.get("RANK", "0"))


def cmd_train(args) -> int:
    from distattn.train.launch import train_local, train_torchrun, under_torchrun
    from distattn.train.preflight import check

    cfg = load(args)  # validated before any process starts
    launcher = pick_launcher(args.launcher, args.address)
    if args.address and launcher != "ray":
        print(f"distattn: --address needs the Ray launcher, not --launcher {launcher}", file=sys.stderr)
        return 2
    if launcher == "torchrun" and not under_torchrun():
        print("distattn: --launcher torchrun: RANK, WORLD_SIZE and MASTER_ADDR are not set; start "
              "with `torchrun --nproc-per-node N -m distattn.cli train ...`", file=sys.stderr)
        return 2
    # under torchrun every rank checks the same files; rank 0 alone speaks and deletes
    lead = launcher != "torchrun" or _torchrun_rank() == 0
    try:
        plan = check(cfg, resume=args.resume, overwrite=args.overwrite, config_path=args.config)
    except UsageError:
        if not lead:
            return 2
        raise
    if lead:
        plan.apply(lambda line: print(line, flush=True))
    from distattn.train.launch_errors import LaunchError, WorkerFailure  # no Ray import
    try:
        if launcher == "torchrun":
            hist = train_torchrun(cfg, resume=plan.resume)
        elif launcher == "local":
            hist = train_local(cfg, resume=plan.resume)
        else:
            from distattn.train.ray_launch import train_ray
            hist = train_ray(cfg, resume=plan.resume, address=args.address)
    except LaunchError as e:
        print(f"distattn: launch error: {e}", file=sys.stderr)
        return 2
    except WorkerFailure as e:  # one line per rank that caused it, with its log file
        print(f"distattn: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("distattn: interrupted; all ranks stopped", file=sys.stderr)
        return 130
    if hist and lead:
        first, last = hist[0], hist[-1]
        print(f"done: {len(hist)} steps, loss {first['loss']:.4f} -> {last['loss']:.4f}; "
              f"run directory {cfg.run.output_dir}", flush=True)
    return 0


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model (on Ray, local ranks, or one rank per process "
                                     "under torchrun)", formatter_class=HelpFormatter)
    add_config_args(t)
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="STEP|PATH",
                   help="continue the run in run.output_dir: alone, from its latest checkpoint; with a "
                        "step, from that step's checkpoint; with a path, from that checkpoint directory "
                        "(checked before any rank starts)")
    t.add_argument("--overwrite", action="store_true",
                   help="start over in a run directory that holds an earlier run: deletes its "
                        "checkpoints and TensorBoard event files first (with --resume STEP: the "
                        "checkpoints after STEP)")
    t.add_argument("--launcher", choices=("auto", "ray", "local", "torchrun"), default="auto",
                   help="auto (default): torchrun's env if set, else Ray; local: spawned processes "
                        "on this machine, no Ray")
    t.add_argument("--address", default=None,
                   help="existing Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: "
                        "RAY_ADDRESS, else a local cluster sized from the config)")
    t.set_defaults(fn=cmd_train)
