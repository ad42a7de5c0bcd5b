"""Which kernel runs a span of the delta rule: ours (`delta.py`) or flash-linear-attention's.

The context-parallel schemes (`schemes/delta.py`, `schemes/delta_ring.py`) only need, per run of
tokens, the output from an initial state and optionally the final state, differentiable in every
input and in the initial state. On CUDA, flash-linear-attention (`pip install fla-core`, imported as
`fla`) has fused Triton kernels for exactly that: `chunk_gated_delta_rule` (GDN, one log-gate per
head) and `chunk_kda` (KDA, one per key channel), both with `initial_state` and
`output_final_state`. They are used when installed and the tensors are on CUDA; everywhere else,
and whenever `DISTATTN_DELTA_KERNEL=torch` is set, our chunked kernel runs. The span maps of the
LASP-2 exchange (`chunk_affine_map`) are always ours: fla has no such entry point.

Conventions bridged here: fla takes [B, T, H, d] with B = 1, the gate in log space, an explicit
`scale` (ours is the caller's, so scale = 1), and returns (o, final_state) with the state [N, H, d_k,
d_v] in fp32. Our gate is alpha itself; log(alpha) keeps autograd's d alpha = d log(alpha) / alpha.
"""
from __future__ import annotations

import functools
import logging
import os

import torch
from torch import Tensor

log = logging.getLogger("distattn")

KERNELS = ("auto", "torch", "fla")
ENV = "DISTATTN_DELTA_KERNEL"


@functools.lru_cache(maxsize=None)
def _fla_ops():
    """fla's two entry points, or None when flash-linear-attention is not installed."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # not installed, or no Triton/CUDA to import it with
        return None
    try:
        from fla.ops.kda import chunk_kda
    except Exception:  # an fla release from before Kimi Delta Attention: ours runs KDA
        chunk_kda = None
    return {"gated_delta": chunk_gated_delta_rule, "kda": chunk_kda}


def requested_kernel() -> str:
    """The kernel asked for through DISTATTN_DELTA_KERNEL (default auto), checked."""
    want = os.environ.get(ENV, "auto")
    if want not in KERNELS:
        raise ValueError(f"{ENV}={want!r} is not a delta-rule kernel; use one of {', '.join(KERNELS)}")
    return want


def select_delta_kernel(device: torch.device, prefer: str | None = None) -> str:
    """'fla' on CUDA with flash-linear-attention installed (unless told 'torch'), else 'torch'."""
    want = prefer or requested_kernel()
    if want not in KERNELS:
        raise ValueError(f"delta-rule kernel {want!r} is not one of {', '.join(KERNELS)}")
    if want == "torch":
        return "torch"
    usable = device.type == "cuda" and _fla_ops() is not None
    if want == "fla" and not usable:
        where = "its tensors are on CUDA" if device.type == "cuda" else f"tensors on {device.type}"
        raise ValueError(f"delta-rule kernel 'fla' needs flash-linear-attention (pip install fla-core) and "
                         f"tensors on CUDA; {where}, installed: {_fla_ops() is not None}. "
                         f"Set {ENV}=auto or torch")
    choice = "fla" if usable else "torch"
    _log_choice(device.type, choice)
    return choice


@functools.lru_cache(maxsize=None)
def _log_choice(device: str, choice: str) -> None:
    log.info("delta rule on %s: %s kernel", device, "flash-linear-attention" if choice == "fla" else "distattn chunked")


def delta_rule(q: Tensor, k: Tensor, v: Tensor, gate: Tensor, beta: Tensor, cu_seqlens=None,
               initial_state: Tensor | None = None, chunk_size: int | None = None,
               output_final_state: bool = False, kernel: str | None = None):
    """The delta rule with `delta.chunk_delta_rule`'s contract, on the kernel chosen for the device.

    Returns o, or (o, final_state) when asked; `initial_state` enters the first document and the
    final state is the last document's, as in `chunk_delta_rule`.
    """
    from distattn.layout import as_cu_seqlens
    rule = "gated_delta" if gate.dim() == 2 else "kda"
    if select_delta_kernel(q.device, kernel) == "torch" or _fla_ops()[rule] is None:
        from distattn.kernels.delta import chunk_delta_rule
        return chunk_delta_rule(q, k, v, gate, beta, cu_seqlens=cu_seqlens, initial_state=initial_state,
                                chunk_size=chunk_size, output_final_state=output_final_state)
    from distattn.kernels.delta import _check
    _check(q, k, v, gate, beta, initial_state)
    cu = list(as_cu_seqlens(cu_seqlens, q.shape[0]))
    fn = _fla_ops()[rule]
    f32 = torch.promote_types(gate.dtype, torch.float32)  # the gate and states at least fp32
    h0 = None
    if initial_state is not None:  # fla wants one state per document; ours enters the first
        first = initial_state.to(f32).unsqueeze(0)
        h0 = torch.cat([first, first.new_zeros((len(cu) - 2, *initial_state.shape))])
    cu_t = torch.tensor(cu, dtype=torch.long, device=q.device) if len(cu) > 2 else None
    o, final = fn(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), torch.log(gate.to(f32)).unsqueeze(0),
                  beta.unsqueeze(0), scale=1.0, initial_state=h0, output_final_state=output_final_state,
                  cu_seqlens=cu_t)
    o = o[0].to(q.dtype)
    return (o, final[-1]) if output_final_state else o


__all__ = ["KERNELS", "delta_rule", "requested_kernel", "select_delta_kernel"]
