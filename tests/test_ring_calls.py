"""The ring's fast path: one kernel call per ring step for one zigzag document, fused causal
squares that stay exact for every layout, and buffers reused across steps and calls."""
from __future__ import annotations

import random

import pytest
import torch

from distattn.kernels import block_forward, plan_calls, reference_attention, total_pairs
from distattn.layout import get_layout
from distattn.schemes.ring import RingPlan
from schemes_util import DTYPES, full_inputs, run_scheme
from test_kernels import runs_for

TOL = {"fp32": dict(atol=3e-5, rtol=3e-4), "bf16": dict(atol=2e-2, rtol=2e-2)}


def _plan(layout: str, n: int, world: int, rank: int, cu=None, causal=True) -> RingPlan:
    lay = get_layout(layout, n, world, cu)
    return RingPlan(rank, [lay.runs(r) for r in range(world)], causal)


@pytest.mark.parametrize("n", [16384, 100, 203, 8 * 13])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_one_call_per_step_for_one_zigzag_document(n, world):
    for rank in range(world):
        plan = _plan("zigzag", n, world, rank)
        assert [len(c) for c in plan.calls] == [1] * world, (rank, plan.calls)
        step0 = plan.calls[0][0]
        # step 0: one causal call over the whole local buffer (chunk r then chunk 2W-1-r)
        assert step0.causal and (step0.q0, step0.q1, step0.k0, step0.k1) == (0, plan.sizes[rank], 0,
                                                                              plan.sizes[rank])
        assert not any(c.causal for calls in plan.calls[1:] for c in calls)  # later steps: rectangles


def _visible_pairs(q_runs, k_runs, causal: bool) -> int:
    n = 0
    for a in q_runs:
        for b in k_runs:
            if a.doc != b.doc:
                continue
            for i in range(a.start, a.start + a.length):
                n += sum(1 for j in range(b.start, b.start + b.length) if not causal or j <= i)
    return n


@pytest.mark.parametrize("layout,n,world,cu", [
    ("zigzag", 203, 3, [0, 3, 120, 121, 170, 203]),
    ("doc_zigzag", 203, 2, [0, 3, 120, 121, 170, 203]),
    ("doc_zigzag", 96, 4, [0, 40, 96]),
    ("contiguous", 96, 3, [0, 50, 96]),
])
def test_fused_plans_compute_exactly_the_visible_pairs(layout, n, world, cu):
    lay = get_layout(layout, n, world, cu)
    for rank in range(world):
        plan = RingPlan(rank, [lay.runs(r) for r in range(world)], True)
        for s in range(world):
            q_runs, k_runs = lay.runs(rank), lay.runs(plan.src(s))
            assert total_pairs(plan.calls[s]) == _visible_pairs(q_runs, k_runs, True), (rank, s)
        # a document's two zigzag pieces against themselves are one causal call
        doc_runs = {}
        for r in lay.runs(rank):
            doc_runs.setdefault(r.doc, []).append(r)
        for calls in plan.calls[:1]:
            assert sum(c.causal for c in calls) <= len(doc_runs)


def test_fused_squares_match_the_reference_on_random_buffers():
    rng = random.Random(3)
    fused = 0
    for trial in range(20):
        t = rng.randint(8, 70)
        cu = [0, *sorted(rng.sample(range(1, t), k=rng.randint(0, 2))), t]
        cuts = sorted(rng.sample(range(1, t), k=rng.randint(2, 5)))
        pieces = list(zip([0, *cuts], [*cuts, t]))
        mine = sorted(rng.sample(pieces, k=rng.randint(2, len(pieces))))  # ascending, like a layout
        others = [p for p in pieces if p not in mine]
        rng.shuffle(others)
        at = rng.randint(0, len(others))
        k_pieces = others[:at] + mine + others[at:]  # the key buffer holds my stretch contiguously
        q_runs, k_runs = runs_for(mine, cu), runs_for(k_pieces, cu)
        calls = plan_calls(q_runs, k_runs, True)
        fused += sum(c.causal and c.q1 - c.q0 > max(r.length for r in q_runs) for c in calls)
        assert total_pairs(calls) == _visible_pairs(q_runs, k_runs, True)
        q, k, v = (x.float() for x in full_inputs(t, 2, 1, 8, torch.float32, seed=trial)[:3])
        qi = torch.cat([torch.arange(s, e) for s, e in mine])
        ki = torch.cat([torch.arange(s, e) for s, e in k_pieces])
        out, _ = block_forward(q[qi], k[ki], v[ki], calls, 8 ** -0.5)
        torch.testing.assert_close(out, reference_attention(q, k, v, cu, True)[qi], atol=2e-5, rtol=2e-4)
    assert fused > 5  # the random buffers did exercise fused squares


def _check_against_reference(res, n, h, hkv, d, dtype, cu, causal=True):
    q, k, v, dout = full_inputs(n, h, hkv, d, DTYPES[dtype])
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ref = reference_attention(qr, kr, vr, cu, causal)
    ref.backward(dout.float())
    for r in res:
        idx = r["idx"]
        torch.testing.assert_close(r["out"].float(), ref[idx].detach(), **TOL[dtype])
        torch.testing.assert_close(r["dq"].float(), qr.grad[idx].float(), **TOL[dtype])
        torch.testing.assert_close(r["dk"].float(), kr.grad[idx].float(), **TOL[dtype])
        torch.testing.assert_close(r["dv"].float(), vr.grad[idx].float(), **TOL[dtype])


# odd chunk lengths: N = 2W x 25 (W=2) and 2W x 13 (W=4); and 203 (uneven chunks)
@pytest.mark.parametrize("world,n", [(2, 100), (4, 104), (4, 203)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_ring_matches_the_reference_gqa(ranks, world, n, dtype):
    assert all(len(c) == 1 for r in range(world) for c in _plan("zigzag", n, world, r).calls)
    h, hkv, d = 8, 2, 16
    res = ranks(world, run_scheme, ("ring", {}), n, h, hkv, d, dtype, None, True)
    _check_against_reference(res, n, h, hkv, d, dtype, None)


def test_input_dtype_dkv_on_the_wire(ranks):
    """bf16 dK/dV accumulators on the wire (dkv_dtype='input') over three hops."""
    n, h, hkv, d, cu = 203, 8, 2, 16, [0, 3, 120, 121, 170, 203]
    res = ranks(3, run_scheme, ("ring", {"dkv_dtype": "input"}), n, h, hkv, d, "bf16", cu, True)
    _check_against_reference(res, n, h, hkv, d, "bf16", cu)


def repeated_calls(n, h, hkv, d, layout):
    """Two ring calls with the same shapes and different inputs inside `kept_ring_buffers`: the
    second reuses the first's buffers, and what the first returned is not overwritten by it. Outside
    the scope nothing stays."""
    import torch.distributed as dist

    import distattn
    from distattn.schemes import ring
    with distattn.kept_ring_buffers():
        got = _repeated_calls(n, h, hkv, d, layout)
        got["kept_inside"] = sorted(k[0] for k in ring._STORE.flat)
    got["kept_after"] = len(ring._STORE.flat)
    return got


def _repeated_calls(n, h, hkv, d, layout):
    import torch.distributed as dist

    import distattn
    group = dist.group.WORLD
    scheme = distattn.get_scheme("ring", layout_name=layout)
    grads = []
    for seed in (0, 1):
        q, k, v, dout = full_inputs(n, h, hkv, d, torch.float32, seed)
        xs = [distattn.shard(x, scheme=scheme, group=group).requires_grad_(True) for x in (q, k, v)]
        out = distattn.attention(*xs, scheme=scheme, group=group, n_tokens=n)
        out.backward(distattn.shard(dout, scheme=scheme, group=group))
        grads.append([out.detach()] + [x.grad for x in xs])
    kept = [g.clone() for g in grads[0]]
    q, k, v, dout = full_inputs(n, h, hkv, d, torch.float32, 2)  # a third call, then compare the first
    xs = [distattn.shard(x, scheme=scheme, group=group).requires_grad_(True) for x in (q, k, v)]
    distattn.attention(*xs, scheme=scheme, group=group, n_tokens=n).backward(
        distattn.shard(dout, scheme=scheme, group=group))
    return dict(idx=scheme.layout(n, dist.get_world_size()).indices(dist.get_rank()), second=grads[1],
                first_unchanged=all(torch.equal(a, b) for a, b in zip(kept, grads[0])))


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_buffers_reused_across_calls_stay_exact(ranks, layout):
    n, h, hkv, d = 96, 4, 2, 16
    res = ranks(3, repeated_calls, n, h, hkv, d, layout)
    q, k, v, dout = full_inputs(n, h, hkv, d, torch.float32, 1)
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ref = reference_attention(qr, kr, vr, None, True)
    ref.backward(dout)
    for r in res:
        assert r["first_unchanged"]
        assert r["kept_inside"] == ["acc0", "acc1", "kv0", "kv1"] and r["kept_after"] == 0
        for got, want in zip(r["second"], (ref.detach(), qr.grad, kr.grad, vr.grad)):
            torch.testing.assert_close(got, want[r["idx"]], **TOL["fp32"])
