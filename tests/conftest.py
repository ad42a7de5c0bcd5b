"""Shared fixtures: a persistent pool of gloo ranks per world size."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from distattn.multiproc import RankPool

_POOLS: dict[int, RankPool] = {}


class _Runner:
    """`ranks(W, fn, *args)` runs fn on W gloo ranks and returns per-rank results.

    Pools are reused across tests; a failing or hanging call destroys its pool
    (RankPool does that) and the next call starts a fresh one.
    """

    def pool(self, world: int) -> RankPool:
        pool = _POOLS.get(world)
        if pool is None or not pool.alive:
            pool = _POOLS[world] = RankPool(world)
        return pool

    def __call__(self, world: int, fn, *args, timeout: float = 90.0, **kwargs):
        return self.pool(world).run(fn, *args, timeout=timeout, **kwargs)


@pytest.fixture(scope="session")
def ranks():
    yield _Runner()
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
