"""The CUDA kernel paths against the dense reference (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from distattn.kernels import block_backward, block_forward, plan_calls, reference_attention
from distattn.kernels.backends import select_backend
from test_kernels import make_qkv, runs_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# fp32 runs on the memory-efficient kernel (TF32 off): close to the fp32 reference.
# bf16 runs on the flash kernel: bf16 resolution.
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("backend", ["cuda-sdpa", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_block_matches_reference(dtype, causal, backend):
    t, h, hkv, d, cu = 203, 8, 2, 64, [0, 3, 120, 121, 170, 203]
    q, k, v = make_qkv(t, h, hkv, d, dtype)
    ranges = [(0, 50), (150, 203), (50, 150)]
    qi = torch.cat([torch.arange(s, e) for s, e in ranges])
    calls = plan_calls(runs_for(ranges, cu), runs_for(ranges, cu), causal)
    dev = torch.device("cuda")
    be = select_backend(dev, prefer=backend)
    scale = d ** -0.5
    qc, kc, vc = (x[qi].to(dev) for x in (q, k, v))
    out, lse = block_forward(qc, kc, vc, calls, scale, backend=be)
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ref = reference_attention(qr, kr, vr, cu, causal)
    dout = torch.randn(t, h, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref.backward(dout.float())
    torch.testing.assert_close(out.cpu(), ref[qi].detach(), **TOL[dtype])
    dq, dk, dv = block_backward(dout[qi].to(dev), qc, kc, vc, out.to(dtype), lse, calls, scale, backend=be)
    torch.testing.assert_close(dq.cpu(), qr.grad[qi].float(), **TOL[dtype])
    torch.testing.assert_close(dk.cpu(), kr.grad[qi].float(), **TOL[dtype])
    torch.testing.assert_close(dv.cpu(), vr.grad[qi].float(), **TOL[dtype])
