"""The local linear-attention kernel against the dense reference ((QK^T) * D) V.

Tolerances, relative to the largest reference magnitude: the kernel computes in
fp32 from the given inputs (states fp32), the reference in fp64 from the same
values. fp32 sums of O(T * d) products lose ~1e-7 relative, so 2e-6 leaves
room without hiding a wrong term (a missing block, decay power or document
reset costs >= 1e-2). bf16 inputs are compared with the reference computed from
the same bf16 values; outputs and gradients are rounded to bf16 once (2^-8),
hence 1e-2.
"""
from __future__ import annotations

import pytest
import torch

import distattn
from distattn.kernels.linear import (linear_attention_local, normalize_decay, plan_heads,
                                     reference_linear_attention)

TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2}


def _inputs(n, h, hkv, d, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, h, d, generator=g).to(dtype)
    k = torch.randn(n, hkv, d, generator=g).to(dtype)
    v = torch.randn(n, hkv, dv, generator=g).to(dtype)
    do = torch.randn(n, h, dv, generator=g).to(dtype)
    return q, k, v, do


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def check_local(n, h, hkv, d, dv, *, cu=None, decay=None, fmap=None, block=16, dtype=torch.float32):
    q, k, v, do = _inputs(n, h, hkv, d, dv, dtype)
    a, b, c = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = linear_attention_local(a, b, c, cu_seqlens=cu, decay=decay, feature_map=fmap, block=block)
    out.backward(do)
    assert out.dtype == dtype and a.grad.dtype == dtype and b.grad.shape == k.shape
    qr, kr, vr = (x.double().requires_grad_(True) for x in (q, k, v))
    ref = reference_linear_attention(qr, kr, vr, cu, decay, fmap)
    ref.backward(do.double())
    tol = TOL[dtype]
    for name, got, want in (("out", out, ref), ("dq", a.grad, qr.grad), ("dk", b.grad, kr.grad),
                            ("dv", c.grad, vr.grad)):
        err = rel_err(got, want)
        assert err < tol, (name, err)


PER_HEAD = torch.tensor([0.9, 0.7, 0.99, 0.5])  # distinct inside GQA groups: per-query-head states
PER_GROUP = torch.tensor([0.9, 0.9, 0.6, 0.6])  # uniform inside groups: per-KV-head states


@pytest.mark.parametrize("decay", [None, 0.9, PER_HEAD, PER_GROUP], ids=["lam1", "scalar", "head", "group"])
@pytest.mark.parametrize("n,block", [(64, 16), (203, 16), (203, 64), (5, 64)],
                         ids=["multiple", "tail", "tail64", "short"])
def test_matches_dense_reference(decay, n, block):
    check_local(n, 4, 2, 8, 8, decay=decay, block=block)


@pytest.mark.parametrize("fmap", ["identity", "elu1"])
def test_documents_gqa_feature_map(fmap):
    # documents shorter than a block, a one-token document, one spanning many blocks
    check_local(203, 4, 1, 8, 12, cu=[0, 3, 120, 121, 170, 203], decay=PER_HEAD, fmap=fmap, block=16)


@pytest.mark.parametrize("decay", [None, 0.95])
def test_bf16(decay):
    check_local(150, 4, 2, 16, 16, cu=[0, 70, 150], decay=decay, fmap="elu1", block=32,
                dtype=torch.bfloat16)


def test_block_size_does_not_change_the_result():
    q, k, v, _ = _inputs(300, 2, 2, 8, 8, torch.float32)
    outs = [linear_attention_local(q, k, v, decay=0.97, block=b) for b in (1, 7, 64, 512)]
    for o in outs[1:]:
        assert rel_err(o, outs[0]) < 2e-6


def test_strong_decay_on_long_sequence_stays_finite():
    # lam^n underflows to 0 for n in the thousands; only non-negative powers are used, so no inf/nan
    q, k, v, do = _inputs(3000, 2, 1, 8, 8, torch.float32)
    a = q.clone().requires_grad_(True)
    out = linear_attention_local(a, k, v, decay=0.3, block=64)
    out.backward(do)
    assert torch.isfinite(out).all() and torch.isfinite(a.grad).all()
    # with lam = 0.3 a token sees ~20 earlier tokens: compare the tail with a short recomputation
    ref = reference_linear_attention(q[-200:], k[-200:], v[-200:], decay=0.3)
    assert rel_err(out[-100:], ref[-100:]) < 2e-6


def test_causality_is_bitwise():
    n, cut = 203, 90
    q, k, v, _ = _inputs(n, 4, 2, 8, 8, torch.float32)
    base = linear_attention_local(q, k, v, decay=PER_HEAD, feature_map="elu1", block=16)
    for x in (q, k, v):
        x[cut:] = torch.randn_like(x[cut:]) * 3
    other = linear_attention_local(q, k, v, decay=PER_HEAD, feature_map="elu1", block=16)
    assert torch.equal(base[:cut], other[:cut])
    assert not torch.equal(base[cut:], other[cut:])


def test_head_plan_shares_states_per_kv_head_when_it_can():
    assert plan_heads(8, 2, None).groups == 2
    assert plan_heads(8, 2, 0.9).groups == 2
    assert plan_heads(4, 2, PER_GROUP).groups == 2
    p = plan_heads(4, 2, PER_HEAD)
    assert p.groups == 4 and p.repeat_kv and p.rep == 1
    assert normalize_decay(torch.ones(4), 4) is None


@pytest.mark.parametrize("decay,msg", [(0.0, "in \\(0, 1\\]"), (1.5, "in \\(0, 1\\]"),
                                       (torch.ones(3), "one value per query head"),
                                       ("x", "decay must be None")])
def test_bad_decay_is_refused(decay, msg):
    q = torch.randn(8, 4, 4)
    with pytest.raises(ValueError, match=msg):
        linear_attention_local(q, q, q, decay=decay)


def test_errors_speak():
    q = torch.randn(8, 4, 4)
    with pytest.raises(ValueError, match="feature_map must be one of"):
        linear_attention_local(q, q, q, feature_map="relu")
    with pytest.raises(ValueError, match="block must be a positive integer"):
        linear_attention_local(q, q, q, block=0)
    with pytest.raises(ValueError, match="GQA needs q heads % kv heads == 0"):
        linear_attention_local(q, torch.randn(8, 3, 4), torch.randn(8, 3, 4))
    with pytest.raises(ValueError, match="packed"):
        linear_attention_local(q[None], q, q)


def test_public_api_local_and_kind_checks():
    q, k, v, _ = _inputs(40, 4, 2, 8, 8, torch.float32)
    out = distattn.linear_attention(q, k, v, scheme="local", cu_seqlens=[0, 10, 40], decay=0.9)
    ref = reference_linear_attention(q, k, v, [0, 10, 40], 0.9)
    assert rel_err(out, ref) < 2e-6
    # the same through lasp2 / lasp1 without a process group (W = 1)
    for name in ("lasp2", "lasp1"):
        o = distattn.linear_attention(q, k, v, scheme=name, cu_seqlens=[0, 10, 40], decay=0.9)
        assert rel_err(o, ref) < 2e-6
    with pytest.raises(ValueError, match="is for softmax attention"):
        distattn.linear_attention(q, k, v, scheme="ring")
    with pytest.raises(ValueError, match="call distattn.linear_attention"):
        distattn.attention(q, k, v, scheme="lasp2")
