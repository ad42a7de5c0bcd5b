"""Run `distattn train` on a Ray cluster: placement, roles, streamed logs, restarts.

Where the cluster comes from:
- an address (`--address auto|HOST:PORT|ray://...`, or `RAY_ADDRESS`, which `ray job
  submit` sets): an existing cluster, possibly many nodes;
- otherwise a local cluster started for this job and sized from the config
  (`parallel.world_size * launch.cpus_per_worker` CPUs), stopped when it ends;
- a Ray already initialised in this process (tests, notebooks) is used as is.

Two engines run the ranks (`launch.engine`):
- `actors` (default): one Ray actor per rank, in one placement group per role
  (trainer ranks, and the dedicated CAD attention servers when
  `parallel.attention_servers > 0`). The driver hands rank 0's node address and a
  free port to every rank, sets the standard torch.distributed environment (RANK,
  WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR, MASTER_PORT)
  and each rank joins the default process group (gloo on CPU, nccl on GPU).
  Output is streamed with the rank as prefix: `(rank1 pid=...)`.
- `ray_train`: Ray Train's `TorchTrainer` for a uniform group of trainer ranks; Ray
  Train sets the same environment and the process group up itself.

Resources are checked against the cluster before anything is placed, so a job
that asks for more than the cluster has fails in seconds with the numbers. When
a worker process dies, the whole worker group is replaced and resumes from the
latest checkpoint written by this job (model, optimizer, scheduler, RNG and data
position), at most `launch.max_failures` times. Ctrl-C stops every rank.
"""
from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

# before `import ray`: no usage reporting, and keep every rank's lines (no dedup)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import ray  # noqa: E402

TRAINER, SERVER = "trainer", "server"
FAULT_ENV = "DISTATTN_FAULT_INJECT"  # testing hook: "rank=R,step=S,marker=PATH"


class LaunchError(RuntimeError):
    """The cluster cannot run this job as configured (found before training starts)."""


class WorkerFailure(RuntimeError):
    """A rank raised, or workers kept dying after the allowed restarts."""


class _WorkersDied(RuntimeError):
    """Internal: one or more worker processes died (restartable)."""


# --- fault injection (tests) -----------------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    """Make `rank` exit hard (os._exit(1)) right before training step `step`, once.

    The marker file is created before exiting, so the restarted group passes by.
    """

    rank: int
    step: int
    marker: str

    @classmethod
    def from_env(cls) -> "Fault | None":
        spec = os.environ.get(FAULT_ENV)
        if not spec:
            return None
        try:
            kv = dict(item.split("=", 1) for item in spec.split(","))
            return cls(rank=int(kv["rank"]), step=int(kv["step"]), marker=kv["marker"])
        except (KeyError, ValueError):
            raise LaunchError(f"{FAULT_ENV}={spec!r}: expected rank=R,step=S,marker=PATH") from None

    def maybe_fire(self, rank: int, next_step: int) -> None:
        if rank == self.rank and next_step == self.step and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(f"rank {rank} exited before step {next_step}\n")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)


# --- cluster description and placement plan -------------------------------------------------

@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    address: str
    resources: dict[str, float]  # totals
    is_driver: bool = False

    def capacity(self, bundle: dict[str, float]) -> int:
        """How many bundles of this shape fit on the node (by totals)."""
        fits = [math.floor(self.resources.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
        return min(fits) if fits else 10**9


@dataclass(frozen=True)
class RankSlot:
    rank: int
    role: str  # TRAINER | SERVER
    node_id: str | None  # pinned node (launch.nodes > 0), else wherever placement puts it


@dataclass(frozen=True)
class Plan:
    world: int
    trainers: int
    servers: int
    bundle: dict[str, float]
    gpus: int
    threads: int
    strategy: str
    slots: tuple[RankSlot, ...]

    @property
    def pinned(self) -> bool:
        return any(s.node_id for s in self.slots)

    def role_slots(self, role: str) -> list[RankSlot]:
        return [s for s in self.slots if s.role == role]


def _fmt(x: float) -> str:
    return f"{x:g}"


def _node_listing(nodes: list[NodeInfo], key: str) -> str:
    parts = [f"{n.address}: {_fmt(n.resources.get(key, 0.0))}" for n in nodes]
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''} ({', '.join(parts)})"


def plan_placement(cfg, nodes: list[NodeInfo]) -> Plan:
    """Check the job fits the cluster and decide where each rank goes.

    Raises LaunchError naming what was asked, what the cluster has, and what to change.
    """
    par, la = cfg.parallel, cfg.launch
    world, servers = par.world_size, par.attention_servers
    if not nodes:
        raise LaunchError("the Ray cluster has no alive nodes")
    has_gpus = sum(n.resources.get("GPU", 0.0) for n in nodes)
    gpus = la.gpus_per_worker
    if gpus is None:
        gpus = 1 if has_gpus >= 1 and par.backend != "gloo" else 0
    if par.backend == "nccl" and gpus == 0:
        raise LaunchError(f"parallel.backend=nccl needs a GPU per rank, but launch.gpus_per_worker=0 "
                          f"(the cluster has {_fmt(has_gpus)} GPUs); set launch.gpus_per_worker=1 "
                          f"or parallel.backend=auto")
    bundle = {"CPU": float(la.cpus_per_worker)}
    if gpus:
        bundle["GPU"] = float(gpus)
    keys = {"CPU": "launch.cpus_per_worker", "GPU": "launch.gpus_per_worker"}
    for res, amount in bundle.items():
        need, have = world * amount, sum(n.resources.get(res, 0.0) for n in nodes)
        if need > have + 1e-9:
            raise LaunchError(
                f"the job needs {world} workers x {_fmt(amount)} {res} = {_fmt(need)} {res}, but the "
                f"Ray cluster has {_fmt(have)} {res} in all, on {_node_listing(nodes, res)}; lower "
                f"{keys[res]} or parallel.world_size, or add nodes")
        biggest = max(n.resources.get(res, 0.0) for n in nodes)
        if amount > biggest + 1e-9:
            raise LaunchError(f"one worker needs {_fmt(amount)} {res} ({keys[res]}), but the largest node "
                              f"has {_fmt(biggest)} {res}; lower {keys[res]} to at most {_fmt(biggest)}")
    caps = [n.capacity(bundle) for n in nodes]
    shape = ", ".join(f"{_fmt(v)} {k}" for k, v in bundle.items())
    if sum(caps) < world:
        raise LaunchError(f"the job needs {world} workers of {{{shape}}}, but the cluster's nodes hold "
                          f"{sum(caps)} such workers in all ({', '.join(f'{n.address}: {c}' for n, c in zip(nodes, caps))}); "
                          f"lower launch.cpus_per_worker / launch.gpus_per_worker, or add nodes")
    strategy = la.placement
    if strategy == "STRICT_PACK" and max(caps) < world:
        raise LaunchError(f"launch.placement=STRICT_PACK needs all {world} workers on one node, but the "
                          f"largest node holds {max(caps)} workers of {{{shape}}}; use launch.placement=PACK")
    if strategy == "STRICT_SPREAD" and sum(1 for c in caps if c > 0) < world:
        raise LaunchError(f"launch.placement=STRICT_SPREAD needs {world} distinct nodes, but only "
                          f"{sum(1 for c in caps if c > 0)} can hold a worker of {{{shape}}}; "
                          f"use launch.placement=SPREAD")
    roles = [TRAINER] * (world - servers) + [SERVER] * servers
    pinned: list[str | None] = [None] * world
    if la.nodes:
        per = world // la.nodes
        fit = [n for n, c in zip(nodes, caps) if c >= per]
        if len(fit) < la.nodes:
            raise LaunchError(
                f"launch.nodes={la.nodes} puts {per} workers of {{{shape}}} on each of {la.nodes} nodes, but "
                f"the cluster has {len(nodes)} alive node(s) and {len(fit)} can hold {per} "
                f"({', '.join(f'{n.address}: {c}' for n, c in zip(nodes, caps))}); lower launch.nodes, "
                f"or add nodes")
        fit.sort(key=lambda n: (not n.is_driver, n.address, n.node_id))
        pinned = [fit[r // per].node_id for r in range(world)]
        strategy = "PACK"
    slots = tuple(RankSlot(r, roles[r], pinned[r]) for r in range(world))
    return Plan(world=world, trainers=world - servers, servers=servers, bundle=bundle, gpus=int(gpus),
                threads=max(1, int(la.cpus_per_worker)), strategy=strategy, slots=slots)


def cluster_nodes() -> list[NodeInfo]:
    here = ray.get_runtime_context().get_node_id()
    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = {k: float(v) for k, v in n.get("Resources", {}).items()}
        out.append(NodeInfo(node_id=n["NodeID"], address=n["NodeManagerAddress"], resources=res,
                            is_driver=n["NodeID"] == here))
    out.sort(key=lambda n: (not n.is_driver, n.address, n.node_id))
    return out


# --- connecting to (or starting) a cluster ---------------------------------------------------

@contextlib.contextmanager
def ray_session(cfg, address: str | None = None) -> Iterator[str]:
    """Connect to the cluster for this job; yields a description of it."""
    if ray.is_initialized():
        yield "the Ray cluster this process is connected to"
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        try:
            ray.init(address=address, log_to_driver=True, logging_level="WARNING")
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise LaunchError(f"cannot connect to the Ray cluster at {address!r}: {e}; start one with "
                              f"`ray start --head` (see launch/README.md) or drop --address/RAY_ADDRESS "
                              f"to run on a local cluster") from None
        where = f"Ray cluster at {address}"
    else:
        cpus = max(1, math.ceil(cfg.parallel.world_size * cfg.launch.cpus_per_worker))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True, logging_level="WARNING",
                 object_store_memory=256 * 2**20)
        where = f"local Ray cluster ({cpus} CPUs)"
    try:
        yield where
    finally:
        time.sleep(0.5)  # let the last streamed lines of the ranks reach the terminal
        ray.shutdown()


# --- what runs on every rank -----------------------------------------------------------------

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


def _serve(cfg, resume: bool, quiet: bool) -> None:
    """Server-role ranks (the last parallel.attention_servers): answer the trainers' attention
    passes until they finish (`distattn.train.serve`); servers hold no state to resume."""
    from distattn.train.serve import serve_attention
    serve_attention(cfg)


def _hooked_trainer(cfg, resume: bool, quiet: bool, state, fault: Fault | None):
    """The Trainer, reporting step logs and checkpoints to the job state (rank 0)."""
    from distattn.train.trainer import Trainer

    class RayTrainer(Trainer):
        def train_step(self):
            if fault is not None:
                fault.maybe_fire(self.rank, self.step + 1)
            log = super().train_step()
            if self.rank == 0 and state is not None:
                state.add_step.remote(asdict(log))
            return log

        def save_checkpoint(self):
            path = super().save_checkpoint()
            if self.rank == 0 and state is not None:
                # ordered after the step logs above: once this returns they are all recorded
                ray.get(state.add_checkpoint.remote(self.step, str(path)))
            return path

    return RayTrainer(cfg, resume=resume, quiet=quiet)


def rank_main(cfg_dict: dict, resume: bool, quiet: bool, state=None, fault: Fault | None = None) -> int:
    """One rank of the job, after its environment is set: join the group, train or serve."""
    import torch.distributed as dist

    from distattn.config import Config
    cfg = Config.model_validate(cfg_dict)
    _init_process_group(cfg)
    try:
        if os.environ.get("DISTATTN_ROLE", TRAINER) == SERVER:
            _serve(cfg, resume, quiet)
        else:
            tr = _hooked_trainer(cfg, resume, quiet, state, fault)
            tr.fit()
            tr.mesh.destroy()
            if dist.get_rank() == 0 and state is not None:
                ray.get(state.ping.remote())
        return dist.get_rank()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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


# --- job state (one small actor shared by every attempt) -------------------------------------

@ray.remote(num_cpus=0, max_restarts=0)
class JobState:
    """Step logs of rank 0 and the checkpoints this job wrote, across restarts."""

    def __init__(self):
        self.steps: dict[int, dict] = {}
        self.ckpt: tuple[int, str] | None = None
        self.attempts = 0

    def add_step(self, log: dict) -> None:
        self.steps[log["step"]] = log  # a replayed step (after a restart) overwrites

    def add_checkpoint(self, step: int, path: str) -> None:
        self.ckpt = (step, path)

    def checkpoint(self):
        return self.ckpt

    def start_attempt(self) -> int:
        self.attempts += 1
        return self.attempts

    def history(self) -> list[dict]:
        return [self.steps[s] for s in sorted(self.steps)]

    def ping(self) -> bool:
        return True


# --- the actor group --------------------------------------------------------------------------

class Rank:
    """One rank's process (as the Ray actor RankWorker).

    Its repr is the prefix of its streamed output: `(rank0 pid=...)`, `(rank3:server pid=...)`.
    """

    def __init__(self, rank: int, role: str):
        self.rank, self.role = rank, role

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


def _is_death(err: BaseException) -> bool:
    rx = ray.exceptions
    return isinstance(err, (rx.RayActorError, rx.WorkerCrashedError, rx.NodeDiedError))


def _short(err: BaseException) -> str:
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
                    f"the cluster did not grant {len(plan.role_slots(role))} {role} workers of "
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
        """Call fn(*args) on every rank; raise _WorkersDied or WorkerFailure on trouble."""
        refs = [a.call.remote(fn, *args) for a in self.actors]
        rank_of = {ref: r for r, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        pending = list(refs)
        deadline = None
        while pending:
            timeout = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            for ref in done:
                r = rank_of[ref]
                try:
                    results[r] = ray.get(ref)
                except Exception as e:  # a rank raised or its process died
                    errors[r] = e
                    # A rank's error may be the echo of a peer's death (a broken collective):
                    # give the others a moment to report, less once a death is known.
                    wait = 0.5 if _is_death(e) else grace_s
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
            raise _WorkersDied(what)
        detail = "\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items()))
        raise WorkerFailure(f"rank(s) {sorted(errors)} failed:\n{detail}")

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        for pg in self.pgs.values():
            with contextlib.suppress(Exception):
                remove_placement_group(pg)
        self.actors, self.pgs = [], {}


# --- the job ---------------------------------------------------------------------------------

def _say(msg: str) -> None:
    print(f"distattn: {msg}", flush=True)


def _max_str(m: int) -> str:
    return "unlimited" if m < 0 else str(m)


def train_ray(cfg, resume: bool = False, address: str | None = None, quiet: bool = False) -> list[dict]:
    """Train on a Ray cluster; returns rank 0's step logs (every step once, across restarts)."""
    with ray_session(cfg, address) as where:
        nodes = cluster_nodes()
        plan = plan_placement(cfg, nodes)
        fault = Fault.from_env()
        state = JobState.remote()
        if not quiet:
            shape = ", ".join(f"{_fmt(v)} {k}" for k, v in plan.bundle.items())
            _say(f"{plan.world} ranks ({plan.trainers} trainers"
                 + (f", {plan.servers} attention servers" if plan.servers else "")
                 + f"), {shape} each, on the {where}; engine {cfg.launch.engine}")
        try:
            if cfg.launch.engine == "ray_train":
                _run_ray_train(cfg, plan, resume, quiet, state, fault)
            else:
                _run_actors(cfg, plan, nodes, resume, quiet, state, fault)
            return ray.get(state.history.remote())
        finally:
            with contextlib.suppress(Exception):
                ray.kill(state)


def _run_actors(cfg, plan: Plan, nodes: list[NodeInfo], resume: bool, quiet: bool, state, fault) -> None:
    max_failures = cfg.launch.max_failures
    failures = 0
    cur_resume = resume
    while True:
        group = WorkerGroup(plan, cfg, nodes)
        try:
            group.start(cfg.launch.start_timeout_s)
            group.run(rank_main, cfg.model_dump(), cur_resume, quiet, state, fault)
            return
        except _WorkersDied as died:
            failures += 1
            ckpt = ray.get(state.checkpoint.remote())
            if 0 <= max_failures < failures:
                raise WorkerFailure(f"worker died: {died}; no restarts left (launch.max_failures="
                                    f"{max_failures}); the latest checkpoint is "
                                    f"{ckpt[1] if ckpt else 'none'}, continue with --resume") from None
            step = ckpt[0] if ckpt else (_start_step(cfg) if resume else 0)
            cur_resume = resume or ckpt is not None
            _say(f"worker died: {died}; restarting from step {step} "
                 f"(attempt {failures}/{_max_str(max_failures)})")
        finally:
            group.shutdown()


def _start_step(cfg) -> int:
    import json
    from pathlib import Path

    from distattn.train.checkpoint import latest
    path = latest(Path(cfg.run.output_dir) / "checkpoints")
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


def _ray_train_loop(config: dict) -> None:
    """The TorchTrainer train function: Ray Train already set the env and process group."""
    import torch
    import torch.distributed as dist

    from distattn.config import Config
    cfg = Config.model_validate(config["cfg"])
    state, resume, quiet = config["state"], config["resume"], config["quiet"]
    torch.set_num_threads(config["threads"])
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rank = dist.get_rank()
    if not isinstance(sys.stdout, _LinePrefix):
        sys.stdout, sys.stderr = _LinePrefix(sys.stdout, f"[rank{rank}] "), _LinePrefix(sys.stderr, f"[rank{rank}] ")
    ckpt = ray.get(state.checkpoint.remote())
    if rank == 0:
        attempt = ray.get(state.start_attempt.remote())
        if attempt > 1:
            step = ckpt[0] if ckpt else 0
            print(f"distattn: worker died in attempt {attempt - 1}; restarting from step {step} "
                  f"(attempt {attempt - 1}/{_max_str(config['max_failures'])})", flush=True)
    tr = _hooked_trainer(cfg, resume or ckpt is not None, quiet, state, config["fault"])
    tr.fit()
    tr.mesh.destroy()
    if rank == 0:
        ray.get(state.ping.remote())


def _run_ray_train(cfg, plan: Plan, resume: bool, quiet: bool, state, fault) -> None:
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
        raise WorkerFailure(f"Ray Train run failed: {e}") from e


__all__ = ["Fault", "LaunchError", "NodeInfo", "Plan", "WorkerFailure", "WorkerGroup", "cluster_nodes",
           "plan_placement", "probe_rank", "rank_main", "ray_session", "train_ray"]
