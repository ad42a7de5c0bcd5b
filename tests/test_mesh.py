"""Mesh rank arithmetic (no processes) and real process groups on gloo ranks."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distattn.config import load_config
from distattn.mesh import MeshError, MeshShape, ParallelMesh, split_cp_group

SPLITS = [  # (dp, ulysses, ring, servers)
    (1, 1, 2, 0), (2, 1, 2, 0), (1, 2, 2, 0), (2, 2, 2, 0), (1, 4, 2, 0), (2, 2, 1, 2), (3, 2, 3, 1),
]


@pytest.mark.parametrize("dp, ulysses, ring, servers", SPLITS)
def test_groups_partition_the_trainers(dp, ulysses, ring, servers):
    shape = MeshShape(dp, ulysses, ring, servers)
    assert shape.cp == ulysses * ring and shape.world_size == dp * ulysses * ring + servers
    trainers = list(range(shape.trainers))
    for kind, size, count in [("dp", dp, shape.cp), ("cp", shape.cp, dp),
                              ("ulysses", ulysses, dp * ring), ("ring", ring, dp * ulysses)]:
        groups = shape.all_groups(kind)
        assert len(groups) == count and all(len(g) == size for g in groups)
        assert sorted(r for g in groups for r in g) == trainers
        for g in groups:
            for r in g:
                assert shape.group_ranks(kind, r) == g
    # Ulysses groups are contiguous blocks; ring groups step by ulysses.
    for g in shape.all_groups("ulysses"):
        assert g == list(range(g[0], g[0] + ulysses))
    for g in shape.all_groups("ring"):
        assert g == list(range(g[0], g[0] + ulysses * ring, ulysses))
    assert shape.all_groups("trainers") == [trainers]
    assert shape.all_groups("servers") == ([list(range(shape.trainers, shape.world_size))] if servers else [])


@pytest.mark.parametrize("dp, ulysses, ring, servers", SPLITS)
def test_coords_round_trip(dp, ulysses, ring, servers):
    shape = MeshShape(dp, ulysses, ring, servers)
    for rank in range(shape.world_size):
        c = shape.coords(rank)
        if rank >= shape.trainers:
            assert c.is_server and c.dp is None and c.cp is None
            with pytest.raises(MeshError, match="attention server"):
                shape.group_ranks("cp", rank)
            continue
        assert not c.is_server
        assert rank == c.dp * shape.cp + c.cp == shape.rank_of(c.dp, c.ring, c.ulysses)
        assert c.cp == c.ring * ulysses + c.ulysses
        assert shape.group_ranks("cp", rank).index(rank) == c.cp
        assert shape.group_ranks("ulysses", rank).index(rank) == c.ulysses
        assert shape.group_ranks("ring", rank).index(rank) == c.ring
        assert shape.group_ranks("dp", rank).index(rank) == c.dp


def test_concrete_layout():
    shape = MeshShape(dp=2, ulysses=2, ring=2)
    assert shape.all_groups("cp") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert shape.all_groups("ulysses") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert shape.all_groups("ring") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert shape.all_groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert shape.coords(6) == shape.coords(6).__class__(dp=1, cp=2, ulysses=0, ring=1, is_server=False)


def test_shape_errors_show_numbers():
    with pytest.raises(MeshError, match=r"dp\*ulysses\*ring \+ attention_servers = 2\*2\*2 \+ 0 = 8 "
                                        r"but the world has 4 ranks"):
        MeshShape(2, 2, 2).check_world(4)
    with pytest.raises(MeshError, match="ulysses must be an integer >= 1, got 0"):
        MeshShape(1, 0, 2)
    with pytest.raises(MeshError, match="rank 8 is outside the world of 8 ranks"):
        MeshShape(2, 2, 2).coords(8)
    with pytest.raises(MeshError, match="cp=6 is not a multiple of ulysses=4"):
        MeshShape.from_cp(cp=6, ulysses=4)
    assert MeshShape.from_cp(dp=2, cp=4, ulysses=2) == MeshShape(2, 2, 2)


def test_single_process_without_distributed():
    assert not dist.is_initialized()
    mesh = ParallelMesh.from_config(load_config(None, ["parallel.world_size=1", "parallel.cp=1"]).parallel)
    assert mesh.rank == 0 and mesh.cp_group is None and mesh.coords.cp == 0
    assert split_cp_group(None, 1) == (None, None)
    with pytest.raises(MeshError, match="not initialised"):
        ParallelMesh.build(MeshShape(1, 1, 2))


# --- on real ranks -----------------------------------------------------------------

def _sum_in(group) -> float:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t, group=group)
    return t.item()


def _mesh_sums(dp: int, ulysses: int, ring: int, servers: int = 0):
    mesh = ParallelMesh.build(MeshShape(dp, ulysses, ring, servers))
    try:
        out = {}
        for kind in ("dp", "cp", "ulysses", "ring", "trainers", "servers"):
            group = mesh.group(kind)
            if group is None:
                out[kind] = None
            else:
                assert sorted(dist.get_process_group_ranks(group)) == mesh.group_ranks(kind)
                out[kind] = _sum_in(group)
        dist.barrier()
        return mesh.coords, out
    finally:
        mesh.destroy()


def _expected(shape: MeshShape, rank: int, kind: str):
    """Sum of the member ranks, or None where this rank is not in a group of that kind."""
    if rank >= shape.trainers and kind not in ("servers", "trainers"):
        return None
    members = shape.group_ranks(kind, rank)
    return float(sum(members)) if rank in members else None


@pytest.mark.parametrize("world, split", [
    (4, (2, 1, 2, 0)), (4, (1, 2, 2, 0)), (4, (1, 1, 2, 2)), (8, (2, 2, 2, 0)),
])
def test_mesh_groups_reduce_correctly(ranks, world, split):
    shape = MeshShape(*split)
    results = ranks(world, _mesh_sums, *split)
    for rank, (coords, sums) in enumerate(results):
        assert coords == shape.coords(rank)
        for kind, got in sums.items():
            assert got == _expected(shape, rank, kind), (rank, kind)


def _split_sums(ulysses: int, pass_groups: bool):
    cp_group = dist.group.WORLD if not pass_groups else dist.new_group([0, 1, 2, 3])
    world_groups = [[0, 1, 2, 3]] if pass_groups else None
    uly, ring = split_cp_group(cp_group, ulysses, world_cp_groups=world_groups)
    return (sorted(dist.get_process_group_ranks(uly)), _sum_in(uly),
            sorted(dist.get_process_group_ranks(ring)), _sum_in(ring))


@pytest.mark.parametrize("pass_groups", [False, True])
def test_split_cp_group(ranks, pass_groups):
    results = ranks(4, _split_sums, 2, pass_groups)
    for rank, (uly_ranks, uly_sum, ring_ranks, ring_sum) in enumerate(results):
        assert uly_ranks == [rank - rank % 2, rank - rank % 2 + 1]
        assert ring_ranks == [rank % 2, rank % 2 + 2]
        assert uly_sum == float(sum(uly_ranks)) and ring_sum == float(sum(ring_ranks))


def _split_two_cp_groups():
    # dp=2, cp=2 at world 4: cp groups [0,1], [2,3]; ulysses=2 gives ulysses = cp, ring singletons.
    mesh = ParallelMesh.build(MeshShape(dp=2, ulysses=1, ring=2))
    try:
        uly, ring = split_cp_group(mesh.cp_group, 2)
        return (sorted(dist.get_process_group_ranks(uly)), _sum_in(uly),
                sorted(dist.get_process_group_ranks(ring)))
    finally:
        mesh.destroy()


def test_split_cp_group_with_several_cp_groups(ranks):
    results = ranks(4, _split_two_cp_groups)
    for rank, (uly_ranks, uly_sum, ring_ranks) in enumerate(results):
        block = [rank - rank % 2, rank - rank % 2 + 1]
        assert uly_ranks == block and uly_sum == float(sum(block)) and ring_ranks == [rank]


def _wrong_world():
    try:
        ParallelMesh.build(MeshShape(2, 2, 2))
    except MeshError as err:
        return str(err)
    return None


def test_mesh_refuses_wrong_world(ranks):
    messages = ranks(4, _wrong_world)
    assert all("= 2*2*2 + 0 = 8 but the world has 4 ranks" in m for m in messages)


def test_attention_groups_pair_each_dp_group_with_its_servers():
    shape = MeshShape.from_cp(dp=2, cp=2, attention_servers=4)  # ranks 0-3 train, 4-7 serve
    assert shape.all_groups("attention") == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert shape.group_ranks("attention", 7) == [2, 3, 6, 7]   # a server finds its dp group
    assert shape.group_ranks("attention", 1) == [0, 1, 4, 5]
    assert MeshShape.from_cp(dp=2, cp=2).all_groups("attention") == []
    with pytest.raises(MeshError, match="attention_servers divisible by dp, got 3 servers for dp=2"):
        MeshShape.from_cp(dp=2, cp=2, attention_servers=3).group_ranks("attention", 0)
