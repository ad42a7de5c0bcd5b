"""Checkpoint and resume with torch.distributed.checkpoint.

Model, optimizer and scheduler go through DCP (replicated tensors are written
once, and a checkpoint loads under any dp/cp split). What differs per dp rank,
the data position, and each rank's RNG state go to small per-rank files beside
it, so a resumed run sees exactly the samples an uninterrupted run would.
Under DeepSpeed ZeRO the optimizer state is partitioned by DeepSpeed, so its own
checkpoint format is used for model and optimizer.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from distattn.comm import Comm
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def latest(root: Path) -> Path | None:
    marker = root / "latest"
    if not marker.exists():
        return None
    return root / marker.read_text().strip()


def save(tr) -> Path:
    root = tr.ckpt_dir
    path = _step_dir(root, tr.step)
    if tr.rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    Comm(tr.mesh.trainer_group).barrier()
    if tr.engine is not None:
        tr.engine.save_checkpoint(str(path), tag="deepspeed")
    else:
        msd, osd = get_state_dict(tr.model, tr.optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path / "dcp"),
                 process_group=tr.mesh.trainer_group)
    torch.save({"step": tr.step, "scheduler": tr.scheduler.state_dict(),
                "data": tr.stream.state_dict(), "rng": torch.get_rng_state()},
               path / f"rank{tr.rank:05d}.pt")
    Comm(tr.mesh.trainer_group).barrier()
    if tr.rank == 0:
        meta = {"step": tr.step, "dp": tr.cfg.parallel.dp, "cp": tr.cfg.parallel.cp,
                "world": tr.world, "zero_stage": tr.cfg.train.zero_stage}
        (path / "meta.json").write_text(json.dumps(meta))
        (root / "latest").write_text(path.name)
    Comm(tr.mesh.trainer_group).barrier()
    return path


def load(tr) -> None:
    path = latest(tr.ckpt_dir)
    if path is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {tr.ckpt_dir} (no 'latest' marker); "
                                "train with train.ckpt_every > 0 first, or drop --resume")
    meta = json.loads((path / "meta.json").read_text())
    p = tr.cfg.parallel
    if meta["dp"] != p.dp:
        raise ValueError(f"checkpoint {path} was written with parallel.dp={meta['dp']}, this run has "
                         f"dp={p.dp}: the data order per dp rank would change; set parallel.dp={meta['dp']} "
                         "(cp may differ)")
    if meta["zero_stage"] != tr.cfg.train.zero_stage:
        raise ValueError(f"checkpoint {path} was written with train.zero_stage={meta['zero_stage']}; "
                         f"set train.zero_stage={meta['zero_stage']} to resume it")
    if tr.engine is not None:
        if meta["world"] != tr.world:
            raise ValueError(f"ZeRO checkpoint {path} was written by {meta['world']} ranks; this run has "
                             f"{tr.world}. ZeRO partitions optimizer state per rank: resume with the same world")
        tr.engine.load_checkpoint(str(path), tag="deepspeed")
    else:
        msd, osd = get_state_dict(tr.model, tr.optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path / "dcp"), process_group=tr.mesh.trainer_group)
        set_state_dict(tr.model, tr.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
    # per-rank extras: this rank's own file when the world matches, else its dp group leader's
    own = path / f"rank{tr.rank:05d}.pt"
    src = own if own.exists() and meta["world"] == tr.world else \
        path / f"rank{tr.dp_rank * meta['cp']:05d}.pt"
    extra = torch.load(src, weights_only=False)
    tr.step = extra["step"]
    tr.scheduler.load_state_dict(extra["scheduler"])
    tr.stream.load_state_dict(extra["data"])
    torch.set_rng_state(extra["rng"])


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    dirs = sorted(root.glob("step_*"))
    for d in dirs[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
