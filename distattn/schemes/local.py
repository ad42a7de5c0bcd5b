"""Single-device attention through the same kernels: the `local` scheme and a building block.

Ulysses and USP end in ordinary attention over a gathered sequence; this is
that step, with its own backward, and the scheme used when there is no CP group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distattn.kernels.softmax import (block_backward, block_forward, check_shapes, default_scale,
                                      plan_calls)
from distattn.schemes.base import AttnShape, CommVolume, Scheme, make_comm, register


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, calls, scale):
        out, lse = block_forward(q, k, v, calls, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.calls, ctx.scale = calls, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = block_backward(dout.contiguous(), q, k, v, out, lse, ctx.calls, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def block_attention(q, k, v, q_runs, k_runs, causal: bool = True, softmax_scale=None) -> torch.Tensor:
    """Differentiable attention of q over k/v whose rows are described by runs."""
    check_shapes(q, k, v)
    calls = plan_calls(q_runs, k_runs, causal)
    return _BlockAttention.apply(q, k, v, calls, default_scale(q.shape[-1], softmax_scale))


@register("local")
@dataclass
class Local(Scheme):
    """No context parallelism: every rank holds the whole sequence."""

    layout_name: str = "contiguous"

    def validate(self, *, heads, kv_heads, world):
        super().validate(heads=heads, kv_heads=kv_heads, world=world)
        if world != 1:
            raise ValueError(f"scheme 'local' runs without context parallelism, but cp={world}; "
                             "use ring, allgather, ulysses or usp")

    def attention(self, q, k, v, *, group=None, cu_seqlens=None, causal=True, softmax_scale=None,
                  ledger=None, n_tokens=None):
        comm = make_comm(group, ledger)
        self.validate(heads=q.shape[1], kv_heads=k.shape[1], world=comm.size)
        lay = self.layout(q.shape[0], 1, cu_seqlens)
        return block_attention(q, k, v, lay.runs(0), lay.runs(0), causal, softmax_scale)

    def comm_bytes(self, shape: AttnShape, world: int, rank: int = 0) -> CommVolume:
        return CommVolume()
