"""Kernels against the dense reference: forward, backward, GQA, documents, dtypes, merges."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from distattn.kernels import (block_backward, block_forward, merge_partials, plan_calls,
                              reference_attention, total_pairs)

# fp32 kernels agree with the fp32 reference to rounding; bf16 inputs carry
# ~3 significant digits, so outputs and grads are compared at bf16 resolution.
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def runs_for(ranges, cu):
    """Runs (global ranges cut at document boundaries) for a buffer holding `ranges` in order."""
    runs, local = [], 0
    for s, e in ranges:
        i = s
        while i < e:
            doc = max(j for j in range(len(cu) - 1) if cu[j] <= i)
            end = min(e, cu[doc + 1])
            runs.append(SimpleNamespace(local_start=local, start=i, length=end - i, doc=doc, doc_start=cu[doc]))
            local += end - i
            i = end
    return runs


def make_qkv(t, h, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, h, d, generator=g).to(dtype)
    k = torch.randn(t, hkv, d, generator=g).to(dtype)
    v = torch.randn(t, hkv, d, generator=g).to(dtype)
    return q, k, v


def kernel_attention(q, k, v, cu, causal, q_ranges=None, k_ranges=None):
    """Kernel path with autograd-free fwd/bwd on permuted buffers."""
    t = q.shape[0]
    q_ranges = q_ranges or [(0, t)]
    k_ranges = k_ranges or [(0, t)]
    qi = torch.cat([torch.arange(s, e) for s, e in q_ranges])
    ki = torch.cat([torch.arange(s, e) for s, e in k_ranges])
    calls = plan_calls(runs_for(q_ranges, cu), runs_for(k_ranges, cu), causal)
    scale = q.shape[-1] ** -0.5
    out, lse = block_forward(q[qi], k[ki], v[ki], calls, scale)
    return out, lse, calls, qi, ki, scale


CASES = [
    # (T, H, Hkv, D, cu_seqlens)
    (64, 4, 4, 16, [0, 64]),
    (75, 8, 2, 32, [0, 17, 18, 50, 75]),  # odd docs, a one-token doc, GQA 4:1
    (129, 4, 1, 64, [0, 3, 100, 129]),    # MQA
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_block_matches_reference_fwd_bwd(case, causal, dtype):
    t, h, hkv, d, cu = case
    q, k, v = make_qkv(t, h, hkv, d, dtype)
    # Permuted buffers (zigzag-like) exercise the planner on non-contiguous runs.
    ranges = [(0, t // 4), (3 * t // 4, t), (t // 4, 3 * t // 4)]
    out, lse, calls, qi, ki, scale = kernel_attention(q, k, v, cu, causal, ranges, ranges[::-1])

    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ref, ref_lse = reference_attention(qr, kr, vr, cu, causal, return_lse=True)
    torch.testing.assert_close(out, ref[qi].detach(), **TOL[torch.float32 if dtype == torch.float32 else dtype])
    torch.testing.assert_close(lse, ref_lse[qi].detach(), atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=1e-4)

    g = torch.Generator().manual_seed(1)
    dout = torch.randn(t, h, d, generator=g).to(dtype)
    ref.backward(dout.float())
    o_cast = out.to(dtype)
    dq, dk, dv = block_backward(dout[qi], q[qi], k[ki], v[ki], o_cast, lse, calls, scale)
    tol = TOL[dtype]
    torch.testing.assert_close(dq, qr.grad[qi].float(), **tol)
    torch.testing.assert_close(dk, kr.grad[ki].float(), **tol)
    torch.testing.assert_close(dv, vr.grad[ki].float(), **tol)


def test_planner_skips_empty_and_halves_zigzag_blocks():
    # zigzag W=2 over 8 tokens: chunks of 2; rank 0 holds [0,2)+[6,8), rank 1 holds [2,4)+[4,6)
    cu = [0, 8]
    r0 = runs_for([(0, 2), (6, 8)], cu)
    r1 = runs_for([(2, 4), (4, 6)], cu)
    # rank 0 queries vs rank 1 keys: first chunk sees nothing, tail chunk sees all 4 keys
    calls = plan_calls(r0, r1, causal=True)
    assert total_pairs(calls) == 2 * 4
    assert len(calls) == 1  # both key runs fuse into one rectangle
    # rank 1 queries vs rank 0 keys: both chunks see keys [0,2) only
    calls = plan_calls(r1, r0, causal=True)
    assert total_pairs(calls) == 4 * 2
    # documents: keys in another document are never computed
    assert plan_calls(runs_for([(0, 4)], [0, 4, 8]), runs_for([(4, 8)], [0, 4, 8]), causal=False) == []
    # causal diagonal of a contiguous block is one causal square
    calls = plan_calls(runs_for([(0, 8)], cu), runs_for([(0, 8)], cu), causal=True)
    assert [c.causal for c in calls] == [True] and total_pairs(calls) == 36


def test_random_ranges_fuzz():
    rng = random.Random(0)
    for trial in range(12):
        t = rng.randint(5, 60)
        cuts = sorted(rng.sample(range(1, t), k=min(t - 1, rng.randint(0, 4))))
        cu = [0, *cuts, t]
        q, k, v = make_qkv(t, 2, 1, 8, torch.float32, seed=trial)
        pts = sorted(rng.sample(range(1, t), k=min(t - 1, 3)))
        pieces = list(zip([0, *pts], [*pts, t]))
        rng.shuffle(pieces)
        causal = bool(trial % 2)
        out, lse, calls, qi, ki, _ = kernel_attention(q, k, v, cu, causal, pieces, pieces)
        ref = reference_attention(q, k, v, cu, causal)
        torch.testing.assert_close(out, ref[qi], **TOL[torch.float32])


def test_split_kv_merge_equals_full():
    t, cu = 96, [0, 40, 96]
    q, k, v = make_qkv(t, 4, 2, 16, torch.float32)
    ref, ref_lse = reference_attention(q, k, v, cu, causal=True, return_lse=True)
    qr = runs_for([(0, t)], cu)
    outs, lses = [], []
    for s, e in [(0, 30), (30, 70), (70, 96)]:  # three KV pieces computed separately
        calls = plan_calls(qr, runs_for([(s, e)], cu), causal=True)
        o, l = block_forward(q, k[s:e], v[s:e], calls, 16 ** -0.5)
        outs.append(o)
        lses.append(l)
    out, lse = merge_partials(outs, lses)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_merge_with_empty_rows_is_identity():
    o = torch.randn(3, 2, 4)
    l = torch.randn(3, 2)
    empty_o, empty_l = torch.zeros(3, 2, 4), torch.full((3, 2), float("-inf"))
    out, lse = merge_partials([empty_o, o, empty_o], [empty_l, l, empty_l])
    torch.testing.assert_close(out, o)
    torch.testing.assert_close(lse, l)
    out, lse = merge_partials([empty_o, empty_o], [empty_l, empty_l])
    assert torch.isfinite(out).all() and torch.isneginf(lse).all()
