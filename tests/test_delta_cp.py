"""Delta-rule linear attention (GDN, KDA) under context parallelism: one all-gather of affine state maps
(lasp2) or the state hopping rank to rank (lasp1).

At W = 2 and 4, contiguous and zigzag, three documents, the fp32 CP output and the gradients of q, k, v,
gate and beta equal the fp64 sequential recurrence within 1e-4 relative error, and every rank's ledger
equals the scheme's comm_bytes; the same for the lasp1 ring (contiguous only).
"""
from __future__ import annotations

import pytest
import torch

from delta_util import CU, H, T, inputs


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("rule", ["gated_delta", "kda"])
def test_delta_cp_equals_the_recurrence(ranks, world, layout, rule):
    from delta_util import delta_cp_errors
    for errs, sent, expect in ranks(world, delta_cp_errors, layout, rule):
        assert max(errs) < 1e-4, errs
        assert sent == expect


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("rule", ["gated_delta", "kda"])
@pytest.mark.parametrize("cu", [CU, [0, 96], [0, 48, 96]], ids=["three_docs", "one_doc", "aligned"])
def test_delta_ring_equals_the_recurrence(ranks, world, rule, cu):
    """LASP-1 ring: several runs per rank, one run spanning every rank, documents ending on a rank boundary."""
    from delta_util import delta_ring_errors
    for errs, sent, expect in ranks(world, delta_ring_errors, rule, cu):
        assert max(errs) < 1e-4, errs
        assert sent == expect


def test_local_delta_rule_equals_the_recurrence():
    import distattn
    from distattn.kernels.delta import delta_rule_reference
    q, k, v, gate, beta, _ = inputs("gated_delta", seed=3)
    out = distattn.linear_attention(q.float(), k.float(), v.float(), scheme="local", cu_seqlens=CU,
                                    rule="gated_delta", gate=gate.float(), beta=beta.float())
    ref, _ = delta_rule_reference(q, k, v, gate, beta, cu_seqlens=CU)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


def test_delta_comm_bytes_are_flat_in_n():
    import distattn
    from distattn.schemes.base import AttnShape
    s = distattn.get_scheme("lasp2", layout_name="contiguous")
    a = s.comm_bytes(AttnShape(4096, 8, 8, 64), 4, rule="gated_delta")
    b = s.comm_bytes(AttnShape(1 << 20, 8, 8, 64), 4, rule="gated_delta")
    assert a == b and a.fwd["all_gather"] == 3 * 8 * (64 * 64 + 64 * 64) * 4
    assert a.bwd["all_gather"] == 3 * 8 * 64 * 64 * 4


@pytest.mark.parametrize("kwargs,match", [
    (dict(rule="gated_delta", gate=torch.rand(T, H, 8), beta=torch.rand(T, H)), r"gate must be \[96, 2\]"),
    (dict(rule="kda", gate=torch.rand(T, H), beta=torch.rand(T, H)), r"gate must be \[96, 2, 8\]"),
    (dict(rule="gated_delta", gate=torch.rand(T, H), beta=None), "beta must be"),
    (dict(rule="delta", gate=torch.rand(T, H), beta=torch.rand(T, H)), "the delta rules are"),
])
def test_delta_refusals(kwargs, match):
    import distattn
    q, k, v = torch.randn(T, H, 8), torch.randn(T, H, 8), torch.randn(T, H, 8)
    with pytest.raises(ValueError, match=match):
        distattn.linear_attention(q, k, v, scheme="local", **kwargs)


def test_delta_rule_needs_a_linear_scheme():
    import distattn
    q = torch.randn(T, H, 8)
    with pytest.raises(ValueError, match="'ring' is for softmax attention"):
        distattn.linear_attention(q, q, q, scheme="ring", rule="gated_delta", gate=torch.rand(T, H),
                                  beta=torch.rand(T, H))
