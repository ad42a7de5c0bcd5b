"""Checkpoint and resume with torch.distributed.checkpoint.

Model, optimizer and scheduler go through DCP (replicated tensors are written
once, and a checkpoint loads under any dp/cp split). What differs per dp rank,
the data position, and each rank's RNG state go to small per-rank files beside
it, so a resumed run sees exactly the samples an uninterrupted run would.
Under DeepSpeed ZeRO the optimizer state is partitioned by DeepSpeed, so its own
checkpoint format is used for model and optimizer. Under tensor parallelism
(parallel.tp > 1) each tp rank's parts go under keys of their own
(`tp<R>.<name>`, `tp_keys`), so a checkpoint resumes on the same tp and any cp.

A checkpoint is complete once rank 0 has written meta.json (with the size of
every per-rank file) and its config.yaml; only then does the `latest` marker
move to it. `distattn.train.resume` checks all of that before a resume.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from distattn.comm import Comm
from distattn.train.resume import CheckpointError, describe_incompatible, incompatibilities, latest, saved_config
from distattn.train.resume import step_dir as _step_dir

__all__ = ["save", "load", "latest", "prune"]


def save(tr) -> Path:
    root = tr.ckpt_dir
    path = _step_dir(root, tr.step)
    if tr.rank == 0:
        # DCP writes into a fresh directory: an unfinished save of this step (a restarted
        # job) or a step the driver was allowed to replace goes first
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    Comm(tr.mesh.trainer_group).barrier()
    if tr.engine is not None:
        tr.engine.save_checkpoint(str(path), tag="deepspeed")
    else:
        msd, osd = get_state_dict(tr.model, tr.optimizer)
        dcp.save(tp_keys({"model": msd, "optim": osd}, tr), checkpoint_id=str(path / "dcp"),
                 process_group=tr.mesh.trainer_group)
    torch.save({"step": tr.step, "scheduler": tr.scheduler.state_dict(),
                "data": tr.stream.state_dict(), "rng": torch.get_rng_state()},
               path / f"rank{tr.rank:05d}.pt")
    Comm(tr.mesh.trainer_group).barrier()
    if tr.rank == 0:
        from distattn.config import save_config
        save_config(tr.cfg, path / "config.yaml")  # what the tensors' shapes come from
        files = {f.name: f.stat().st_size for f in sorted(path.glob("rank*.pt"))}
        meta = {"step": tr.step, "dp": tr.cfg.parallel.dp, "cp": tr.cfg.parallel.cp, "tp": tr.cfg.parallel.tp,
                "world": tr.world, "zero_stage": tr.cfg.train.zero_stage, "rank_files": files}
        (path / "meta.json").write_text(json.dumps(meta))
        (root / "latest").write_text(path.name)
    Comm(tr.mesh.trainer_group).barrier()
    return path


def load(tr, target: bool | str | Path = True) -> Path:
    """Restore `target` (True: the run's latest checkpoint; a path: that checkpoint directory).

    `distattn train` has already resolved and verified it in the driver; the
    settings check here guards direct users of the Trainer.
    """
    path = latest(tr.ckpt_dir) if target is True else Path(target)
    if path is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {tr.ckpt_dir} (no 'latest' marker); "
                                "train with train.ckpt_every > 0 first, or drop --resume")
    meta = json.loads((path / "meta.json").read_text())
    diffs = incompatibilities(tr.cfg, meta, saved_config(path))
    if diffs:
        raise CheckpointError(describe_incompatible(path, diffs))
    if tr.engine is not None:
        tr.engine.load_checkpoint(str(path), tag="deepspeed")
    else:
        msd, osd = get_state_dict(tr.model, tr.optimizer)
        state = tp_keys({"model": msd, "optim": osd}, tr)
        dcp.load(state, checkpoint_id=str(path / "dcp"), process_group=tr.mesh.trainer_group)
        state = tp_keys(state, tr, undo=True)
        set_state_dict(tr.model, tr.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
    # per-rank extras: this rank's own file when the world matches, else its dp group leader's
    own = path / f"rank{tr.rank:05d}.pt"
    src = own if own.exists() and meta["world"] == tr.world else \
        path / f"rank{tr.dp_rank * meta['cp'] * meta.get('tp', 1):05d}.pt"
    extra = torch.load(src, weights_only=False)
    tr.step = extra["step"]
    tr.scheduler.load_state_dict(extra["scheduler"])
    tr.stream.load_state_dict(extra["data"])
    torch.set_rng_state(extra["rng"])
    return path


def tp_keys(state: dict, tr, undo: bool = False) -> dict:
    """{"model", "optim"} state dicts with each name under this tp rank's prefix (or back, `undo`).

    DCP writes a name once, taking ranks that share it for replicas; tp ranks hold
    different parts under the same names, so each tp rank's names get their own prefix.
    """
    if tr.cfg.parallel.tp == 1:
        return state
    prefix = f"tp{tr.mesh.coords.tp}."

    def key(k: str) -> str:
        return k[len(prefix):] if undo else prefix + k
    osd = dict(state["optim"])
    osd["state"] = {key(k): v for k, v in osd.get("state", {}).items()}
    osd["param_groups"] = [{**g, "params": [key(k) for k in g["params"]]} for g in osd.get("param_groups", [])]
    return {"model": {key(k): v for k, v in state["model"].items()}, "optim": osd}


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    dirs = sorted(root.glob("step_*"))
    for d in dirs[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
