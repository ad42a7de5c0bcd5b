"""Partitioners: coverage, round trips, runs, positions, balance and error messages."""
from __future__ import annotations

import pytest
import torch

from distattn.layout import (
    LAYOUTS,
    Contiguous,
    DocZigzag,
    Run,
    Weighted,
    Zigzag,
    as_cu_seqlens,
    causal_cost,
    doc_of,
    get_layout,
    split_sizes,
)

WORLDS = [1, 2, 3, 4]

# (n_tokens, cu_seqlens) — odd documents, a document shorter than 2W, one that
# spans all ranks, and N not divisible by 2W.
CASES = [
    (37, None),
    (64, None),
    (37, [0, 3, 20, 21, 37]),
    (50, [0, 1, 2, 9, 49, 50]),
    (101, [0, 5, 96, 101]),
    (8, [0, 1, 2, 3, 4, 5, 6, 7, 8]),
]


def _ids(case):
    n, cu = case
    return f"n{n}-{'one' if cu is None else len(cu) - 1}docs"


def _layouts():
    for name in LAYOUTS:
        for world in WORLDS:
            for n, cu in CASES:
                if n < world:
                    continue
                weights = [1.0 + r for r in range(world)] if name == "weighted" else None
                yield pytest.param(name, n, world, cu, weights, id=f"{name}-W{world}-{_ids((n, cu))}")


LAYOUT_PARAMS = list(_layouts())


def _build(name, n, world, cu, weights):
    return get_layout(name, n, world, cu_seqlens=cu, weights=weights)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def test_split_sizes_matches_tensor_split():
    for n in range(0, 23):
        for parts in range(1, 9):
            want = [len(p) for p in torch.tensor_split(torch.arange(n), parts)]
            assert split_sizes(n, parts) == want


def test_as_cu_seqlens_accepts_common_forms():
    assert as_cu_seqlens(None, 10) == [0, 10]
    assert as_cu_seqlens([0, 4, 10], 10) == [0, 4, 10]
    assert as_cu_seqlens((0, 4, 10), 10) == [0, 4, 10]
    assert as_cu_seqlens(torch.tensor([0, 4, 10], dtype=torch.int32), 10) == [0, 4, 10]


@pytest.mark.parametrize("cu, n, match", [
    ([1, 4, 10], 10, r"must start at 0, got 1"),
    ([0, 4, 98], 100, r"must end at the sequence length 100, got 98"),
    ([0, 6, 4, 10], 10, r"strictly increasing.*cu_seqlens\[1\]=6 and cu_seqlens\[2\]=4"),
    ([0, 4, 4, 10], 10, r"strictly increasing.*cu_seqlens\[1\]=4 and cu_seqlens\[2\]=4"),
    ([0], 10, r"at least two boundaries"),
    (torch.tensor([0.0, 10.0]), 10, r"integers.*float"),
    (torch.tensor([[0, 10]]), 10, r"1-D"),
    ([0, 4.5, 10], 10, r"cu_seqlens\[1\] must be an integer"),
    ("0,10", 10, r"sequence of integers"),
])
def test_bad_cu_seqlens(cu, n, match):
    with pytest.raises(ValueError, match=match):
        as_cu_seqlens(cu, n)


def test_doc_of():
    cu = [0, 3, 5, 9]
    idx = torch.arange(9)
    assert doc_of(idx, cu).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert doc_of(idx, torch.tensor(cu)).tolist() == doc_of(idx, cu).tolist()
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        doc_of(torch.tensor([9]), cu)


# ---------------------------------------------------------------------------
# invariants of every layout
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, n, world, cu, weights", LAYOUT_PARAMS)
def test_every_index_exactly_once(name, n, world, cu, weights):
    lay = _build(name, n, world, cu, weights)
    allidx = torch.cat([lay.indices(r) for r in range(world)])
    assert sorted(allidx.tolist()) == list(range(n))
    assert sum(lay.sizes()) == n
    for r in range(world):
        idx = lay.indices(r)
        assert lay.size(r) == idx.numel()
        # local order is increasing, and ranges agree with indices
        assert torch.all(idx[1:] > idx[:-1])
        from_ranges = [i for a, b in lay.ranges(r) for i in range(a, b)]
        assert from_ranges == idx.tolist()
        assert all(b > a for a, b in lay.ranges(r))


@pytest.mark.parametrize("name, n, world, cu, weights", LAYOUT_PARAMS)
def test_shard_unshard_round_trip(name, n, world, cu, weights):
    lay = _build(name, n, world, cu, weights)
    x = torch.randn(n, 3, 2)
    shards = [lay.shard(x, r) for r in range(world)]
    for r, s in enumerate(shards):
        assert s.is_contiguous()
        assert torch.equal(s, x[lay.indices(r)])
    assert torch.equal(lay.unshard(shards), x)

    y = torch.randn(2, n, 5)
    shards1 = [lay.shard(y, r, dim=1) for r in range(world)]
    assert all(s.shape == (2, lay.size(r), 5) for r, s in enumerate(shards1))
    assert torch.equal(lay.unshard(shards1, dim=1), y)


@pytest.mark.parametrize("name, n, world, cu, weights", LAYOUT_PARAMS)
def test_runs_positions_doc_ids(name, n, world, cu, weights):
    lay = _build(name, n, world, cu, weights)
    bounds = lay.cu_seqlens
    for r in range(world):
        runs = lay.runs(r)
        local = 0
        for run in runs:
            assert isinstance(run, Run)
            assert run.length > 0
            assert run.local_start == local  # runs tile the local buffer in order
            local += run.length
            assert bounds[run.doc] == run.doc_start
            assert bounds[run.doc] <= run.start and run.start + run.length <= bounds[run.doc + 1]
        assert local == lay.size(r)

        idx = lay.indices(r)
        docs = doc_of(idx, bounds)
        starts = torch.tensor(bounds)[docs]
        assert torch.equal(lay.doc_ids(r), docs)
        assert torch.equal(lay.positions(r), idx - starts)
        assert causal_cost(lay, r) == int((lay.positions(r) + 1).sum())


def test_total_cost_is_layout_independent():
    cu = [0, 5000, 8000, 12000, 14000, 16384]
    want = sum((b - a) * (b - a + 1) // 2 for a, b in zip(cu, cu[1:]))
    for name in LAYOUTS:
        lay = get_layout(name, 16384, 4, cu_seqlens=cu)
        assert sum(lay.costs()) == want


# ---------------------------------------------------------------------------
# layout-specific shape
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [8, 37, 64, 101])
@pytest.mark.parametrize("world", WORLDS)
def test_contiguous_pieces(n, world):
    lay = Contiguous(n, world)
    pieces = torch.tensor_split(torch.arange(n), world)
    for r in range(world):
        assert torch.equal(lay.indices(r), pieces[r])


@pytest.mark.parametrize("n", [8, 37, 64, 101])
@pytest.mark.parametrize("world", WORLDS)
def test_zigzag_piece_membership(n, world):
    lay = Zigzag(n, world)
    pieces = torch.tensor_split(torch.arange(n), 2 * world)
    assert [b - a for a, b in lay.pieces()] == [len(p) for p in pieces]
    for r in range(world):
        want = torch.cat([pieces[r], pieces[2 * world - 1 - r]])
        assert torch.equal(lay.indices(r), want)


@pytest.mark.parametrize("world", WORLDS)
def test_doc_zigzag_piece_membership(world):
    cu = [0, 3, 20, 21, 37]
    lay = DocZigzag(37, world, cu)
    for r in range(world):
        want = []
        for a, b in zip(cu, cu[1:]):
            pieces = torch.tensor_split(torch.arange(a, b), 2 * world)
            want += pieces[r].tolist() + pieces[2 * world - 1 - r].tolist()
        assert lay.indices(r).tolist() == want


def test_doc_zigzag_tiny_documents_may_leave_a_rank_empty():
    lay = DocZigzag(4, 4, [0, 1, 2, 3, 4])
    assert lay.sizes() == [4, 0, 0, 0]
    assert lay.runs(3) == [] and lay.positions(3).numel() == 0
    x = torch.arange(4.0)
    assert torch.equal(lay.unshard([lay.shard(x, r) for r in range(4)]), x)


# ---------------------------------------------------------------------------
# causal balance
# ---------------------------------------------------------------------------

def _imbalance(lay) -> float:
    costs = lay.costs()
    return max(costs) / (sum(costs) / len(costs))


@pytest.mark.parametrize("world", [2, 4])
def test_zigzag_balances_one_document(world):
    lay = Zigzag(16384, world)
    assert _imbalance(lay) <= 1.05
    assert _imbalance(Contiguous(16384, world)) > 1.4  # what zigzag fixes


@pytest.mark.parametrize("world", [2, 4])
def test_doc_zigzag_balances_packed_documents(world):
    cu = [0, 5000, 8000, 12000, 14000, 16384]
    assert _imbalance(DocZigzag(16384, world, cu)) <= 1.05
    # odd lengths: rounding leaves a few tokens' worth of skew
    odd = [0, 4999, 8002, 12001, 14003, 16384]
    assert _imbalance(DocZigzag(16384, world, odd)) <= 1.05


def test_doc_zigzag_tiny_documents_honest_bound():
    # 16384 tokens: long documents plus 64 documents of 3 tokens each. With
    # W=4 every 3-token document gives its tokens to ranks 0..2 (pieces 0..2),
    # so rank 3 gets none of them; the long ones dominate the cost.
    lens = [5000, 3000, 4000, 4192] + [3] * 64
    cu = [0]
    for length in lens:
        cu.append(cu[-1] + length)
    assert cu[-1] == 16384
    lay = DocZigzag(16384, 4, cu)
    assert _imbalance(lay) <= 1.001
    # Only tiny documents: piece sizes round towards the low ranks.
    tiny = DocZigzag(3 * 64, 4, list(range(0, 3 * 64 + 1, 3)))
    assert tiny.costs() == [64, 128, 192, 0]
    assert _imbalance(tiny) == pytest.approx(2.0)


def test_zigzag_over_a_pack_is_not_doc_balanced():
    cu = [0, 5000, 8000, 12000, 14000, 16384]
    assert _imbalance(Zigzag(16384, 4, cu)) > _imbalance(DocZigzag(16384, 4, cu))


# ---------------------------------------------------------------------------
# weighted
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("cu", [None, [0, 5000, 8001, 12000], [0, 7, 4000, 4003, 11000, 12000]])
def test_weighted_cost_follows_weights(cu):
    weights = [1, 1, 2]
    lay = Weighted(12000, 3, cu, weights)
    total = sum(lay.costs())
    for r, w in enumerate(weights):
        target = total * w / sum(weights)
        assert abs(lay.cost(r) - target) <= 0.05 * target
        assert lay.target(r) == pytest.approx(target)
        assert len(lay.ranges(r)) <= 2  # few, contiguous ranges
    assert lay.name == "weighted"


def test_weighted_default_weights_balance_cost():
    lay = get_layout("weighted", 16384, 4)
    assert _imbalance(lay) <= 1.01


def test_weighted_extreme_weights_keep_every_rank_non_empty():
    lay = Weighted(16, 4, None, [1e-9, 1e-9, 1e-9, 1.0])
    assert all(s >= 1 for s in lay.sizes())
    assert sum(lay.sizes()) == 16


@pytest.mark.parametrize("weights, match", [
    ([1, 1], r"one entry per rank \(world=3\), got 2"),
    ([1, 0, 2], r"finite and > 0.*weights\[1\]=0.0"),
    ([1, -1, 2], r"weights\[1\]=-1.0"),
    ([1, float("nan"), 2], r"weights\[1\]=nan"),
    ("abc", r"positive numbers"),
])
def test_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        get_layout("weighted", 12000, 3, weights=weights)


def test_weights_rejected_for_unweighted_layouts():
    with pytest.raises(ValueError, match=r"only apply to the 'weighted' layout"):
        get_layout("zigzag", 100, 2, weights=[1, 2])


# ---------------------------------------------------------------------------
# get_layout errors and misuse
# ---------------------------------------------------------------------------

def test_unknown_layout_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown layout 'zagzig'.*contiguous, doc_zigzag, weighted, zigzag"):
        get_layout("zagzig", 100, 2)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_world_and_size_errors(name):
    with pytest.raises(ValueError, match=r"world must be >= 1, got 0"):
        get_layout(name, 100, 0)
    with pytest.raises(ValueError, match=r"n_tokens=3 is smaller than world=4.*world <= 3.*at least 4 tokens"):
        get_layout(name, 3, 4)
    with pytest.raises(ValueError, match=r"end at the sequence length 100, got 98"):
        get_layout(name, 100, 2, cu_seqlens=[0, 50, 98])


def test_shape_and_rank_errors():
    lay = Zigzag(10, 2)
    with pytest.raises(ValueError, match=r"expects 10 tokens along dim 0, got shape \(9, 2\)"):
        lay.shard(torch.zeros(9, 2), 0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        lay.indices(2)
    with pytest.raises(ValueError, match=r"needs 2 shards, got 1"):
        lay.unshard([torch.zeros(5)])
    with pytest.raises(ValueError, match=r"shard 1 should hold 5 tokens"):
        lay.unshard([torch.zeros(5), torch.zeros(4)])


def test_layouts_are_pure_functions_of_inputs():
    cu = [0, 3, 20, 21, 37]
    for name in LAYOUTS:
        a = get_layout(name, 37, 3, cu_seqlens=cu)
        b = get_layout(name, 37, 3, cu_seqlens=torch.tensor(cu))
        assert [a.ranges(r) for r in range(3)] == [b.ranges(r) for r in range(3)]
        # returned tensors are copies: mutating one does not corrupt the cache
        a.indices(0).zero_()
        assert torch.equal(a.indices(0), b.indices(0))


def test_unshard_is_differentiable():
    lay = DocZigzag(37, 3, [0, 3, 20, 21, 37])
    x = torch.randn(37, 4)
    shards = [lay.shard(x, r).requires_grad_() for r in range(3)]
    lay.unshard(shards).mul(torch.arange(37.0)[:, None]).sum().backward()
    for r, s in enumerate(shards):
        assert torch.equal(s.grad, lay.indices(r).float()[:, None].expand(-1, 4))
