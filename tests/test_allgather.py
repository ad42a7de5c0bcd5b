"""The allgather scheme: exactness against the dense reference, ledger == formula, head pieces."""
from __future__ import annotations

import pytest
import torch

import distattn
import distattn.schemes.allgather as allgather_mod
from distattn.comm import Comm, CommLedger
from distattn.kernels import reference_attention
from distattn.schemes.allgather import AllGather
from distattn.schemes.base import AttnShape
from schemes_util import run_causality
from test_schemes import CASES, check

SPECS = [
    ("allgather", {}),
    ("allgather", {"head_stride": 1}),
    ("allgather", {"layout_name": "doc_zigzag"}),
]


def _id(spec):
    name, opts = spec
    return name + "".join(f"-{k}={v}" for k, v in opts.items())


def _configured(spec):
    """Pass a configured scheme object to the ranks: unpickling it imports (registers) the module."""
    name, opts = spec
    return distattn.get_scheme(name, **opts), {}


@pytest.mark.parametrize("spec", SPECS, ids=_id)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_exact_fp32_causal_docs(ranks, spec, world):
    check(ranks, _configured(spec), world, "docs_gqa", "fp32", True)


@pytest.mark.parametrize("spec", SPECS[:2], ids=_id)
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype,causal", [("bf16", True), ("fp32", False), ("bf16", False)])
def test_exact_dtype_and_mask(ranks, spec, world, dtype, causal):
    check(ranks, _configured(spec), world, "docs_gqa", dtype, causal)


def test_exact_single_document_contiguous(ranks):
    check(ranks, _configured(("allgather", {"layout_name": "contiguous", "head_stride": 2})),
          3, "one_doc", "fp32", True)


@pytest.mark.parametrize("spec", SPECS[:2], ids=_id)
def test_causality_is_bitwise(ranks, spec):
    n, h, hkv, d, cu = CASES["docs_gqa"]
    cut = 150
    changed = 0
    for idx, a, b in ranks(4, run_causality, _configured(spec), n, h, hkv, d, cu, cut):
        keep = idx < cut
        assert keep.any()
        assert torch.equal(a[keep], b[keep])
        changed += int((a[~keep] != b[~keep]).any())
    assert changed > 0  # the perturbation did reach later outputs


def test_registered_by_name():
    s = distattn.get_scheme("allgather", head_stride=2, layout_name="doc_zigzag")
    assert isinstance(s, AllGather) and s.head_stride == 2 and s.layout_name == "doc_zigzag"


@pytest.mark.parametrize("bad", [4, 5])
def test_head_stride_must_divide_kv_heads(bad):
    s = distattn.get_scheme("allgather", head_stride=bad)
    for call in (lambda: s.validate(heads=12, kv_heads=6, world=2),
                 lambda: s.comm_bytes(AttnShape(64, 12, 6, 16), 2)):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert f"head_stride={bad}" in msg and "Hkv=6" in msg and "1, 2, 3, 6" in msg
    # also when the mistake only shows up at call time (single process, no group)
    q, k, v = torch.randn(8, 4, 4), torch.randn(8, 2, 4), torch.randn(8, 2, 4)
    with pytest.raises(ValueError, match=r"head_stride=3 .*Hkv=2.*1, 2"):
        distattn.attention(q, k, v, scheme=distattn.get_scheme("allgather", head_stride=3), group=None)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_head_stride_type_checked_at_construction(bad):
    with pytest.raises(ValueError, match="head_stride"):
        distattn.get_scheme("allgather", head_stride=bad)


def test_validate_gqa_message():
    with pytest.raises(ValueError, match="6 heads, 4 kv heads"):
        AllGather().validate(heads=6, kv_heads=4, world=2)


def test_comm_bytes_matches_the_llama3_table():
    # even shards: fwd (W-1)*KVblk*s, bwd (W-1)*KVblk*s + (W-1)*KVblk*4 (fp32 dK/dV)
    n, h, hkv, d, w = 256, 8, 2, 16, 4
    kvblk = 2 * (n // w) * hkv * d
    for hs in (None, 1):
        vol = AllGather(head_stride=hs).comm_bytes(AttnShape(n, h, hkv, d, 2), w, rank=1)
        assert vol.fwd == {"all_gather_uneven": (w - 1) * kvblk * 2}
        assert vol.bwd == {"all_gather_uneven": (w - 1) * kvblk * 2,
                           "reduce_scatter": (w - 1) * kvblk * 4}
    # uneven shards: the gather wire is padded to the largest shard, the scatter is exact
    sizes = AllGather().layout(203, 4, None).sizes()
    vol = AllGather().comm_bytes(AttnShape(203, h, hkv, d, 4), 4, rank=2)
    row = 2 * hkv * d
    assert vol.fwd["all_gather_uneven"] == 3 * max(sizes) * row * 4
    assert vol.bwd["reduce_scatter"] == (203 - sizes[2]) * row * 4
    assert AllGather().comm_bytes(AttnShape(203, h, hkv, d, 4), 1).total == 0


def test_pieces_overlap_compute_and_are_exact(monkeypatch):
    """Piece i+1's gather is posted before piece i is computed, in forward and backward, and
    piece i's reduce-scatter is posted before piece i+1 is computed. Single process."""
    events = []
    real_gather, real_scatter = Comm.all_gather_uneven, Comm.reduce_scatter
    real_fwd, real_bwd = allgather_mod.block_forward, allgather_mod.block_backward

    def gather(self, t, sizes, async_op=False):
        events.append(("gather", t.shape[2]))
        return real_gather(self, t, sizes, async_op=async_op)

    def scatter(self, t, sizes=None, async_op=False):
        events.append(("scatter", t.shape[2]))
        return real_scatter(self, t, sizes=sizes, async_op=async_op)

    def fwd(q, *a, **kw):
        events.append(("fwd", q.shape[1]))
        return real_fwd(q, *a, **kw)

    def bwd(dout, q, *a, **kw):
        events.append(("bwd", q.shape[1]))
        return real_bwd(dout, q, *a, **kw)

    monkeypatch.setattr(Comm, "all_gather_uneven", gather)
    monkeypatch.setattr(Comm, "reduce_scatter", scatter)
    monkeypatch.setattr(allgather_mod, "block_forward", fwd)
    monkeypatch.setattr(allgather_mod, "block_backward", bwd)

    n, h, hkv, d, cu = CASES["docs_gqa"]
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(n, hh, d, generator=g) for hh in (h, hkv, hkv, h))
    qs, ks, vs = (x.clone().requires_grad_(True) for x in (q, k, v))
    ledger = CommLedger()
    out = distattn.attention(qs, ks, vs, scheme=AllGather(head_stride=1), group=None, cu_seqlens=cu,
                             ledger=ledger)
    out.backward(dout)
    per = h // hkv
    assert events == [("gather", 1), ("gather", 1), ("fwd", per), ("fwd", per),
                      ("gather", 1), ("gather", 1), ("bwd", per), ("scatter", 1), ("bwd", per),
                      ("scatter", 1)]
    counts = {tag: {op: s.calls for op, s in ledger.summary(tag).items()} for tag in ("fwd", "bwd")}
    assert counts == {"fwd": {"all_gather_uneven": 2},
                      "bwd": {"all_gather_uneven": 2, "reduce_scatter": 2}}

    qr, kr, vr = (x.clone().requires_grad_(True) for x in (q, k, v))
    ref = reference_attention(qr, kr, vr, cu, True)
    ref.backward(dout)
    tol = dict(atol=3e-5, rtol=3e-4)
    torch.testing.assert_close(out, ref, **tol)
    for a, b in ((qs, qr), (ks, kr), (vs, vr)):
        torch.testing.assert_close(a.grad, b.grad, **tol)
