"""Start a training run: under torchrun (env already set) or as local processes.

`distattn train` validates the config first, so a bad config fails before any
process or process group starts.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import asdict

import torch


def resolve_backend(cfg) -> str:
    b = cfg.parallel.backend
    if b == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if b == "nccl" and not torch.cuda.is_available():
        raise ValueError("parallel.backend=nccl needs CUDA devices; none is visible here. "
                         "Use parallel.backend=gloo (or auto)")
    return b


def _rank_main(cfg_dict: dict, resume: bool, quiet: bool):
    from distattn.config import Config
    from distattn.train.trainer import Trainer
    import torch.distributed as dist
    from distattn.train.serve import is_server_rank, serve_attention
    cfg = Config.model_validate(cfg_dict)
    if is_server_rank(cfg, dist.get_rank()):
        serve_attention(cfg)
        return None
    tr = Trainer(cfg, resume=resume, quiet=quiet)
    hist = tr.fit()
    tr.mesh.destroy()
    return [asdict(h) for h in hist] if dist.get_rank() == 0 else None


def train_local(cfg, resume: bool = False, quiet: bool = False, threads: int | None = None) -> list[dict]:
    """Spawn parallel.world_size local ranks and train; returns rank 0's step logs."""
    from distattn.multiproc import RankPool
    backend = resolve_backend(cfg)
    world = cfg.parallel.world_size
    n_threads = threads or max(1, (os.cpu_count() or 1) // world)
    pool = RankPool(world, backend=backend, threads=n_threads, pg_timeout_s=cfg.train.comm_timeout_s)
    try:
        out = pool.run(_rank_main, cfg.model_dump(), resume, quiet, timeout=10**7)
    finally:
        pool.close()
    return out[0]


def train_torchrun(cfg, resume: bool = False) -> list[dict] | None:
    """Inside torchrun (RANK/WORLD_SIZE/MASTER_ADDR set): one process = one rank."""
    import torch.distributed as dist
    world = int(os.environ["WORLD_SIZE"])
    if world != cfg.parallel.world_size:
        raise ValueError(f"torchrun started {world} processes but parallel.world_size="
                         f"{cfg.parallel.world_size}; set --nproc-per-node accordingly or "
                         f"--set parallel.world_size={world}")
    backend = resolve_backend(cfg)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.train.comm_timeout_s))
    try:
        return _rank_main(cfg.model_dump(), resume, False)
    finally:
        dist.destroy_process_group()


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
