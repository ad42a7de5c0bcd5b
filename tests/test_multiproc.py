import pytest
import torch
import torch.distributed as dist

from distattn.multiproc import RankError, RankTimeout, RankPool


def _rank_and_world():
    return dist.get_rank(), dist.get_world_size()


def _sum_ranks():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t.item()


def _fail_on_one():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    dist.barrier()


def _hang_on_one():
    if dist.get_rank() == 1:
        import time
        time.sleep(60)
    return 0


@pytest.mark.parametrize("world", [1, 2, 4])
def test_runs_on_every_rank(ranks, world):
    out = ranks(world, _rank_and_world)
    assert out == [(r, world) for r in range(world)]
    assert ranks(world, _sum_ranks) == [float(sum(range(world)))] * world


def test_failing_rank_traceback_is_shown():
    pool = RankPool(2)
    try:
        with pytest.raises(RankError, match="boom on rank one") as exc:
            pool.run(_fail_on_one, timeout=30)
        assert "rank 1" in str(exc.value)
        assert not pool.alive
    finally:
        pool.close(force=True)


def test_hang_fails_in_seconds():
    pool = RankPool(2)
    try:
        with pytest.raises(RankTimeout, match=r"ranks \[1\] did not finish"):
            pool.run(_hang_on_one, timeout=3)
    finally:
        pool.close(force=True)
