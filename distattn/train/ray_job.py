"""A training job on Ray: the job state, the restart loop, and the two engines.

The `actors` engine starts a `WorkerGroup`, runs `rank_main` on it and, when a
worker process dies, replaces the whole group, at most `launch.max_failures`
times; the new group resumes from the checkpoint this job wrote last. The
`ray_train` engine hands the same loop to Ray Train's `TorchTrainer`. A rank that
raises is not retried: the job stops with one line per rank that caused it.
"""
from __future__ import annotations

import contextlib
import os
import sys

from distattn.train import quiet as noise

noise.ray_env()  # before `import ray`

import ray  # noqa: E402

from distattn.train.launch_errors import WorkerFailure  # noqa: E402
from distattn.train.ranklog import RankFailure, run_logged  # noqa: E402
from distattn.train.ray_cluster import cluster_nodes, ray_session  # noqa: E402
from distattn.train.ray_plan import NodeInfo, Plan, _fmt, plan_placement, plural  # noqa: E402
from distattn.train.ray_rank import Fault, rank_main, ray_trainer  # noqa: E402
from distattn.train.ray_workers import WorkerGroup, WorkersDied  # noqa: E402


@ray.remote(num_cpus=0, max_restarts=0)
class JobState:
    """Step logs of rank 0, the checkpoints this job wrote and its ranks' failures, across restarts."""

    def __init__(self):
        self.steps: dict[int, dict] = {}
        self.ckpt: tuple[int, str] | None = None
        self.attempts = 0
        self.failures: list[RankFailure] = []

    def add_step(self, log: dict) -> None:
        self.steps[log["step"]] = log  # a replayed step (after a restart) overwrites

    def add_checkpoint(self, step: int, path: str) -> None:
        self.ckpt = (step, path)

    def checkpoint(self):
        return self.ckpt

    def add_failure(self, failure: RankFailure) -> None:
        self.failures.append(failure)

    def rank_failures(self) -> list[RankFailure]:
        return list(self.failures)

    def start_attempt(self) -> int:
        self.attempts += 1
        return self.attempts

    def history(self) -> list[dict]:
        return [self.steps[s] for s in sorted(self.steps)]

    def ping(self) -> bool:
        return True


def _say(msg: str) -> None:
    print(f"distattn: {msg}", flush=True)


def _max_str(m: int) -> str:
    return "unlimited" if m < 0 else str(m)


def describe_plan(plan: Plan, where: str, engine: str) -> str:
    shape = ", ".join(f"{_fmt(v)} {k}" for k, v in plan.bundle.items())
    roles = plural(plan.trainers, "trainer")
    if plan.servers:
        roles += f", {plural(plan.servers, 'attention server')}"
    return f"{plural(plan.world, 'rank')} ({roles}), {shape} each, on the {where}; engine {engine}"


def train_ray(cfg, resume=False, address: str | None = None, quiet: bool = False) -> list[dict]:
    """Train on a Ray cluster; returns rank 0's step logs (every step once, across restarts).

    `resume` goes to the Trainer as given (False/None: fresh; True: the latest checkpoint;
    a path: that checkpoint); a group restarted after a death resumes from the checkpoint
    this job wrote last.
    """
    noise.install()
    with ray_session(cfg, address) as where:
        nodes = cluster_nodes()
        plan = plan_placement(cfg, nodes)
        fault = Fault.from_env()
        state = JobState.remote()
        if not quiet:
            _say(describe_plan(plan, where, cfg.launch.engine))
        try:
            if cfg.launch.engine == "ray_train":
                _run_ray_train(cfg, plan, resume, quiet, state, fault)
            else:
                _run_actors(cfg, plan, nodes, resume, quiet, state, fault)
            return ray.get(state.history.remote())
        finally:
            with contextlib.suppress(Exception):
                ray.kill(state)


def _run_actors(cfg, plan: Plan, nodes: list[NodeInfo], resume, quiet: bool, state, fault) -> None:
    max_failures = cfg.launch.max_failures
    failures = 0
    cur_resume = resume
    while True:
        group = WorkerGroup(plan, cfg, nodes)
        try:
            group.start(cfg.launch.start_timeout_s)
            group.run(rank_main, cfg.model_dump(), cur_resume, quiet, state, fault)
            return
        except WorkersDied as died:
            failures += 1
            ckpt = ray.get(state.checkpoint.remote())
            if 0 <= max_failures < failures:
                raise WorkerFailure(f"worker died: {died}; no restarts left (launch.max_failures="
                                    f"{max_failures}); the latest checkpoint is "
                                    f"{ckpt[1] if ckpt else 'none'}, continue with --resume") from None
            step = ckpt[0] if ckpt else _start_step(cfg, resume)
            cur_resume = ckpt[1] if ckpt else resume
            _say(f"worker died: {died}; restarting from step {step} "
                 f"(attempt {failures}/{_max_str(max_failures)})")
        finally:
            group.shutdown()


def _start_step(cfg, resume) -> int:
    """The step a fresh group starts from when this job wrote no checkpoint yet."""
    import json
    from pathlib import Path

    from distattn.train.checkpoint import latest
    if not resume:
        return 0
    path = Path(resume) if isinstance(resume, (str, os.PathLike)) else \
        latest(Path(cfg.run.output_dir) / "checkpoints")
    try:
        return int(json.loads((path / "meta.json").read_text())["step"]) if path else 0
    except (OSError, ValueError, KeyError):
        return 0


# --- Ray Train engine ------------------------------------------------------------------------

class _LinePrefix:
    """A text stream that starts every line with a prefix (Ray Train names workers by pid only)."""

    def __init__(self, stream, prefix: str):
        self._stream, self._prefix, self._bol = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for line in text.splitlines(keepends=True):
            if self._bol:
                out.append(self._prefix)
            out.append(line)
            self._bol = line.endswith("\n")
        self._stream.write("".join(out))
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _ray_train_rank(cfg, config: dict, rank: int) -> None:
    state = config["state"]
    ckpt = ray.get(state.checkpoint.remote())
    if rank == 0:
        attempt = ray.get(state.start_attempt.remote())
        if attempt > 1:
            step = ckpt[0] if ckpt else 0
            print(f"distattn: worker died in attempt {attempt - 1}; restarting from step {step} "
                  f"(attempt {attempt - 1}/{_max_str(config['max_failures'])})", flush=True)
    resume = ckpt[1] if ckpt else config["resume"]
    tr = ray_trainer(cfg, resume, config["quiet"], state, config["fault"])
    tr.fit()
    tr.mesh.destroy()
    if rank == 0:
        ray.get(state.ping.remote())


def _ray_train_loop(config: dict) -> None:
    """The TorchTrainer train function: Ray Train already set the env and process group."""
    import torch
    import torch.distributed as dist

    from distattn.config import Config
    noise.install()
    cfg = Config.model_validate(config["cfg"])
    torch.set_num_threads(config["threads"])
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rank = dist.get_rank()
    if not isinstance(sys.stdout, _LinePrefix):
        sys.stdout, sys.stderr = _LinePrefix(sys.stdout, f"[rank{rank}] "), _LinePrefix(sys.stderr, f"[rank{rank}] ")
    out = run_logged(cfg.run.output_dir, rank, "trainer", _ray_train_rank, cfg, config, rank)
    if isinstance(out, RankFailure):
        ray.get(config["state"].add_failure.remote(out))
        raise RuntimeError(out.line())  # stops the run; the driver reports it from the job state


def _run_ray_train(cfg, plan: Plan, resume, quiet: bool, state, fault) -> None:
    from pathlib import Path

    # plain prints (Ray Train's print patch would write every line twice here)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    backend = "nccl" if plan.gpus and cfg.parallel.backend != "gloo" else "gloo"
    scaling = ScalingConfig(
        num_workers=plan.world, use_gpu=plan.gpus > 0, resources_per_worker=dict(plan.bundle),
        placement_strategy=plan.strategy,
        label_selector=[{"ray.io/node-id": s.node_id} for s in plan.slots] if plan.pinned else None)
    storage = Path(cfg.run.output_dir).resolve() / "ray_train"
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"cfg": cfg.model_dump(), "state": state, "resume": resume, "quiet": quiet,
                           "fault": fault, "threads": plan.threads,
                           "max_failures": cfg.launch.max_failures},
        scaling_config=scaling,
        torch_config=TorchConfig(backend=backend, timeout_s=cfg.train.comm_timeout_s),
        run_config=RunConfig(name=cfg.run.name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=cfg.launch.max_failures)))
    try:
        trainer.fit()
    except Exception as e:
        failed = ray.get(state.rank_failures.remote())
        if failed:
            raise WorkerFailure.from_ranks(failed) from None
        raise WorkerFailure(f"Ray Train run failed: {e}") from e
