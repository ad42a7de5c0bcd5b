"""Single-block attention primitives with log-sum-exp, per device.

A primitive computes one dense block, either fully visible or a causal square
(query i sees key j <= i, same start): the planner in `softmax.py` reduces every
document mask and every ring step to those two shapes, so no backend ever sees
an additive mask or a bottom-right/top-left ambiguity.

Tensors here are [1, H, T, D] views; lse is [1, H, T] fp32.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Protocol

import torch

aten = torch.ops.aten


class Backend(Protocol):
    name: str

    def forward(self, q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(self, do, q, k, v, o, lse, causal: bool, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class CpuFlash:
    """aten's CPU flash attention; handles GQA and bf16 natively."""

    name = "cpu-flash"

    def forward(self, q, k, v, causal, scale):
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)

    def backward(self, do, q, k, v, o, lse, causal, scale):
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, causal, scale=scale)


def _expand_kv(k: torch.Tensor, n_heads: int) -> torch.Tensor:
    rep = n_heads // k.shape[1]
    return k if rep == 1 else k.repeat_interleave(rep, dim=1)


def _fold_kv_grad(dk: torch.Tensor, n_kv: int) -> torch.Tensor:
    rep = dk.shape[1] // n_kv
    if rep == 1:
        return dk
    return dk.unflatten(1, (n_kv, rep)).sum(2)


class CudaSdpa:
    """torch's CUDA flash kernel for fp16/bf16, memory-efficient kernel for fp32.

    These kernels need equal q/kv head counts, so GQA expands KV per block and
    folds the gradient back; flash-attn (when installed) avoids that copy.
    """

    name = "cuda-sdpa"

    def forward(self, q, k, v, causal, scale):
        h = q.shape[1]
        k, v = _expand_kv(k, h), _expand_kv(v, h)
        if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
            res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
            return res[0], res[1]
        res = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
        return res[0], res[1][..., : q.shape[2]]

    def backward(self, do, q, k, v, o, lse, causal, scale):
        h, hkv = q.shape[1], k.shape[1]
        ke, ve = _expand_kv(k, h), _expand_kv(v, h)
        if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
            tq, tk = q.shape[2], k.shape[2]
            seed = torch.zeros(2, dtype=torch.uint64, device=q.device)  # unused: no dropout
            offset = torch.zeros((), dtype=torch.uint64, device=q.device)
            dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
                do, q, ke, ve, o, lse, None, None, tq, tk, 0.0, causal, seed, offset, scale=scale)
        else:
            zero = torch.zeros((), dtype=torch.int64, device=q.device)
            # the kernel reads lse with rows padded to a multiple of 32
            t = lse.shape[-1]
            lse_p = lse.new_zeros((*lse.shape[:-1], (t + 31) // 32 * 32))
            lse_p[..., :t] = lse
            dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
                do, q, ke, ve, None, o, lse_p, zero, zero, 0.0,
                [True, True, True, False], causal, scale=scale)
        return dq, _fold_kv_grad(dk, hkv), _fold_kv_grad(dv, hkv)


class CudnnSdpa:
    """torch's cuDNN attention (fp16/bf16). Used only where `cuda_select`'s self-test passed it:
    torch 2.11's bf16 backward failed our reference on odd lengths and crashed on others."""

    name = "cudnn"

    def forward(self, q, k, v, causal, scale):
        h = q.shape[1]
        k, v = _expand_kv(k, h), _expand_kv(v, h)
        res = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
        lse = res[1]
        return res[0], lse[..., 0] if lse.dim() == 4 else lse

    def backward(self, do, q, k, v, o, lse, causal, scale):
        h, hkv = q.shape[1], k.shape[1]
        ke, ve = _expand_kv(k, h), _expand_kv(v, h)
        none = q.new_empty(0)  # no bias, no cumulative lengths (dense batch)
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        cum = torch.empty(0, dtype=torch.int32, device=q.device)
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            do, q, ke, ve, o, lse.unsqueeze(-1).contiguous(), seed, seed, none, cum, cum, q.shape[2],
            k.shape[2], 0.0, causal, scale=scale)
        return dq, _fold_kv_grad(dk, hkv), _fold_kv_grad(dv, hkv)


class FlashAttn:
    """The flash-attn package (optional `gpu` extra), GQA without KV copies."""

    name = "flash-attn"

    def __init__(self):
        from flash_attn import flash_attn_interface as fai  # noqa: F401 - lazy, optional
        self._fai = fai

    @staticmethod
    def _bthd(x):
        return x.transpose(1, 2)

    def forward(self, q, k, v, causal, scale):
        out, lse, *_ = self._fai._flash_attn_forward(
            self._bthd(q).contiguous(), self._bthd(k).contiguous(), self._bthd(v).contiguous(),
            0.0, scale, causal=causal, window_size_left=-1, window_size_right=-1,
            softcap=0.0, alibi_slopes=None, return_softmax=False)
        return out.transpose(1, 2), lse

    def backward(self, do, q, k, v, o, lse, causal, scale):
        qb, kb, vb = (self._bthd(t).contiguous() for t in (q, k, v))
        dq, dk, dv = torch.empty_like(qb), torch.empty_like(kb), torch.empty_like(vb)
        self._fai._flash_attn_backward(
            self._bthd(do).contiguous(), qb, kb, vb, self._bthd(o).contiguous(), lse.contiguous(),
            dq, dk, dv, 0.0, scale, causal, -1, -1, 0.0, None, False)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
        return True
    except Exception:
        return False


class NullKernel:
    """Returns empty partials at no cost: benchmarks run a scheme's communication
    alone with it, to measure how long the transfers take when nothing hides them."""

    name = "null"

    def forward(self, q, k, v, causal, scale):
        return (torch.zeros_like(q), torch.full(q.shape[:3], float("-inf"), dtype=torch.float32,
                                                 device=q.device))

    def backward(self, do, q, k, v, o, lse, causal, scale):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


_CPU = CpuFlash()
_CUDA = CudaSdpa()
_CUDNN = CudnnSdpa()


_OVERRIDE: list[Backend] = []


@contextlib.contextmanager
def override_backend(backend: Backend):
    """Run every kernel call in this process with `backend` (benchmark instrumentation)."""
    _OVERRIDE.append(backend)
    try:
        yield backend
    finally:
        _OVERRIDE.pop()


CUDA_KERNELS = ("auto", "cudnn", "cuda-sdpa", "flash-attn")


def select_backend(device: torch.device, prefer: str = "auto", dtype: torch.dtype | None = None,
                   head_dim: int | None = None) -> Backend:
    """Pick the kernel for a device at run time.

    CUDA with `prefer="auto"`: `DISTATTN_CUDA_KERNEL` when set, else the fastest kernel that passed
    `cuda_select`'s exactness self-test for this dtype and head dim (run once per device, torch
    version, dtype and head dim, cached on disk, logged)."""
    if _OVERRIDE:
        return _OVERRIDE[-1]
    if device.type == "cpu":
        if prefer not in ("auto", "cpu-flash"):
            raise ValueError(f"kernel backend {prefer!r} is not available on CPU; use 'auto' or 'cpu-flash'")
        return _CPU
    if device.type == "cuda":
        if prefer not in CUDA_KERNELS:
            raise ValueError(f"kernel backend {prefer!r} is not available on CUDA; use one of "
                             f"{', '.join(CUDA_KERNELS)} (flash-attn: pip install distattn[gpu])")
        if prefer == "auto":
            prefer = os.environ.get("DISTATTN_CUDA_KERNEL", "auto")
            if prefer not in CUDA_KERNELS:
                raise ValueError(f"DISTATTN_CUDA_KERNEL={prefer!r}: use one of {', '.join(CUDA_KERNELS)}")
        if prefer == "auto":
            dt = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
            # the self-test's candidates are half-precision kernels; fp32 takes the memory-efficient one
            prefer = _tested_choice(str(device), dt, head_dim) if dt and head_dim else "cuda-sdpa"
        return _named(prefer)
    raise ValueError(f"no attention kernel for device {device}; distattn runs on cpu and cuda")


def _named(name: str) -> Backend:
    if name == "flash-attn":
        if not _flash_attn_available():
            raise ValueError("kernel backend 'flash-attn' needs the flash-attn package "
                             "(pip install distattn[gpu]); or use 'auto' or 'cuda-sdpa'")
        return FlashAttn()
    return _CUDNN if name == "cudnn" else _CUDA


@functools.lru_cache(maxsize=None)
def _tested_choice(device: str, dtype: str, head_dim: int) -> str:
    from distattn.kernels import cuda_select
    cands = tuple(c for c in cuda_select.CANDIDATES if c != "flash-attn" or _flash_attn_available())
    choice, verdicts = cuda_select.self_test(dtype, head_dim, device, cands)
    print(cuda_select.describe(choice, verdicts), file=sys.stderr, flush=True)
    return choice
