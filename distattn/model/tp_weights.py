"""Where each weight of the GPT model is split under tensor parallelism, and how to split or join it.

Megatron's layout (the same as its CPU initialisation, so a whole weight split here
equals what a tp-parallel model built with the same seed holds):

| weight | split |
|---|---|
| `embedding.word_embeddings.weight`, `output_layer.weight` | rows (vocabulary) |
| `self_attention.linear_qkv.weight` / `.bias` | rows: whole query groups, each with its q, k and v |
| `self_attention.linear_proj.weight`, `mlp.linear_fc2.weight` | columns |
| `mlp.linear_fc1.weight` | rows, stride 2: this rank's part of the gate, then of the up projection |
| norms | not split (every tp rank holds the whole weight) |

Used to load whole checkpoints (Hugging Face or tp=1) into a tp model and to
compare a tp model with a single-rank one.
"""
from __future__ import annotations

import torch

# name suffix -> (dimension split, stride)
_SPLITS: tuple[tuple[str, tuple[int, int]], ...] = (
    ("embedding.word_embeddings.weight", (0, 1)),
    ("output_layer.weight", (0, 1)),
    ("self_attention.linear_qkv.weight", (0, 1)),
    ("self_attention.linear_qkv.bias", (0, 1)),
    ("self_attention.linear_proj.weight", (1, 1)),
    ("mlp.linear_fc1.weight", (0, 2)),
    ("mlp.linear_fc2.weight", (1, 1)),
)


def split_of(name: str) -> tuple[int, int] | None:
    """(dim, stride) of a tp-split weight, None for one every tp rank holds whole."""
    for suffix, how in _SPLITS:
        if name.endswith(suffix):
            return how
    return None


def shard(name: str, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """tp rank `rank`'s part of the whole weight `full` (a view where possible)."""
    how = split_of(name)
    if how is None or tp == 1:
        return full
    dim, stride = how
    if full.shape[dim] % (tp * stride):
        raise ValueError(f"{name}: dimension {dim} of {tuple(full.shape)} does not split into "
                         f"tp={tp} x stride {stride} equal parts")
    chunks = full.chunk(tp * stride, dim=dim)
    mine = chunks[rank::tp]
    return mine[0] if stride == 1 else torch.cat(mine, dim=dim)


def join(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The whole weight from every tp rank's part (in tp rank order); the inverse of `shard`."""
    how = split_of(name)
    if how is None or len(parts) == 1:
        return parts[0]
    dim, stride = how
    pieces = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(len(parts))], dim=dim)


def gather_full(name: str, local: torch.Tensor, tp_comm) -> torch.Tensor:
    """The whole weight, all-gathered over the tp group's `Comm` (every rank gets it; a collective)."""
    if tp_comm is None or split_of(name) is None:
        return local
    return join(name, list(tp_comm.all_gather(local)))


__all__ = ["gather_full", "join", "shard", "split_of"]
