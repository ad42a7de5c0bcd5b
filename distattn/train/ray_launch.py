"""Run `distattn train` on a Ray cluster: placement, roles, streamed logs, restarts.

The pieces, one job each:
- `ray_cluster`: connect to the cluster (an address, `RAY_ADDRESS`, or a local one
  started for this job), failing fast with the fix when nobody answers; its nodes;
- `ray_plan`: check the job against the nodes and plan where each rank goes;
- `ray_workers`: one attempt's ranks (placement groups per role, one actor per
  rank, the torch.distributed environment);
- `ray_rank`: what runs on every rank (its output teed into
  `<run.output_dir>/logs/rank<R>.log`, its exception caught there);
- `ray_job`: the job (restarts after a worker dies) and the two engines, `actors`
  and Ray Train's `ray_train`.

This module gathers their public names, so `distattn.train.ray_launch` stays the
one import for the CLI and the tests.
"""
from __future__ import annotations

from distattn.train.launch_errors import LaunchError, WorkerFailure
from distattn.train.ray_cluster import cluster_nodes, connect, ray_session
from distattn.train.ray_job import JobState, train_ray
from distattn.train.ray_plan import SERVER, TRAINER, NodeInfo, Plan, RankSlot, plan_placement
from distattn.train.hooks import FAULT_ENV, Fault
from distattn.train.ray_rank import probe_rank, rank_main
from distattn.train.ray_workers import Rank, RankWorker, WorkerGroup, WorkersDied

__all__ = ["FAULT_ENV", "SERVER", "TRAINER", "Fault", "JobState", "LaunchError", "NodeInfo", "Plan",
           "Rank", "RankSlot", "RankWorker", "WorkerFailure", "WorkerGroup", "WorkersDied",
           "cluster_nodes", "connect", "plan_placement", "probe_rank", "rank_main", "ray_session",
           "train_ray"]
