"""Choosing the delta-rule kernel: ours on CPU, flash-linear-attention's on CUDA when installed.

No GPU here, so the fla bridge is checked against a stand-in that follows fla's documented
conventions ([B, T, H, d], gate in log space, explicit scale, one initial state per document,
final states per document) and computes them with our fp64 recurrence: the bridge must give
`chunk_delta_rule`'s results and gradients, documents and initial state included.
"""
from __future__ import annotations

import pytest
import torch

from distattn.kernels import delta_backends
from distattn.kernels.delta import chunk_delta_rule, delta_rule_reference
from test_delta_rule import DOCS, inputs, rel


def fla_convention(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                   cu_seqlens=None):
    """fla's chunk_gated_delta_rule / chunk_kda calling convention, computed by the reference."""
    assert q.dim() == 4 and q.shape[0] == 1 and scale == 1.0
    T = q.shape[1]
    cu = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        h0 = None if initial_state is None else initial_state[i]
        o, s = delta_rule_reference(q[0, a:b], k[0, a:b], v[0, a:b], g[0, a:b].exp(), beta[0, a:b],
                                    initial_state=h0)
        outs.append(o)
        finals.append(s)
    return torch.cat(outs).unsqueeze(0), (torch.stack(finals) if output_final_state else None)


def test_cpu_tensors_run_our_kernel_and_fla_is_refused_clearly(monkeypatch):
    cpu = torch.device("cpu")
    assert delta_backends.select_delta_kernel(cpu) == "torch"
    with pytest.raises(ValueError, match=r"'fla' needs flash-linear-attention.*tensors on cpu.*"
                                         r"DISTATTN_DELTA_KERNEL=auto or torch"):
        delta_backends.select_delta_kernel(cpu, "fla")
    monkeypatch.setenv("DISTATTN_DELTA_KERNEL", "triton")
    with pytest.raises(ValueError, match=r"DISTATTN_DELTA_KERNEL='triton' .*auto, torch, fla"):
        delta_backends.select_delta_kernel(cpu)


@pytest.mark.parametrize("kda", [False, True], ids=["gdn", "kda"])
def test_the_fla_bridge_equals_our_kernel(monkeypatch, kda):
    monkeypatch.setattr(delta_backends, "_fla_ops",
                        lambda: {"gated_delta": fla_convention, "kda": fla_convention})
    monkeypatch.setattr(delta_backends, "select_delta_kernel", lambda device, prefer=None: prefer or "fla")
    xs, s0, do, ds = inputs(DOCS[-1], 2, 16, 8, kda)
    results = []
    for kernel in ("fla", "torch"):
        a = [x.clone().requires_grad_() for x in (*xs, s0)]
        o, fin = delta_backends.delta_rule(*a[:5], cu_seqlens=DOCS, initial_state=a[5],
                                           output_final_state=True, kernel=kernel)
        grads = torch.autograd.grad((o, fin), a, (do, ds))
        results.append((o, fin, grads))
    (o1, f1, g1), (o2, f2, g2) = results
    assert rel(o1, o2) < 1e-10 and rel(f1, f2) < 1e-10
    for name, x, y in zip(("q", "k", "v", "gate", "beta", "s0"), g1, g2):
        assert rel(x, y) < 1e-10, name
    ref = chunk_delta_rule(*xs, cu_seqlens=DOCS, initial_state=s0)
    assert rel(o2, ref) == 0.0
