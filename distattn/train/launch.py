"""Start a training run: under torchrun (env already set) or as local processes.

`distattn train` validates the config first, so a bad config fails before any
process or process group starts. Each rank's output is also written to
`<run.output_dir>/logs/rank<R>.log`; a rank that raises leaves its traceback there
and the driver raises `WorkerFailure`: one line per rank that caused the failure.
"""
from __future__ import annotations

import datetime
import os

import torch

from distattn.train import quiet as noise
from distattn.train.launch_errors import WorkerFailure
from distattn.train.ranklog import RankFailure, first_causes, log_path, run_logged


def resolve_backend(cfg) -> str:
    b = cfg.parallel.backend
    if b == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if b == "nccl" and not torch.cuda.is_available():
        raise ValueError("parallel.backend=nccl needs CUDA devices; none is visible here. "
                         "Use parallel.backend=gloo (or auto)")
    return b


class RankFailed(RuntimeError):
    """A rank's failure, already written to its log; `report` is the driver's one line."""

    def __init__(self, report: RankFailure):
        super().__init__(report.line())
        self.report = report


def _train_or_serve(cfg, resume, quiet: bool):
    from dataclasses import asdict

    import torch.distributed as dist

    from distattn.train.hooks import Fault, hooked_trainer
    from distattn.train.serve import is_server_rank, serve_attention
    if is_server_rank(cfg, dist.get_rank()):
        serve_attention(cfg)
        return None
    tr = hooked_trainer(cfg, resume, quiet, Fault.from_env())
    hist = tr.fit()
    tr.mesh.destroy()
    return [asdict(h) for h in hist] if dist.get_rank() == 0 else None


def _rank_main(cfg_dict: dict, resume, quiet: bool):
    """One rank (process group already up): rank 0's step logs, None elsewhere; raises
    RankFailed, with the traceback in the rank's log, when it fails."""
    import torch.distributed as dist

    from distattn.config import Config
    from distattn.train.serve import is_server_rank
    noise.install()
    cfg = Config.model_validate(cfg_dict)
    rank = dist.get_rank()
    role = "server" if is_server_rank(cfg, rank) else "trainer"
    out = run_logged(cfg.run.output_dir, rank, role, _train_or_serve, cfg, resume, quiet)
    if isinstance(out, RankFailure):
        raise RankFailed(out)
    return out


def _failures(err, output_dir) -> list[RankFailure]:
    """The ranks' one-line failures from a RankPool error."""
    out = [r for r in err.reports.values() if isinstance(r, RankFailure)]
    seen = {f.rank for f in out}
    for rank, code in sorted(err.died.items()):
        if rank not in seen:
            why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            out.append(RankFailure(rank=rank, message=f"its process died ({why})",
                                   log=str(log_path(output_dir, rank))))
            seen.add(rank)
    for rank, tb in sorted(err.tracebacks.items()):  # raised outside the rank's own catch
        if rank not in seen:
            last = next((ln for ln in reversed(tb.strip().splitlines()) if ln.strip()), "error")
            out.append(RankFailure(rank=rank, message=last.strip()))
    return first_causes(out) if out else [RankFailure(rank=-1, message=str(err).splitlines()[0])]


def train_local(cfg, resume=False, quiet: bool = False, threads: int | None = None) -> list[dict]:
    """Spawn parallel.world_size local ranks and train; returns rank 0's step logs.

    `resume` goes to the Trainer as given. Raises WorkerFailure when ranks fail.
    """
    from distattn.multiproc import RankError, RankPool
    noise.install()
    backend = resolve_backend(cfg)
    world = cfg.parallel.world_size
    n_threads = threads or max(1, (os.cpu_count() or 1) // world)
    try:
        pool = RankPool(world, backend=backend, threads=n_threads, pg_timeout_s=cfg.train.comm_timeout_s)
        try:
            out = pool.run(_rank_main, cfg.model_dump(), resume, quiet, timeout=10**7)
        finally:
            pool.close()
    except RankError as e:
        raise WorkerFailure.from_ranks(_failures(e, cfg.run.output_dir)) from None
    return out[0]


def train_torchrun(cfg, resume=False) -> list[dict] | None:
    """Inside torchrun (RANK/WORLD_SIZE/MASTER_ADDR set): one process = one rank."""
    import torch.distributed as dist
    noise.install()
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
    except RankFailed as e:
        raise WorkerFailure.from_ranks([e.report]) from None
    finally:
        dist.destroy_process_group()


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
