"""What runs on every rank of a Ray job: join the process group, then train or serve.

`rank_main` tees the rank's output into `<run.output_dir>/logs/rank<R>.log` and
catches its exception there, so Ray prints no task error: the driver gets a
`RankFailure` and reports it in one line. A dead process (killed, out of memory)
is the driver's to see and to restart.
"""
from __future__ import annotations

import os
from dataclasses import asdict

from distattn.train import quiet

quiet.ray_env()  # before `import ray`

import ray  # noqa: E402

from distattn.train.hooks import Fault, hooked_trainer  # noqa: E402
from distattn.train.ranklog import run_logged  # noqa: E402
from distattn.train.ray_plan import SERVER, TRAINER  # noqa: E402


def _init_process_group(cfg) -> str:
    import datetime

    import torch
    import torch.distributed as dist

    from distattn.train.launch import resolve_backend
    torch.set_num_threads(max(1, int(os.environ.get("DISTATTN_THREADS", "1"))))
    backend = resolve_backend(cfg)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=cfg.train.comm_timeout_s))
    return dist.get_backend()


def _serve(cfg) -> None:
    """Server-role ranks (the last parallel.attention_servers): answer the trainers' attention
    passes until they finish (`distattn.train.serve`); servers hold no state to resume."""
    from distattn.train.serve import serve_attention
    serve_attention(cfg)


def ray_trainer(cfg, resume, quiet: bool, state, fault: Fault | None):
    """The Trainer, reporting rank 0's step logs and checkpoints to the job state."""
    import torch.distributed as dist
    if state is None or dist.get_rank() != 0:
        return hooked_trainer(cfg, resume, quiet, fault)

    def on_checkpoint(step: int, path) -> None:
        # ordered after the step logs: once this returns they are all recorded
        ray.get(state.add_checkpoint.remote(step, str(path)))

    return hooked_trainer(cfg, resume, quiet, fault,
                          on_step=lambda log: state.add_step.remote(asdict(log)),
                          on_checkpoint=on_checkpoint)


def _train_or_serve(cfg, resume, quiet: bool, state, fault: Fault | None) -> int:
    import torch.distributed as dist

    _init_process_group(cfg)
    try:
        if os.environ.get("DISTATTN_ROLE", TRAINER) == SERVER:
            _serve(cfg)
        else:
            tr = ray_trainer(cfg, resume, quiet, state, fault)
            tr.fit()
            tr.mesh.destroy()
            if dist.get_rank() == 0 and state is not None:
                ray.get(state.ping.remote())
        return dist.get_rank()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def rank_main(cfg_dict: dict, resume, quiet: bool, state=None, fault: Fault | None = None):
    """One rank of the job, after its environment is set: its rank, or a RankFailure."""
    from distattn.config import Config
    from distattn.train import quiet as noise
    noise.install()
    cfg = Config.model_validate(cfg_dict)
    rank = int(os.environ.get("RANK", "0"))
    role = os.environ.get("DISTATTN_ROLE", TRAINER)
    return run_logged(cfg.run.output_dir, rank, role, _train_or_serve, cfg, resume, quiet, state, fault)


def probe_rank(cfg_dict: dict) -> dict:
    """Join the process group and report what this rank sees: env, backend, placement group."""
    import torch
    import torch.distributed as dist

    from distattn.config import Config
    cfg = Config.model_validate(cfg_dict)
    backend = _init_process_group(cfg)
    t = torch.ones(1)
    from distattn.comm import Comm
    Comm(None).all_reduce(t)  # the group works end to end
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR",
            "MASTER_PORT", "DISTATTN_ROLE", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
    pg = ray.util.get_current_placement_group() if ray.is_initialized() else None
    out = {"rank": dist.get_rank(), "world": dist.get_world_size(), "backend": backend,
           "sum": float(t.item()), "threads": torch.get_num_threads(), "pid": os.getpid(),
           "placement_group": pg.id.hex() if pg is not None else None,
           "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
           "env": {k: os.environ.get(k) for k in keys}}
    dist.destroy_process_group()
    return out
