"""Every softmax scheme against the dense single-device reference.

Tolerances: fp32 results agree with the fp32 reference to accumulated rounding
(atol 3e-5, rtol 3e-4 at any W: partials are merged in fp32). bf16 inputs are
compared with the fp32 reference computed from the same bf16 inputs; the
output is rounded to bf16 once (relative 2^-8), gradients accumulate in fp32
and are rounded once, so 2e-2 absolute/relative holds independent of W.
"""
from __future__ import annotations

import pytest
import torch

from distattn.kernels import reference_attention
from schemes_util import DTYPES, full_inputs, run_causality, run_scheme

TOL = {"fp32": dict(atol=3e-5, rtol=3e-4), "bf16": dict(atol=2e-2, rtol=2e-2)}

# (N, H, Hkv, D, cu_seqlens): odd document lengths, one document shorter than a
# chunk, one document spanning all ranks, GQA 8:2.
CASES = {
    "one_doc": (96, 4, 4, 16, None),
    "docs_gqa": (203, 8, 2, 16, [0, 3, 120, 121, 170, 203]),
}

SCHEMES = [
    ("ring", {}),
    ("ring", {"layout_name": "doc_zigzag"}),
    ("ring", {"layout_name": "contiguous", "dkv_dtype": "input"}),
]


def _id(spec):
    name, opts = spec
    return name + "".join(f"-{v}" for v in opts.values())


def check(ranks, spec, world, case, dtype, causal):
    n, h, hkv, d, cu = CASES[case]
    res = ranks(world, run_scheme, spec, n, h, hkv, d, dtype, cu, causal)
    q, k, v, dout = full_inputs(n, h, hkv, d, DTYPES[dtype])
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ref = reference_attention(qr, kr, vr, cu, causal)
    ref.backward(dout.float())
    tol = TOL[dtype]
    for r in res:
        idx = r["idx"]
        assert r["dtype_out"] == str(DTYPES[dtype])
        torch.testing.assert_close(r["out"].float(), ref[idx].detach(), **tol)
        torch.testing.assert_close(r["dq"].float(), qr.grad[idx].float(), **tol)
        torch.testing.assert_close(r["dk"].float(), kr.grad[idx].float(), **tol)
        torch.testing.assert_close(r["dv"].float(), vr.grad[idx].float(), **tol)
        # every byte counted: the ledger equals the scheme's own formula
        for tag in ("fwd", "bwd"):
            got = {op: b for op, b in r["ledger"][tag].items() if b or op in r["expect"][tag]}
            want = {op: b for op, b in r["expect"][tag].items() if b or op in got}
            assert got == want, (tag, got, want)


@pytest.mark.parametrize("spec", SCHEMES, ids=_id)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_exact_fp32_causal_docs(ranks, spec, world):
    check(ranks, spec, world, "docs_gqa", "fp32", True)


@pytest.mark.parametrize("spec", SCHEMES[:1], ids=_id)
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype,causal", [("bf16", True), ("fp32", False), ("bf16", False)])
def test_exact_dtype_and_mask(ranks, spec, world, dtype, causal):
    check(ranks, spec, world, "docs_gqa", dtype, causal)


@pytest.mark.parametrize("spec", SCHEMES[:1], ids=_id)
def test_exact_single_document(ranks, spec):
    check(ranks, spec, 4, "one_doc", "fp32", True)


@pytest.mark.parametrize("spec", SCHEMES[:2], ids=_id)
def test_causality_is_bitwise(ranks, spec):
    n, h, hkv, d, cu = CASES["docs_gqa"]
    cut = 150
    changed = 0
    for idx, a, b in ranks(4, run_causality, spec, n, h, hkv, d, cu, cut):
        keep = idx < cut
        assert keep.any()
        assert torch.equal(a[keep], b[keep])
        changed += int((a[~keep] != b[~keep]).any())
    assert changed > 0  # the perturbation did reach later outputs
