"""`distattn eval [CONFIG]`: loss by position and the retrieval heatmap of a checkpoint, through the
config's CP scheme on local ranks."""
from __future__ import annotations

import json
import os
from pathlib import Path

from distattn.cli_args import HelpFormatter, UsageError, add_config_args


def _target(args) -> str:
    """The checkpoint to evaluate: --checkpoint, eval.checkpoint, the run's latest, or model.init_from."""
    from distattn.config import load_config
    if args.checkpoint:
        return args.checkpoint
    cfg = load_config(args.config, args.overrides)
    if cfg.eval.checkpoint:
        return cfg.eval.checkpoint
    run = Path(cfg.run.output_dir)
    if (run / "checkpoints" / "latest").is_file():
        return str(run)
    if cfg.model.init_from:
        return cfg.model.init_from
    raise UsageError(f"nothing to evaluate: {run} has no checkpoints and model.init_from is not set; train "
                     f"first, or give --checkpoint PATH (a run directory, a checkpoint, or a Hugging Face model)")


def _step_of(target: str) -> int:
    """The training step of a distattn checkpoint (TensorBoard's step); 0 for a Hugging Face model."""
    from distattn.hf.convert import locate_distattn
    from distattn.train.init_weights import is_hf_directory
    if is_hf_directory(target):
        return 0
    return int(locate_distattn(target)[2].get("step", 0))


def cmd_eval(args) -> int:
    from distattn.config import load_config
    from distattn.train import quiet
    quiet.install()
    target = _target(args)
    # the shape comes from the checkpoint; keys of the config that contradict it are refused here
    overrides = [o for o in args.overrides if not o.startswith("model.init_from=")]
    cfg = load_config(args.config, overrides + [f"model.init_from={target}"])
    if cfg.parallel.attention_servers:
        raise UsageError("eval runs colocated schemes; set parallel.attention_servers=0 (cad works colocated)")
    out = Path(cfg.eval.out_dir or Path(cfg.run.output_dir) / "eval")
    from distattn.eval.report import format_summary, write_curve, write_grid, write_tensorboard
    from distattn.eval.run import eval_on_rank
    from distattn.multiproc import RankPool
    from distattn.train.launch import resolve_backend
    world = cfg.parallel.world_size
    print(f"distattn eval: {target} on {world} local rank{'s' if world != 1 else ''} "
          f"(dp={cfg.parallel.dp} cp={cfg.parallel.cp} scheme={cfg.attention.scheme})", flush=True)
    pool = RankPool(world, backend=resolve_backend(cfg), threads=max(1, (os.cpu_count() or 1) // world),
                    pg_timeout_s=cfg.train.comm_timeout_s)
    try:
        res = pool.run(eval_on_rank, cfg.model_dump(), target, timeout=10**7)[0]
    finally:
        pool.close()
    title = f"{Path(target).name}: {cfg.attention.scheme} cp={cfg.parallel.cp}"
    files = write_curve(out, res["curve"], f"loss by position, {title}")
    files += write_grid(out, res["grid"], f"{res['grid']['task']} retrieval, {title}")
    tb = write_tensorboard(out, res["curve"], res["grid"], _step_of(target))
    (out / "eval.json").write_text(json.dumps({"checkpoint": target, **res}, indent=2))
    print(format_summary(res["curve"], res["grid"]))
    print(f"wrote {', '.join(str(f) for f in files)}, {out / 'eval.json'} and TensorBoard scalars in {tb}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="loss by position and a retrieval heatmap (context length x answer depth) of "
                                    "a checkpoint, through the config's CP scheme", formatter_class=HelpFormatter)
    add_config_args(p)
    p.add_argument("--checkpoint", default=None,
                   help="a run directory (its latest checkpoint), a checkpoint step, a converted model or a "
                        "Hugging Face directory (default: eval.checkpoint, else the run's latest, else "
                        "model.init_from)")
    p.set_defaults(fn=cmd_eval)


__all__ = ["add_parser", "cmd_eval"]
