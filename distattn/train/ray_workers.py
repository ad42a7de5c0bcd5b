"""The ranks of one attempt of a Ray job: placement groups per role, one actor per rank,
the torch.distributed environment, and running a function on all of them.

`WorkerGroup.run` tells apart the two ways ranks stop early: a dead process
(`WorkersDied`, which the job may restart from its latest checkpoint) and a rank
that raised (`WorkerFailure`, one line per rank that caused it).
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any, Callable

from distattn.train import quiet

quiet.ray_env()  # before `import ray`

import ray  # noqa: E402

from distattn.train.launch_errors import LaunchError, WorkerFailure  # noqa: E402
from distattn.train.ranklog import RankFailure, one_line  # noqa: E402
from distattn.train.ray_plan import SERVER, TRAINER, NodeInfo, Plan, _fmt, plural  # noqa: E402


class WorkersDied(RuntimeError):
    """One or more worker processes died (restartable)."""


class Rank:
    """One rank's process (as the Ray actor RankWorker).

    Its repr is the prefix of its streamed output: `(rank0 pid=...)`, `(rank3:server pid=...)`.
    """

    def __init__(self, rank: int, role: str):
        self.rank, self.role = rank, role
        quiet.install()  # line by line, so the driver streams it as it comes

    def __repr__(self) -> str:
        return f"rank{self.rank}" if self.role == TRAINER else f"rank{self.rank}:{self.role}"

    def where(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "pid": os.getpid(), "host": socket.gethostname()}

    def free_port(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def setup(self, env: dict[str, str]) -> None:
        os.environ.update(env)

    def call(self, fn: Callable, *args, **kwargs):
        return fn(*args, **kwargs)


RankWorker = ray.remote(max_restarts=0, max_task_retries=0)(Rank)


def _is_death(err) -> bool:
    rx = ray.exceptions
    return isinstance(err, (rx.RayActorError, rx.WorkerCrashedError, rx.NodeDiedError))


def _short(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    if isinstance(err, ray.exceptions.RayTaskError) and isinstance(cause, BaseException):
        return one_line(cause)
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


class WorkerGroup:
    """The ranks of one attempt: placement groups per role, actors, their environment."""

    def __init__(self, plan: Plan, cfg, nodes: list[NodeInfo]):
        self.plan, self.cfg = plan, cfg
        self.addresses = {n.node_id: n.address for n in nodes}
        self.pgs: dict[str, Any] = {}
        self.actors: list[Any] = []
        self.info: list[dict] = []

    def start(self, timeout: float) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        plan = self.plan
        deadline = time.monotonic() + timeout
        for role in (TRAINER, SERVER):
            slots = plan.role_slots(role)
            if not slots:
                continue
            kw = {}
            if plan.pinned:
                kw["bundle_label_selector"] = [{"ray.io/node-id": s.node_id} for s in slots]
            self.pgs[role] = placement_group([dict(plan.bundle) for _ in slots], strategy=plan.strategy,
                                             name=f"distattn-{role}s", **kw)
        for role, pg in self.pgs.items():
            ready, _ = ray.wait([pg.ready()], timeout=max(0.1, deadline - time.monotonic()))
            if not ready:
                free = ray.available_resources()
                have = ", ".join(f"{_fmt(free.get(k, 0.0))} {k}" for k in plan.bundle)
                raise LaunchError(
                    f"the cluster did not grant {plural(len(plan.role_slots(role)), role + ' worker')} of "
                    f"{plan.bundle} ({plan.strategy}) within launch.start_timeout_s="
                    f"{self.cfg.launch.start_timeout_s}s; free now: {have} (other jobs may hold the rest)")
        index = {TRAINER: 0, SERVER: 0}
        for s in plan.slots:
            i = index[s.role]
            index[s.role] += 1
            strategy = PlacementGroupSchedulingStrategy(placement_group=self.pgs[s.role],
                                                        placement_group_bundle_index=i)
            self.actors.append(RankWorker.options(num_cpus=plan.bundle["CPU"], num_gpus=plan.gpus,
                                              scheduling_strategy=strategy).remote(s.rank, s.role))
        self.info = self._get([a.where.remote() for a in self.actors], deadline, "start the ranks")
        port = self._get([self.actors[0].free_port.remote()], deadline, "pick a port")[0]
        self._get([a.setup.remote(env) for a, env in zip(self.actors, self.environments(port))],
                  deadline, "set up the ranks")

    def _get(self, refs: list, deadline: float, what: str) -> list:
        try:
            return ray.get(refs, timeout=max(0.1, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            raise LaunchError(f"could not {what} within launch.start_timeout_s="
                              f"{self.cfg.launch.start_timeout_s}s") from None

    def environments(self, port: int) -> list[dict[str, str]]:
        """The standard torch.distributed variables, per rank (node order: by lowest rank)."""
        plan = self.plan
        node_order: list[str] = []
        for inf in self.info:
            if inf["node_id"] not in node_order:
                node_order.append(inf["node_id"])
        local: dict[str, list[int]] = {n: [] for n in node_order}
        for r, inf in enumerate(self.info):
            local[inf["node_id"]].append(r)
        master = self.addresses.get(self.info[0]["node_id"], "127.0.0.1")
        envs = []
        for r, inf in enumerate(self.info):
            peers = local[inf["node_id"]]
            env = {"RANK": str(r), "WORLD_SIZE": str(plan.world), "LOCAL_RANK": str(peers.index(r)),
                   "LOCAL_WORLD_SIZE": str(len(peers)), "NODE_RANK": str(node_order.index(inf["node_id"])),
                   "GROUP_RANK": str(node_order.index(inf["node_id"])),
                   "MASTER_ADDR": master, "MASTER_PORT": str(port),
                   "DISTATTN_ROLE": plan.slots[r].role, "DISTATTN_THREADS": str(plan.threads),
                   "OMP_NUM_THREADS": str(plan.threads)}
            if plan.gpus == 1:
                # every rank of a node sees the node's GPUs in local-rank order, so device
                # LOCAL_RANK is its own (what DeepSpeed and torchrun-style code expect)
                ids = [self.info[p]["gpu_ids"][0] for p in peers if self.info[p]["gpu_ids"]]
                if len(ids) == len(peers):
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
            elif plan.gpus > 1:
                env["LOCAL_RANK"] = "0"  # Ray's own per-rank CUDA_VISIBLE_DEVICES; device 0 is its first
            else:
                env["DS_ACCELERATOR"] = "cpu"
                env["CUDA_VISIBLE_DEVICES"] = ""
            envs.append(env)
        return envs

    def run(self, fn: Callable, *args, grace_s: float = 5.0) -> list[Any]:
        """Call fn(*args) on every rank; raise WorkersDied or WorkerFailure on trouble.

        A rank fails by returning a RankFailure (rank_main catches its own exception, so
        Ray prints no task error) or, for functions that do not, by raising.
        """
        refs = [a.call.remote(fn, *args) for a in self.actors]
        rank_of = {ref: r for r, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        errors: dict[int, BaseException | RankFailure] = {}
        pending = list(refs)
        deadline = None
        while pending:
            timeout = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            for ref in done:
                r = rank_of[ref]
                try:
                    out = ray.get(ref)
                except Exception as e:  # its process died, or a function without its own catch raised
                    out = e
                if not isinstance(out, (BaseException, RankFailure)):
                    results[r] = out
                    continue
                errors[r] = out
                # A rank's error may be the echo of a peer's death (a broken collective):
                # give the others a moment to report, less once a death is known.
                wait = 0.5 if _is_death(out) else grace_s
                now = time.monotonic()
                deadline = now + wait if deadline is None else min(deadline, now + wait)
            if deadline is not None and time.monotonic() >= deadline:
                break
        if not errors:
            return [results[r] for r in range(len(refs))]
        dead = {r: e for r, e in errors.items() if _is_death(e)}
        if dead:
            what = "; ".join(f"rank {r} ({self.info[r]['host']} pid {self.info[r]['pid']}): {_short(e)}"
                             for r, e in sorted(dead.items()))
            raise WorkersDied(what)
        raise WorkerFailure.from_ranks([
            e if isinstance(e, RankFailure) else RankFailure(rank=r, message=_short(e))
            for r, e in sorted(errors.items())])

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        for pg in self.pgs.values():
            with contextlib.suppress(Exception):
                remove_placement_group(pg)
        self.actors, self.pgs = [], {}
