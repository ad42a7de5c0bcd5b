"""The local chunked part of linear attention on flash-linear-attention (CUDA) and the choice of it.

No GPU here: the bridge is checked against a stand-in with `chunk_simple_gla`'s documented
conventions ([B, T, H, d], per-head log decay `g_gamma`, explicit scale, varlen `cu_seqlens`)
computed by our dense reference (fp64, returned in fp32 as fla does); the bridge must equal our
kernel's forward and gradients (fp32, within 1e-5) with GQA, a per-head decay and several runs.
"""
from __future__ import annotations

import pytest
import torch

from distattn.kernels import linear, linear_fla
from distattn.kernels.linear import _chunk_backward, _chunk_forward, local_runs, reference_linear_attention


def simple_gla_convention(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                          output_final_state=False, cu_seqlens=None):
    assert q.shape[0] == 1 and scale == 1.0 and g is None and initial_state is None
    decay = None if g_gamma is None else g_gamma.double().exp()
    o = reference_linear_attention(q[0].double(), k[0].double(), v[0].double(), cu_seqlens.tolist(), decay)
    return o.float().unsqueeze(0), None


def test_cpu_runs_ours_and_a_bad_choice_is_refused(monkeypatch):
    assert not linear_fla.use_fla(torch.device("cpu"))
    monkeypatch.setenv("DISTATTN_LINEAR_KERNEL", "fla")
    with pytest.raises(ValueError, match=r"DISTATTN_LINEAR_KERNEL=fla needs flash-linear-attention.*on cpu"):
        linear_fla.use_fla(torch.device("cpu"))
    monkeypatch.setenv("DISTATTN_LINEAR_KERNEL", "cuda")
    with pytest.raises(ValueError, match=r"'cuda' is not a linear-attention kernel; use one of auto, torch, fla"):
        linear_fla.use_fla(torch.device("cpu"))


@pytest.mark.parametrize("decay", [None, (0.9, 0.7)], ids=["plain", "decay"])
def test_the_fla_bridge_equals_our_chunks(monkeypatch, decay):
    monkeypatch.setattr(linear_fla, "_fla_simple_gla", lambda: simple_gla_convention)
    monkeypatch.setattr(linear, "_fla", lambda q, runs: True)
    g = torch.Generator().manual_seed(0)
    A, R, T, d = 2, 2, 45, 8
    q, do = (torch.randn(A, R, T, d, generator=g, dtype=torch.float32) for _ in range(2))
    k, v = (torch.randn(A, 1, T, d, generator=g, dtype=torch.float32) for _ in range(2))
    runs = local_runs(T, [0, 11, 30, 45])
    loglam = None if decay is None else torch.tensor(decay).log()
    got = linear.chunk_forward(q, k, v, runs, loglam)
    want = _chunk_forward(q, k, v, runs, loglam, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(linear.chunk_backward(q, k, v, do, runs, loglam), _chunk_backward(q, k, v, do, runs, loglam, 8)):
        torch.testing.assert_close(a.float(), b, rtol=1e-5, atol=1e-5)
