"""Ulysses and USP (ulysses x ring): exactness, ledger == formula, causality, layouts, errors.

Exactness and tolerances are those of test_schemes.py (`check`): out/dq/dk/dv
against the dense fp32 reference, and every byte in the ledger equal to the
scheme's `comm_bytes`. Case "docs_gqa" has 8 q heads and 2 kv heads, so
ulysses at cp=4 (and usp at ulysses=4) replicates KV heads.
"""
from __future__ import annotations

import pytest
import torch

import distattn
import distattn.schemes.ulysses  # noqa: F401  (register "ulysses")
import distattn.schemes.usp  # noqa: F401  (register "usp")
from distattn.kernels import reference_attention
from distattn.layout import get_layout
from distattn.schemes.ulysses import Ulysses, head_split
from distattn.schemes.usp import USP, USPLayout
from schemes_util import full_inputs, run_causality
from test_schemes import CASES, TOL, check


def _registered(fn, *args, **kwargs):
    """Rank side: make sure the registry knows these schemes, then run fn."""
    import distattn.schemes.ulysses  # noqa: F401
    import distattn.schemes.usp  # noqa: F401
    return fn(*args, **kwargs)


class _Ranks:
    def __init__(self, ranks):
        self._ranks = ranks

    def __call__(self, world, fn, *args, **kwargs):
        return self._ranks(world, _registered, fn, *args, **kwargs)


@pytest.fixture
def uranks(ranks):
    return _Ranks(ranks)


# ----------------------------------------------------------------------------- ulysses


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ulysses_exact_fp32_causal_docs(uranks, world):
    check(uranks, ("ulysses", {}), world, "docs_gqa", "fp32", True)


@pytest.mark.parametrize("world,dtype,causal", [(4, "bf16", True), (2, "fp32", False),
                                                (4, "bf16", False), (2, "bf16", True)])
def test_ulysses_dtype_and_mask(uranks, world, dtype, causal):
    check(uranks, ("ulysses", {}), world, "docs_gqa", dtype, causal)


@pytest.mark.parametrize("layout,world", [("zigzag", 4), ("doc_zigzag", 2)])
def test_ulysses_other_layouts(uranks, layout, world):
    check(uranks, ("ulysses", {"layout_name": layout}), world, "docs_gqa", "fp32", True)


def test_ulysses_replica_grads_in_input_dtype(uranks):
    """dkv_dtype="input": replicated heads' dK/dV partials travel in bf16 (fewer bytes)."""
    check(uranks, ("ulysses", {"dkv_dtype": "input"}), 4, "docs_gqa", "bf16", False)


def test_ulysses_single_document(uranks):
    check(uranks, ("ulysses", {}), 4, "one_doc", "fp32", True)


# ----------------------------------------------------------------------------- usp


@pytest.mark.parametrize("world,u", [(4, 2), (4, 1), (4, 4), (2, 2)])
def test_usp_exact_fp32_causal_docs(uranks, world, u):
    check(uranks, ("usp", {"ulysses": u}), world, "docs_gqa", "fp32", True)


@pytest.mark.parametrize("world,u", [(4, 2), (2, 2), (4, 4)])
def test_usp_bf16(uranks, world, u):
    check(uranks, ("usp", {"ulysses": u}), world, "docs_gqa", "bf16", True)


@pytest.mark.parametrize("opts,case,causal", [
    ({"ulysses": 2}, "docs_gqa", False),
    ({"ulysses": 2, "layout_name": "doc_zigzag", "dkv_dtype": "input"}, "docs_gqa", True),
    ({"ulysses": 2}, "one_doc", True),
])
def test_usp_variants(uranks, opts, case, causal):
    check(uranks, ("usp", opts), 4, case, "fp32", causal)


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize("spec", [("ulysses", {}), ("usp", {"ulysses": 2})],
                         ids=["ulysses", "usp-2"])
def test_causality_is_bitwise(uranks, spec):
    n, h, hkv, d, cu = CASES["docs_gqa"]
    cut = 150
    changed = kept = 0
    for idx, a, b in uranks(4, run_causality, spec, n, h, hkv, d, cu, cut):
        keep = idx < cut  # a contiguous shard may lie wholly past the cut
        kept += int(keep.sum())
        assert torch.equal(a[keep], b[keep])
        changed += int((a[~keep] != b[~keep]).any())
    assert kept == cut and changed > 0


# ----------------------------------------------------------------------------- explicit groups


def _run_bound(n, h, hkv, d, cu):
    """usp(ulysses=2) at cp=4 with groups handed in through bind()."""
    import torch.distributed as dist
    uly = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    ring = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    rank = dist.get_rank()
    scheme = USP(ulysses=2).bind(uly[rank // 2], ring[rank % 2])
    q, k, v, _ = full_inputs(n, h, hkv, d, torch.float32)
    group = dist.group.WORLD
    ql, kl, vl = (distattn.shard(x, scheme=scheme, group=group, cu_seqlens=cu) for x in (q, k, v))
    out = distattn.attention(ql, kl, vl, scheme=scheme, group=group, cu_seqlens=cu, n_tokens=n)
    return scheme.layout(n, 4, cu).indices(rank), out


def test_usp_bind_groups(uranks):
    n, h, hkv, d, cu = CASES["docs_gqa"]
    q, k, v, _ = full_inputs(n, h, hkv, d, torch.float32)
    ref = reference_attention(q, k, v, cu, True)
    for idx, out in uranks(4, _run_bound, n, h, hkv, d, cu):
        torch.testing.assert_close(out, ref[idx], **TOL["fp32"])


def _run_cp_subgroups(n, h, hkv, d, cu):
    """dp=2 x cp=4 on 8 ranks: schemes get only their cp sub-group and split it themselves."""
    import torch.distributed as dist
    from distattn.comm import CommLedger
    from distattn.schemes.base import AttnShape
    cps = [dist.new_group([0, 1, 2, 3]), dist.new_group([4, 5, 6, 7])]
    cp = cps[dist.get_rank() // 4]
    me = dist.get_rank(cp)
    res = []
    for spec in (("usp", {"ulysses": 2}), ("ulysses", {})):
        scheme = distattn.get_scheme(spec[0], **spec[1])
        q, k, v, dout = full_inputs(n, h, hkv, d, torch.float32, seed=dist.get_rank() // 4)
        ql, kl, vl, dl = (distattn.shard(x, scheme=scheme, group=cp, cu_seqlens=cu) for x in (q, k, v, dout))
        ql, kl, vl = (x.requires_grad_(True) for x in (ql, kl, vl))
        ledger = CommLedger()
        for _ in range(2):  # the second call reuses the cached sub-groups
            ledger.reset()
            ql.grad = kl.grad = vl.grad = None
            out = distattn.attention(ql, kl, vl, scheme=scheme, group=cp, cu_seqlens=cu, ledger=ledger)
            out.backward(dl)
        want = scheme.comm_bytes(AttnShape(n, h, hkv, d, 4, tuple(cu)), 4, me)
        got = {t: {op: x.bytes_sent for op, x in ledger.summary(t).items() if x.bytes_sent}
               for t in ("fwd", "bwd")}
        res.append(dict(idx=scheme.layout(n, 4, cu).indices(me), out=out.detach(), dq=ql.grad,
                        dk=kl.grad, dv=vl.grad, got=got,
                        want={t: {op: b for op, b in getattr(want, t).items() if b} for t in ("fwd", "bwd")}))
    return res


def test_cp_subgroups_of_a_larger_world(uranks):
    n, h, hkv, d, cu = CASES["docs_gqa"]
    refs = []
    for seed in (0, 1):
        q, k, v, dout = full_inputs(n, h, hkv, d, torch.float32, seed=seed)
        qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        ref = reference_attention(qr, kr, vr, cu, True)
        ref.backward(dout)
        refs.append((ref.detach(), qr.grad, kr.grad, vr.grad))
    for rank, per_scheme in enumerate(uranks(8, _run_cp_subgroups, n, h, hkv, d, cu, timeout=180)):
        ref = refs[rank // 4]
        for r in per_scheme:
            i = r["idx"]
            for got, want in zip((r["out"], r["dq"], r["dk"], r["dv"]), ref):
                torch.testing.assert_close(got, want[i], **TOL["fp32"])
            assert r["got"] == r["want"]


def test_single_process_without_distributed():
    """No process group at all: both schemes reduce to local attention."""
    n, h, hkv, d, cu = CASES["docs_gqa"]
    q, k, v, _ = full_inputs(n, h, hkv, d, torch.float32)
    ref = reference_attention(q, k, v, cu, True)
    for scheme in (Ulysses(), USP()):
        out = distattn.attention(q, k, v, scheme=scheme, group=None, cu_seqlens=cu)
        torch.testing.assert_close(out, ref, **TOL["fp32"])


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("base", ["zigzag", "doc_zigzag", "contiguous"])
@pytest.mark.parametrize("world,u", [(4, 2), (6, 3), (4, 1), (4, 4)])
def test_usp_layout_groups_hold_ring_shards(base, world, u):
    n, cu = 203, [0, 3, 120, 121, 170, 203]
    lay = USPLayout(n, world, cu, ulysses=u, base=base)
    ring = get_layout(base, n, world // u, cu)
    for j in range(world // u):
        got = torch.cat([lay.indices(c) for c in lay.members(j)])
        assert torch.equal(got, ring.indices(j))  # same tokens, same order
    if u == 1:
        assert [lay.ranges(r) for r in range(world)] == [ring.ranges(r) for r in range(world)]
    if u == world:
        cont = get_layout("contiguous", n, world)  # zigzag at world 1 is the identity order
        assert [lay.ranges(r) for r in range(world)] == [cont.ranges(r) for r in range(world)]


def test_head_split_replicates_kv():
    s = head_split(8, 2, 4)  # 2 q heads per rank, 4 q heads per kv head
    assert (s.q_per, s.kv_per, s.kv_index) == (2, 1, (0, 0, 1, 1))
    s = head_split(8, 4, 2)
    assert (s.q_per, s.kv_per, s.kv_index) == (4, 2, None)
    s = head_split(12, 3, 6)  # 2 q heads per rank inside groups of 4
    assert (s.kv_per, s.kv_index) == (1, (0, 0, 1, 1, 2, 2))


# ----------------------------------------------------------------------------- errors


def test_ulysses_validation_messages():
    with pytest.raises(ValueError, match=r"ulysses needs heads % cp == 0: 8 heads, cp=3; .*usp"):
        Ulysses().validate(heads=8, kv_heads=2, world=3)
    with pytest.raises(ValueError, match=r"12 heads, cp=8; use usp with ulysses=4"):
        Ulysses().validate(heads=12, kv_heads=4, world=8)
    with pytest.raises(ValueError, match=r"cannot split 3 kv heads for 12 q heads over cp=2"):
        Ulysses().validate(heads=12, kv_heads=3, world=2)
    Ulysses().validate(heads=8, kv_heads=2, world=8)  # one q head per rank, kv replicated


def test_usp_validation_messages():
    with pytest.raises(ValueError, match=r"cp % ulysses == 0: cp=4, ulysses=3"):
        USP(ulysses=3).validate(heads=12, kv_heads=12, world=4)
    with pytest.raises(ValueError, match=r"heads % ulysses == 0: 6 heads, ulysses=4; use ulysses=2"):
        USP(ulysses=4).validate(heads=6, kv_heads=6, world=8)
    with pytest.raises(ValueError, match=r"cannot split 3 kv heads for 12 q heads over ulysses=2"):
        USP(ulysses=2).validate(heads=12, kv_heads=3, world=4)
    with pytest.raises(ValueError, match="cp % ulysses"):
        USP(ulysses=3).layout(100, 4)
    with pytest.raises(ValueError, match="dkv_dtype"):
        USP(dkv_dtype="fp16")
    with pytest.raises(ValueError, match="positive integer"):
        USP(ulysses=0)
    n, h, hkv, d, cu = CASES["docs_gqa"]
    q, k, v, _ = full_inputs(n, 6, 6, d, torch.float32)
    with pytest.raises(ValueError, match="ulysses needs heads % cp"):
        Ulysses().validate(heads=6, kv_heads=6, world=4)
    assert distattn.get_scheme("usp", ulysses=2).ulysses == 2
