"""Attention-aware packing: coverage, bounded deferral, token cap, balance, exact resume, trainer."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distattn.sched.cost import doc_pairs
from distattn.sched.pack import BalancedBatchStream, BalancedPacker, compare, ffd_fits, seq_pairs
from distattn.train.data import ListSource


@st.composite
def long_tailed(draw):
    """Document lengths with a long tail: mostly short, some near or beyond seq_len."""
    T = draw(st.sampled_from([16, 32, 64]))
    n = draw(st.integers(1, 40))
    short = st.integers(1, max(1, T // 4))
    long = st.integers(T // 2, 3 * T)
    lengths = draw(st.lists(st.one_of(short, short, short, long), min_size=n, max_size=n))
    return T, lengths


def _taken(pk: BalancedPacker, before: tuple[int, int], after: tuple[int, int]) -> list[tuple]:
    """Fresh pieces the packer consumed between two (epoch, cursor) positions."""
    out, (e, c) = [], before
    total = pk.pieces_per_epoch()
    while (e, c) != after:
        if c >= total:
            e, c = e + 1, 0
            continue
        out.append(pk._piece_at(e, c).key())
        c += 1
    return out


def _run(pk: BalancedPacker, dp: int, micro: int, steps: int):
    taken, emitted, plans = Counter(), Counter(), []
    for _ in range(steps):
        before = (pk.epoch, pk.cursor)
        plan = pk.plan(dp, micro)
        taken.update(_taken(pk, before, (pk.epoch, pk.cursor)))
        emitted.update(p.key() for p in plan.pieces())
        plans.append(plan)
    return taken, emitted, plans


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(long_tailed(), st.integers(1, 4), st.integers(1, 3), st.integers(0, 3), st.integers(0, 2**31))
def test_every_piece_once_deferral_bounded_cap_holds(case, dp, micro, K, seed):
    T, lengths = case
    pk = BalancedPacker(lengths, T, seed=seed, max_defer=K)
    steps = 3 * (K + 2) + 2 * pk.pieces_per_epoch() // (dp * micro) + 2
    taken, emitted, plans = _run(pk, dp, micro, steps)
    # fresh pieces come in whole epochs: each epoch lists every document's pieces exactly once
    pieces = Counter(pk._piece_at(0, i).key() for i in range(pk.pieces_per_epoch()))
    for d, L in enumerate(lengths):
        spans = sorted((a, b) for (doc, a, b) in pieces if doc == d)
        assert spans[0][0] == 0 and spans[-1][1] == L and all(0 < b - a <= T for a, b in spans)
        assert all(b == a2 for (_, b), (a2, _) in zip(spans, spans[1:]))
    assert pk.epoch >= 1  # the run crossed at least one epoch
    # nothing dropped, nothing repeated: taken = emitted + still carried
    assert emitted + Counter(p.key() for p in pk.carry) == taken
    for plan in plans:
        for rank in plan.bins:
            assert len(rank) == micro
            for b in rank:
                assert sum(p.length for p in b) <= T  # token cap of a micro-batch
        assert all(p.age <= K for p in plan.pieces())  # trained within K steps of its intake
    assert all(p.age <= K for p in pk.carry)
    assert sum(p.length for p in pk.carry) <= (K + 1) * dp * micro * T


@settings(max_examples=40, deadline=None)
@given(long_tailed(), st.integers(2, 4), st.integers(1, 3), st.integers(0, 2**31))
def test_attention_plan_never_less_balanced_than_token_plan(case, dp, micro, seed):
    """Same documents per step: balancing pairs gives max/mean work <= balancing tokens."""
    T, lengths = case
    att = BalancedPacker(lengths, T, seed=seed)
    tok = BalancedPacker(lengths, T, seed=seed, balance="tokens")
    for _ in range(6):
        a, t = att.plan(dp, micro), tok.plan(dp, micro)
        assert sorted(p.key() for p in a.pieces()) == sorted(p.key() for p in t.pieces())
        assert max(a.costs) <= max(t.costs) + 1e-9
        assert sum(a.costs) == pytest.approx(sum(t.costs))


def test_balanced_beats_fixed_windows_on_long_tail():
    rng = np.random.default_rng(0)
    lengths = np.maximum(1, rng.lognormal(np.log(2048), 1.5, size=3000)).astype(int)
    res = compare(lengths, 16384, 4, 4, 20)
    assert res["tokens"]["idle"] >= 0.15
    assert res["attention"]["idle"] <= 0.05
    assert res["attention"]["max_over_mean"] <= res["tokens"]["max_over_mean"]


def _docs(n=60, seed=1, T=48):
    rng = np.random.default_rng(seed)
    lens = np.where(rng.random(n) < 0.2, rng.integers(T // 2, 3 * T, n), rng.integers(1, T // 3, n))
    return ListSource([rng.integers(0, 256, int(L)) for L in lens])


@pytest.mark.parametrize("K", [0, 2])
def test_stream_sequences_and_exact_resume(K):
    src, T, dp, ga = _docs(), 48, 2, 2
    mk = lambda r: BalancedBatchStream(src, T, 1, r, dp, seed=3, max_defer=K, pad_chunk=8)
    full = [mk(r) for r in range(dp)]
    want = [[s.next_step(ga) for s in full] for _ in range(12)]
    part = [mk(r) for r in range(dp)]
    for _ in range(5):
        for s in part:
            s.next_step(ga)
    state = part[0].state_dict()
    assert state == part[1].state_dict()
    resumed = [mk(r) for r in range(dp)]
    for s in resumed:
        s.load_state_dict(state)
    got = want[:5] + [[s.next_step(ga) for s in resumed] for _ in range(7)]
    for step_w, step_g in zip(want, got):
        for bw, bg in zip(step_w, step_g):
            for x, y in zip(bw, bg):
                assert torch.equal(x.tokens, y.tokens) and torch.equal(x.loss_mask, y.loss_mask)
                assert x.cu_seqlens == y.cu_seqlens
    # every sequence: fixed length, boundaries ascending, labels are next bytes of the same document
    for step in want:
        for rank in step:
            for b in rank:
                assert b.seq_len == T and b.cu_seqlens[0] == 0 and b.cu_seqlens[-1] == T
                assert all(x < y for x, y in zip(b.cu_seqlens, b.cu_seqlens[1:]))
                assert all(y - x <= T for x, y in zip(b.cu_seqlens, b.cu_seqlens[1:]))
                for x, y in zip(b.cu_seqlens, b.cu_seqlens[1:]):  # labels: the next token of the document
                    assert torch.equal(b.labels[x:y - 1], b.tokens[x + 1:y])
                    assert b.loss_mask[x:y - 1].eq(1).all() or b.loss_mask[x:y].eq(0).all()


def test_resume_under_another_dp_skips_and_repeats_nothing():
    src, T = _docs(seed=5), 48
    a = BalancedBatchStream(src, T, 1, 0, 2, seed=7, max_defer=2)
    seen = Counter()
    for _ in range(4):
        a.next_step(2)
        seen.update(p.key() for p in a.last_plan.pieces())
    state = a.state_dict()
    b = BalancedBatchStream(src, T, 1, 0, 3, seed=7, max_defer=2)
    b.load_state_dict(state)
    for _ in range(12):
        b.next_step(2)
        seen.update(p.key() for p in b.last_plan.pieces())
    pk = b.packer
    ref = BalancedPacker(src.lengths, T, seed=7)
    total = ref.pieces_per_epoch()
    expect = Counter(ref._piece_at(e, i).key() for e in range(pk.epoch) for i in range(total))
    expect.update(ref._piece_at(pk.epoch, i).key() for i in range(pk.cursor))
    assert seen + Counter(p.key() for p in pk.carry) == expect


def test_resume_rejects_other_data():
    s = BalancedBatchStream(_docs(seed=1), 48, seed=0)
    s.next_step(1)
    other = BalancedBatchStream(_docs(seed=2), 48, seed=0)
    with pytest.raises(ValueError, match="different data|saved for data"):
        other.load_state_dict(s.state_dict())


def test_ffd_and_pairs_helpers():
    assert ffd_fits([5, 5, 5], 2, 10) and not ffd_fits([6, 6, 6], 2, 10)
    assert seq_pairs([0, 3, 10]) == doc_pairs(3) + doc_pairs(7)


def balance_steps(cfg_dict: dict):
    """Rank side: two steps of the trainer; rank 0 returns losses and the balance statistics."""
    import torch.distributed as dist
    from distattn.config import Config
    from distattn.train.trainer import Trainer
    tr = Trainer(Config.model_validate(cfg_dict), quiet=True)
    logs = [tr.train_step() for _ in range(2)]
    state = tr.stream.state_dict()
    tr.mesh.destroy()
    return ([l.loss for l in logs], [l.extra for l in logs], state) if dist.get_rank() == 0 else None


def test_trainer_attention_balance_dp2(ranks, tmp_path):
    from distattn.config import load_config
    from test_train import TINY
    cfg = load_config(None, TINY + [f"run.output_dir={tmp_path}", "parallel.world_size=2", "parallel.dp=2",
                                    "parallel.cp=1", "attention.scheme=local", "data.balance=attention",
                                    "train.grad_accum=2"])
    losses, extras, state = [r for r in ranks(2, balance_steps, cfg.model_dump()) if r is not None][0]
    assert all(np.isfinite(losses)) and len(losses) == 2
    for e in extras:
        assert e["balance/predicted_max"] >= e["balance/predicted_mean"] > 0
        assert 0 <= e["balance/predicted_idle"] < 1 and 0 <= e["balance/measured_idle"] < 1
        assert e["balance/measured_max"] > 0
    assert state["balanced"]["steps"] == 2
