"""Rank arithmetic and process groups: dp x cp x tp, cp = ulysses x ring, plus attention servers.

This is the one place that knows which global rank plays which role.

Layout of the world (W = dp*cp*tp + attention_servers):
- the first dp*cp*tp ranks train; the last `attention_servers` ranks serve attention (CAD);
- trainer rank = (dp_idx*cp + cp_idx)*tp + tp_idx: tensor parallelism is innermost, so a
  tp group is a contiguous block (one node: it communicates every layer); with tp=1 a
  cp group is a contiguous block of ranks;
- cp_idx = ring_idx*ulysses + ulysses_idx, so ulysses groups are contiguous within a tp
  slice (on one node, where the all-to-all is cheap) and ring groups are strided further;
- "dp_cp" groups the trainers of one tp index: the ranks that hold the same parameter
  shards, over which gradients are summed and FSDP shards.

`MeshShape` does the arithmetic without torch.distributed so it can be tested and
used by planners; `ParallelMesh` turns it into process groups. Group handles live
on the mesh object the caller holds, never in module globals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from distattn.config import ParallelConfig

GroupKind = Literal["dp", "cp", "ulysses", "ring", "servers", "trainers", "attention", "tp", "dp_cp"]
# Creation order; every rank must create every group in this same order.
GROUP_KINDS: tuple[GroupKind, ...] = ("dp", "cp", "ulysses", "ring", "trainers", "servers", "attention",
                                      "tp", "dp_cp")


class MeshError(ValueError):
    """The requested mesh does not fit the world, or a rank is asked for a role it lacks."""


@dataclass(frozen=True)
class MeshCoords:
    """Where one rank sits. Server ranks have no trainer coordinates (None)."""

    dp: int | None
    cp: int | None
    ulysses: int | None
    ring: int | None
    is_server: bool
    tp: int | None = 0


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MeshError(f"mesh: {name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the mesh; pure arithmetic, no process groups."""

    dp: int
    ulysses: int
    ring: int
    attention_servers: int = 0
    tp: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "ulysses", "ring", "tp"):
            _check_int(name, getattr(self, name), 1)
        _check_int("attention_servers", self.attention_servers, 0)

    @classmethod
    def from_cp(cls, dp: int = 1, cp: int = 1, ulysses: int = 1, attention_servers: int = 0,
                tp: int = 1) -> "MeshShape":
        """Shape from a cp size and its ulysses factor (ring = cp / ulysses)."""
        _check_int("cp", cp, 1)
        _check_int("ulysses", ulysses, 1)
        if cp % ulysses:
            raise MeshError(f"mesh: cp={cp} is not a multiple of ulysses={ulysses}")
        return cls(dp=dp, ulysses=ulysses, ring=cp // ulysses, attention_servers=attention_servers, tp=tp)

    @property
    def cp(self) -> int:
        return self.ulysses * self.ring

    @property
    def trainers(self) -> int:
        return self.dp * self.cp * self.tp

    @property
    def world_size(self) -> int:
        return self.trainers + self.attention_servers

    def describe(self) -> str:
        if self.tp > 1:
            return (f"dp*ulysses*ring*tp + attention_servers = {self.dp}*{self.ulysses}*{self.ring}*"
                    f"{self.tp} + {self.attention_servers} = {self.world_size}")
        return (f"dp*ulysses*ring + attention_servers = {self.dp}*{self.ulysses}*{self.ring} + "
                f"{self.attention_servers} = {self.world_size}")

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise MeshError(f"mesh: {self.describe()} but the world has {world_size} ranks")

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise MeshError(f"mesh: rank {rank!r} is outside the world of {self.world_size} ranks "
                            f"({self.describe()})")

    def coords(self, rank: int) -> MeshCoords:
        self._check_rank(rank)
        if rank >= self.trainers:
            return MeshCoords(dp=None, cp=None, ulysses=None, ring=None, is_server=True, tp=None)
        slot, tp_idx = divmod(rank, self.tp)
        dp_idx, cp_idx = divmod(slot, self.cp)
        ring_idx, ulysses_idx = divmod(cp_idx, self.ulysses)
        return MeshCoords(dp=dp_idx, cp=cp_idx, ulysses=ulysses_idx, ring=ring_idx, is_server=False, tp=tp_idx)

    def rank_of(self, dp: int, ring: int, ulysses: int, tp: int = 0) -> int:
        """Inverse of `coords` for trainer ranks."""
        return (dp * self.cp + ring * self.ulysses + ulysses) * self.tp + tp

    def group_ranks(self, kind: GroupKind, rank: int) -> list[int]:
        """Global ranks of the `kind` group that `rank` belongs to, in group-rank order.

        "servers" and "trainers" name the pools themselves, whichever rank asks.
        """
        if kind == "servers":
            return list(range(self.trainers, self.world_size))
        if kind == "trainers":
            return list(range(self.trainers))
        if kind == "attention":
            return self._attention_ranks(rank)
        c = self.coords(rank)
        if c.is_server:
            raise MeshError(f"mesh: rank {rank} is an attention server; it has no {kind} group")
        assert c.dp is not None and c.ring is not None and c.ulysses is not None and c.cp is not None
        t = c.tp or 0
        if kind == "dp":
            return [(d * self.cp + c.cp) * self.tp + t for d in range(self.dp)]
        if kind == "cp":
            return [(c.dp * self.cp + i) * self.tp + t for i in range(self.cp)]
        if kind == "ulysses":
            return [self.rank_of(c.dp, c.ring, u, t) for u in range(self.ulysses)]
        if kind == "ring":
            return [self.rank_of(c.dp, r, c.ulysses, t) for r in range(self.ring)]
        if kind == "tp":
            first = rank - t
            return list(range(first, first + self.tp))
        if kind == "dp_cp":
            return [s * self.tp + t for s in range(self.dp * self.cp)]
        raise MeshError(f"mesh: unknown group kind {kind!r}; choose one of {', '.join(GROUP_KINDS)}")

    def _attention_ranks(self, rank: int) -> list[int]:
        """Dedicated CAD: the cp trainers of one dp group, then that dp group's block of servers."""
        self._check_rank(rank)
        if not self.attention_servers or self.attention_servers % self.dp:
            raise MeshError(f"mesh: attention groups need attention_servers divisible by dp, got "
                            f"{self.attention_servers} servers for dp={self.dp}")
        if self.tp > 1:
            raise MeshError(f"mesh: attention servers with tp={self.tp} are not supported; set "
                            f"parallel.tp=1 or parallel.attention_servers=0")
        per = self.attention_servers // self.dp
        d = (rank - self.trainers) // per if rank >= self.trainers else rank // self.cp
        return list(range(d * self.cp, (d + 1) * self.cp)) + \
            list(range(self.trainers + d * per, self.trainers + (d + 1) * per))

    def all_groups(self, kind: GroupKind) -> list[list[int]]:
        """Every group of `kind`, in the fixed order all ranks use to create them."""
        tps = range(self.tp)
        if kind == "dp":
            return [self.group_ranks("dp", c * self.tp + t) for c in range(self.cp) for t in tps]
        if kind == "cp":
            return [self.group_ranks("cp", d * self.cp * self.tp + t) for d in range(self.dp) for t in tps]
        if kind == "ulysses":
            return [self.group_ranks("ulysses", self.rank_of(d, r, 0, t))
                    for d in range(self.dp) for r in range(self.ring) for t in tps]
        if kind == "ring":
            return [self.group_ranks("ring", self.rank_of(d, 0, u, t))
                    for d in range(self.dp) for u in range(self.ulysses) for t in tps]
        if kind == "tp":  # none at tp=1: a group of one rank is never used (tp_group stays None)
            if self.tp == 1:
                return []
            return [self.group_ranks("tp", s * self.tp) for s in range(self.dp * self.cp)]
        if kind == "dp_cp":
            return [self.group_ranks("dp_cp", t) for t in tps]
        if kind == "servers":
            return [self.group_ranks("servers", 0)] if self.attention_servers else []
        if kind == "trainers":
            return [self.group_ranks("trainers", 0)]
        if kind == "attention":
            if not self.attention_servers or self.attention_servers % self.dp:
                return []
            return [self._attention_ranks(d * self.cp) for d in range(self.dp)]
        raise MeshError(f"mesh: unknown group kind {kind!r}; choose one of {', '.join(GROUP_KINDS)}")


class _GroupMaker:
    """Creates each distinct rank list once; identical lists share one communicator.

    Every rank must drive this with the same sequence of rank lists, because
    `new_group` is collective over the whole world.
    """

    def __init__(self, rank: int, world: int, backend: str | None):
        self.rank, self.world, self.backend = rank, world, backend
        self.cache: dict[tuple[int, ...], Any] = {}
        self.owned: list[ProcessGroup] = []  # groups this rank belongs to and created

    def get(self, ranks: Sequence[int], existing: Any = None, exists: bool = False) -> "ProcessGroup | None":
        """This rank's handle for `ranks`, or None if it is not a member.

        `exists` (which must be decided the same way on every rank) says a group for
        exactly these ranks already exists, so no rank calls `new_group`; members
        then use `existing`.
        """
        key = tuple(ranks)
        if key not in self.cache:
            if len(key) == self.world:
                self.cache[key] = dist.group.WORLD
            elif exists:
                self.cache[key] = existing if self.rank in key else None
            else:
                pg = dist.new_group(list(key), backend=self.backend)
                self.cache[key] = pg
                if self.rank in key:
                    self.owned.append(pg)
        return self.cache[key] if self.rank in key else None


@dataclass(eq=False)
class ParallelMesh:
    """This rank's view of the mesh: its coordinates and its process groups.

    A group attribute is None where this rank is not a member (trainer groups on a
    server rank, `server_group` on a trainer rank or when there are no servers) and,
    for every group, when torch.distributed is not initialised and the world is a
    single process. A group spanning the whole world is `torch.distributed.group.WORLD`.
    """

    shape: MeshShape
    rank: int
    coords: MeshCoords
    dp_group: "ProcessGroup | None" = None
    cp_group: "ProcessGroup | None" = None
    ulysses_group: "ProcessGroup | None" = None
    ring_group: "ProcessGroup | None" = None
    trainer_group: "ProcessGroup | None" = None
    server_group: "ProcessGroup | None" = None
    attention_group: "ProcessGroup | None" = None  # dedicated CAD: cp trainers + their servers
    tp_group: "ProcessGroup | None" = None  # tensor parallelism: the ranks splitting every layer (tp > 1)
    dp_cp_group: "ProcessGroup | None" = None  # trainers holding the same shards (one tp index)
    _owned: list = field(default_factory=list, repr=False)

    @classmethod
    def build(cls, shape: MeshShape, rank: int | None = None, backend: str | None = None) -> "ParallelMesh":
        """Create every group of the mesh; collective over the world (all ranks call it).

        `backend` is passed to `new_group` (None: the default group's backend), so the
        same call works on gloo and NCCL.
        """
        if not dist.is_initialized():
            if shape.world_size != 1:
                raise MeshError(f"mesh: {shape.describe()} ranks but torch.distributed is not "
                                f"initialised (only a world of 1 runs without it)")
            if rank not in (None, 0):
                raise MeshError(f"mesh: rank {rank} given for a single-process world")
            return cls(shape=shape, rank=0, coords=shape.coords(0))
        world, own = dist.get_world_size(), dist.get_rank()
        shape.check_world(world)
        if rank is not None and rank != own:
            raise MeshError(f"mesh: rank={rank} was given but this process is global rank {own}")
        maker = _GroupMaker(own, world, backend)
        mine: dict[str, Any] = {}
        for kind in GROUP_KINDS:
            for ranks in shape.all_groups(kind):
                handle = maker.get(ranks)
                if handle is not None:
                    mine[kind] = handle
        return cls(shape=shape, rank=own, coords=shape.coords(own),
                   dp_group=mine.get("dp"), cp_group=mine.get("cp"),
                   ulysses_group=mine.get("ulysses"), ring_group=mine.get("ring"),
                   trainer_group=mine.get("trainers"), server_group=mine.get("servers"),
                   attention_group=mine.get("attention"), tp_group=mine.get("tp"),
                   dp_cp_group=mine.get("dp_cp"), _owned=maker.owned)

    @classmethod
    def from_config(cls, parallel_cfg: "ParallelConfig", rank: int | None = None) -> "ParallelMesh":
        """Build from the `parallel` config section (backend "auto": the default group's)."""
        cfg = parallel_cfg
        ring = cfg.ring if cfg.ring is not None else cfg.cp // cfg.ulysses
        shape = MeshShape(dp=cfg.dp, ulysses=cfg.ulysses, ring=ring,
                          attention_servers=cfg.attention_servers, tp=getattr(cfg, "tp", 1))
        if shape.world_size != cfg.world_size:
            raise MeshError(f"mesh: {shape.describe()} but parallel.world_size={cfg.world_size}")
        backend = None if cfg.backend == "auto" else cfg.backend
        return cls.build(shape, rank=rank, backend=backend)

    @property
    def is_server(self) -> bool:
        return self.coords.is_server

    @property
    def world_size(self) -> int:
        return self.shape.world_size

    def group(self, kind: GroupKind) -> "ProcessGroup | None":
        attr = {"dp": "dp_group", "cp": "cp_group", "ulysses": "ulysses_group", "ring": "ring_group",
                "trainers": "trainer_group", "servers": "server_group",
                "attention": "attention_group", "tp": "tp_group", "dp_cp": "dp_cp_group"}.get(kind)
        if attr is None:
            raise MeshError(f"mesh: unknown group kind {kind!r}; choose one of {', '.join(GROUP_KINDS)}")
        return getattr(self, attr)

    def group_ranks(self, kind: GroupKind) -> list[int]:
        return self.shape.group_ranks(kind, self.rank)

    def destroy(self) -> None:
        """Free the communicators this mesh created (WORLD is left alone)."""
        for pg in self._owned:
            dist.destroy_process_group(pg)
        self._owned = []


def _split(ranks: Sequence[int], ulysses: int) -> tuple[list[list[int]], list[list[int]]]:
    """Ulysses (contiguous) and ring (strided) sub-lists of one cp group's ranks."""
    ring = len(ranks) // ulysses
    uly = [list(ranks[r * ulysses:(r + 1) * ulysses]) for r in range(ring)]
    rng = [list(ranks[u::ulysses]) for u in range(ulysses)]
    return uly, rng


def split_cp_group(cp_group: "ProcessGroup | None", ulysses: int,
                   world_cp_groups: Sequence[Sequence[int]] | None = None,
                   backend: str | None = None) -> tuple["ProcessGroup | None", "ProcessGroup | None"]:
    """Split a cp group into (ulysses_group, ring_group) for a scheme given only cp.

    `new_group` is collective over the whole world, so every rank of the world must
    call this, with the same `ulysses`, and it creates the sub-groups of *every*
    cp group in one sorted order. `world_cp_groups` lists all cp groups' global
    ranks (the same list on every rank); if omitted it is learned with an
    all_gather_object over the world. `cp_group=None` means WORLD, as in torch
    collectives; a rank in no cp group (an attention server) passes
    `torch.distributed.GroupMember.NON_GROUP_MEMBER` and gets (None, None).
    Nothing is cached here: call once and keep the result.
    """
    _check_int("ulysses", ulysses, 1)
    if not dist.is_initialized():
        if ulysses != 1:
            raise MeshError(f"mesh: ulysses={ulysses} needs torch.distributed; a single process has cp=1")
        return None, None
    world, rank = dist.get_world_size(), dist.get_rank()
    if cp_group is dist.GroupMember.NON_GROUP_MEMBER:
        mine: list[int] | None = None
    else:
        group = dist.group.WORLD if cp_group is None else cp_group
        mine = sorted(dist.get_process_group_ranks(group))
    if world_cp_groups is None:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        world_cp_groups = [g for g in gathered if g is not None]
    groups = sorted({tuple(sorted(g)) for g in world_cp_groups})
    seen: set[int] = set()
    for g in groups:
        if seen & set(g):
            raise MeshError(f"mesh: cp groups overlap: {[list(x) for x in groups]}")
        seen |= set(g)
        if len(g) % ulysses:
            raise MeshError(f"mesh: cp group {list(g)} has {len(g)} ranks, not a multiple of "
                            f"ulysses={ulysses}; choose ulysses from "
                            f"{', '.join(str(d) for d in range(1, len(g) + 1) if len(g) % d == 0)}")
    if mine is not None and tuple(mine) not in groups:
        raise MeshError(f"mesh: this rank's cp group {mine} is not in world_cp_groups {list(groups)}")
    maker = _GroupMaker(rank, world, backend)
    result: tuple[Any, Any] = (None, None)
    for g in groups:
        # A sub-group equal to its whole cp group already exists: reuse the cp group.
        existing = cp_group if mine is not None and tuple(mine) == g else None
        uly, rng = _split(g, ulysses)
        uly_h = [maker.get(s, existing, exists=len(s) == len(g)) for s in uly]
        rng_h = [maker.get(s, existing, exists=len(s) == len(g)) for s in rng]
        if rank in g:
            result = (next(h for h in uly_h if h is not None), next(h for h in rng_h if h is not None))
    return result


__all__ = ["GROUP_KINDS", "GroupKind", "MeshCoords", "MeshError", "MeshShape", "ParallelMesh",
           "split_cp_group"]
