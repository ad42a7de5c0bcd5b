"""The chunked delta rule against the token-by-token recurrence.

The chunked kernel runs in fp32, the reference in fp64 from the same values;
errors are ||got - ref|| / ||ref||. With L2-normalised keys, gates in (0.5, 1)
and beta in (0, 1) fp32 round-off stays near 1e-6, so 1e-4 leaves room without
hiding a wrong term (a missed document reset, decay or WY correction costs
>= 1e-2).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distattn.kernels import delta
from distattn.kernels.delta import chunk_affine_map, chunk_delta_rule, delta_rule_reference

TOL = 1e-4
T, H, DK, DV = 150, 2, 16, 8
DOCS = [0, 37, 101, 150]  # three documents of odd lengths


def rel(got, ref) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def inputs(t, h, dk, dv, kda, seed=0, lo=0.5, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, h, dk, generator=g, dtype=torch.float64)
    k = F.normalize(torch.randn(t, h, dk, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(t, h, dv, generator=g, dtype=torch.float64)
    gate = lo + (hi - lo) * torch.rand(t, h, *((dk,) if kda else ()), generator=g, dtype=torch.float64)
    beta = torch.rand(t, h, generator=g, dtype=torch.float64)
    s0 = torch.randn(h, dk, dv, generator=g, dtype=torch.float64)
    do = torch.randn(t, h, dv, generator=g, dtype=torch.float64)
    ds = torch.randn(h, dk, dv, generator=g, dtype=torch.float64)
    return (q, k, v, gate, beta), s0, do, ds


def grads(fn, xs, s0, do, ds, dtype):
    leaves = [x.to(dtype).requires_grad_(True) for x in xs]
    init = None if s0 is None else s0.to(dtype).requires_grad_(True)
    o, final = fn(*leaves, init)
    loss = (o * do.to(o.dtype)).sum() + (final * ds.to(final.dtype)).sum()
    wrt = leaves + ([] if init is None else [init])
    return o, final, torch.autograd.grad(loss, wrt)


_REF: dict = {}


def reference(kda, with_init, cu):
    key = (kda, with_init, tuple(cu) if cu else None)
    if key not in _REF:
        xs, s0, do, ds = inputs(T, H, DK, DV, kda)
        s0 = s0 if with_init else None
        ref = grads(lambda *a: delta_rule_reference(*a[:5], cu_seqlens=cu, initial_state=a[5]),
                    xs, s0, do, ds, torch.float64)
        _REF[key] = (xs, s0, do, ds, ref)
    return _REF[key]


@pytest.mark.parametrize("kda", [False, True], ids=["gdn", "kda"])
@pytest.mark.parametrize("with_init", [False, True], ids=["zero", "init"])
@pytest.mark.parametrize("cu", [None, DOCS], ids=["one_doc", "three_docs"])
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_chunked_matches_reference(kda, with_init, cu, chunk):
    xs, s0, do, ds, (o_ref, s_ref, g_ref) = reference(kda, with_init, cu)
    o, final, g = grads(lambda *a: chunk_delta_rule(*a[:5], cu_seqlens=cu, initial_state=a[5],
                                                    chunk_size=chunk, output_final_state=True),
                        xs, s0, do, ds, torch.float32)
    assert o.dtype == torch.float32 and o.shape == (T, H, DV)
    assert rel(o, o_ref) < TOL
    assert rel(final, s_ref) < TOL
    names = ["q", "k", "v", "gate", "beta", "initial_state"]
    for name, a, b in zip(names, g, g_ref):
        assert a.shape == b.shape, name
        assert rel(a, b) < TOL, (name, rel(a, b))


def test_bounded_groups_match_one_group(monkeypatch):
    """KDA's pairwise decays are built a few chunks at a time; the split changes nothing."""
    xs, s0, do, ds, _ = reference(True, True, DOCS)
    run = lambda: grads(lambda *a: chunk_delta_rule(*a[:5], cu_seqlens=DOCS, initial_state=a[5],  # noqa: E731
                                                    chunk_size=16, output_final_state=True),
                        xs, s0, do, ds, torch.float64)
    o1, f1, g1 = run()
    monkeypatch.setattr(delta, "_PAIR_BUDGET", 2 * H * 16 * 16 * DK)
    for keep in (1 << 30, 0):  # the backward keeps every group's intermediates, or rebuilds them
        monkeypatch.setattr(delta, "_KEEP_BUDGET", keep)
        o2, f2, g2 = run()
        for a, b in zip((o1, f1, *g1), (o2, f2, *g2)):
            assert rel(a, b) < 1e-12


@pytest.mark.parametrize("kda", [False, True], ids=["gdn", "kda"])
def test_strong_decay_stays_finite(kda):
    """Gates in (1e-4, 0.1): a 64-token chunk's cumulative decay is ~e^-200, beyond fp32.

    Every exponent is a difference <= 0, so it underflows to 0 instead of overflowing.
    d gate = d log(gate) / gate, and d log(gate) is a reverse cumulative sum whose
    fp32 cancellation (~1e-7 absolute) is divided by gates near 1e-4: 1e-3 there."""
    xs, s0, do, ds = inputs(80, H, DK, DV, kda, seed=3, lo=1e-4, hi=0.1)
    o_ref, s_ref, g_ref = grads(lambda *a: delta_rule_reference(*a[:5], initial_state=a[5]),
                                xs, s0, do, ds, torch.float64)
    o, final, g = grads(lambda *a: chunk_delta_rule(*a[:5], initial_state=a[5], chunk_size=64,
                                                    output_final_state=True),
                        xs, s0, do, ds, torch.float32)
    tols = [TOL] * 5 + [1e-3] + [TOL] * 2  # o, final, dq, dk, dv, dgate, dbeta, dinit
    for a, b, tol in zip((o, final, *g), (o_ref, s_ref, *g_ref), tols):
        assert torch.isfinite(a).all()
        assert rel(a, b) < tol


def test_returns_output_only_by_default():
    xs, _, _, _ = inputs(20, 1, 4, 4, False)
    out = chunk_delta_rule(*(x.float() for x in xs), chunk_size=8)
    assert isinstance(out, torch.Tensor) and out.shape == (20, 1, 4)


@pytest.mark.parametrize("kda", [False, True], ids=["gdn", "kda"])
def test_affine_map_matches_reference(kda):
    xs, s0, _, _ = inputs(70, H, DK, DV, kda, seed=1)
    q, k, v, gate, beta = xs
    A, B = chunk_affine_map(k, gate, beta, v, chunk_size=16)
    assert A.shape == (H, DK, DK) and B.shape == (H, DK, DV)
    _, s_ref = delta_rule_reference(q, k, v, gate, beta, initial_state=s0)
    assert rel(A @ s0 + B, s_ref) < 1e-12
    # composing two consecutive spans equals the map of their concatenation
    A1, B1 = chunk_affine_map(k[:33], gate[:33], beta[:33], v[:33], chunk_size=16)
    A2, B2 = chunk_affine_map(k[33:], gate[33:], beta[33:], v[33:], chunk_size=16)
    assert rel(A2 @ A1, A) < 1e-12
    assert rel(A2 @ B1 + B2, B) < 1e-12


def test_affine_map_document_start_resets():
    xs, s0, _, _ = inputs(40, H, DK, DV, True, seed=2)
    q, k, v, gate, beta = xs
    A, B = chunk_affine_map(k, gate, beta, v, cu_seqlens=[0, 15, 40], chunk_size=8)
    assert A.abs().max() == 0
    _, s_ref = delta_rule_reference(q[15:], k[15:], v[15:], gate[15:], beta[15:])
    assert rel(B, s_ref) < 1e-12


def test_affine_map_gradients_flow():
    xs, _, _, _ = inputs(30, 1, 4, 4, True, seed=4)
    q, k, v, gate, beta = (x.clone().requires_grad_(True) for x in xs)
    A, B = chunk_affine_map(k, gate, beta, v, chunk_size=8)
    _, s_ref = delta_rule_reference(q, k, v, gate, beta)
    g = torch.autograd.grad(B.sum(), (k, gate, beta, v))
    g_ref = torch.autograd.grad(s_ref.sum(), (k, gate, beta, v))
    for a, b in zip(g, g_ref):
        assert rel(a, b) < 1e-10


@pytest.mark.parametrize("kda", [False, True], ids=["gdn", "kda"])
def test_gradcheck_written_backward(kda):
    xs, s0, _, _ = inputs(10, 1, 3, 3, kda, seed=5)
    leaves = [x.clone().requires_grad_(True) for x in (*xs, s0)]

    def fn(q, k, v, gate, beta, init):
        return chunk_delta_rule(q, k, v, gate, beta, cu_seqlens=[0, 7, 10], initial_state=init,
                                chunk_size=4, output_final_state=True)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_refuses_bad_shapes():
    xs, _, _, _ = inputs(12, 2, 4, 4, False)
    q, k, v, gate, beta = xs
    with pytest.raises(ValueError, match=r"gate must be \[12, 2\]"):
        chunk_delta_rule(q, k, v, gate[:, :1], beta)
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_delta_rule(q, k, v, gate, beta, initial_state=torch.zeros(2, 4, 5, dtype=q.dtype))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_delta_rule(q, k, v, gate, beta, chunk_size=0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        chunk_delta_rule(q, k, v, gate, beta, cu_seqlens=[0, 5])
