"""The MLP over sequence tiles, each recomputed in the backward: `[T, ffn]` never exists whole.

A SwiGLU MLP holds `[T, 2 ffn]` after its first projection, 7x the hidden state
for Llama-3-8B (ffn 14336 vs hidden 4096), and autograd keeps it for the
backward. Running the MLP tile by tile under a non-reentrant checkpoint keeps
only each tile's input; the backward recomputes one tile at a time. The MLP is
position-wise, so the result is the untiled one; weight gradients are summed
over tiles (a different summation order, so equal to rounding).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def tiled_forward(forward: Callable, tile: int) -> Callable:
    """A megatron MLP forward (x [s, b, h] -> (out, bias)) that runs `tile` tokens at a time."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1 tokens, got {tile}")

    def one(x: torch.Tensor) -> torch.Tensor:
        out, bias = forward(x)
        return out if bias is None else out + bias

    def run(hidden_states: torch.Tensor, *args, **kwargs):
        # megatron passes padding_mask=None and the like; per-token inputs (MoE scales,
        # a real padding mask) would need slicing per tile, which a dense MLP never gets
        if args or any(v is not None for v in kwargs.values()):
            raise TypeError(f"the tiled MLP takes the hidden states only, got extra inputs "
                            f"{[k for k, v in kwargs.items() if v is not None] or len(args)}")
        n = hidden_states.shape[0]
        if n <= tile or not torch.is_grad_enabled():
            return one(hidden_states), None
        parts = [checkpoint(one, hidden_states[s:s + tile], use_reentrant=False)
                 for s in range(0, n, tile)]
        return torch.cat(parts, dim=0), None
    run.tile = tile
    return run


def apply_tiled_mlp(model: nn.Module, tile: int) -> int:
    """Make every transformer layer's MLP of a megatron GPTModel run in tiles of `tile` tokens.

    The MLP module stays where it is (its forward is replaced on the instance), so
    parameter names, checkpoints and conversions are the same as untiled.
    Returns how many MLPs were changed.
    """
    if tile <= 0:
        return 0
    count = 0
    for layer in model.decoder.layers:
        mlp = layer.mlp
        if getattr(mlp.forward, "tile", None) is None:
            mlp.forward = tiled_forward(mlp.forward, tile)
            count += 1
    return count


__all__ = ["apply_tiled_mlp", "tiled_forward"]
