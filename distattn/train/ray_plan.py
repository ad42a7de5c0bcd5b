"""Where a job's ranks go: check the job against the cluster's nodes, then plan placement.

Pure (no Ray calls), so every resource error is found in seconds, with the
numbers, before anything is placed, and the rules are testable without a cluster.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from distattn.train.launch_errors import LaunchError

TRAINER, SERVER = "trainer", "server"


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


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 node`, `2 nodes`, `1 attention server`, `3 attention servers`."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def _node_listing(nodes: list[NodeInfo], key: str) -> str:
    parts = [f"{n.address}: {_fmt(n.resources.get(key, 0.0))}" for n in nodes]
    return f"{plural(len(nodes), 'node')} ({', '.join(parts)})"


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
                f"the job needs {plural(world, 'worker')} x {_fmt(amount)} {res} = {_fmt(need)} {res}, but the "
                f"Ray cluster has {_fmt(have)} {res} in all, on {_node_listing(nodes, res)}; lower "
                f"{keys[res]} or parallel.world_size, or add nodes")
        biggest = max(n.resources.get(res, 0.0) for n in nodes)
        if amount > biggest + 1e-9:
            raise LaunchError(f"one worker needs {_fmt(amount)} {res} ({keys[res]}), but the largest node "
                              f"has {_fmt(biggest)} {res}; lower {keys[res]} to at most {_fmt(biggest)}")
    caps = [n.capacity(bundle) for n in nodes]
    shape = ", ".join(f"{_fmt(v)} {k}" for k, v in bundle.items())
    if sum(caps) < world:
        raise LaunchError(f"the job needs {plural(world, 'worker')} of {{{shape}}}, but the cluster's "
                          f"nodes hold {plural(sum(caps), 'such worker')} in all ({', '.join(f'{n.address}: {c}' for n, c in zip(nodes, caps))}); "
                          f"lower launch.cpus_per_worker / launch.gpus_per_worker, or add nodes")
    strategy = la.placement
    if strategy == "STRICT_PACK" and max(caps) < world:
        raise LaunchError(f"launch.placement=STRICT_PACK needs all {world} workers on one node, but the "
                          f"largest node holds {plural(max(caps), 'worker')} of {{{shape}}}; use launch.placement=PACK")
    if strategy == "STRICT_SPREAD" and sum(1 for c in caps if c > 0) < world:
        raise LaunchError(f"launch.placement=STRICT_SPREAD needs {plural(world, 'distinct node')}, but only "
                          f"{sum(1 for c in caps if c > 0)} can hold a worker of {{{shape}}}; "
                          f"use launch.placement=SPREAD")
    roles = [TRAINER] * (world - servers) + [SERVER] * servers
    pinned: list[str | None] = [None] * world
    if la.nodes:
        per = world // la.nodes
        fit = [n for n, c in zip(nodes, caps) if c >= per]
        if len(fit) < la.nodes:
            raise LaunchError(
                f"launch.nodes={la.nodes} puts {plural(per, 'worker')} of {{{shape}}} on each of "
                f"{plural(la.nodes, 'node')}, but the cluster has {plural(len(nodes), 'alive node')} and "
                f"{len(fit)} can hold {per} "
                f"({', '.join(f'{n.address}: {c}' for n, c in zip(nodes, caps))}); lower launch.nodes, "
                f"or add nodes")
        fit.sort(key=lambda n: (not n.is_driver, n.address, n.node_id))
        pinned = [fit[r // per].node_id for r in range(world)]
        strategy = "PACK"
    slots = tuple(RankSlot(r, roles[r], pinned[r]) for r in range(world))
    return Plan(world=world, trainers=world - servers, servers=servers, bundle=bundle, gpus=int(gpus),
                threads=max(1, int(la.cpus_per_worker)), strategy=strategy, slots=slots)
