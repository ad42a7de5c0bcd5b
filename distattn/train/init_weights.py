"""`model.init_from`: start training from a Hugging Face directory or a distattn checkpoint.

The model shape comes from the checkpoint (the config loader takes it from
there, see `distattn.config.load`), so here the weights only need to be put in
place. A distattn checkpoint is read with torch.distributed.checkpoint, each rank
reading the tensors it holds; a Hugging Face directory is read from its
safetensors and re-laid out for megatron's fused projections.
"""
from __future__ import annotations

from pathlib import Path

import torch


def is_hf_directory(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from distattn.hf.weights import model_tensors
    return model_tensors(model.state_dict())


def _place(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `like`: as is, or this rank's shard of it (sharded parameters, no traffic)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    full = full.to(like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return full


def load_initial_weights(model: torch.nn.Module, path: str | Path, process_group=None,
                         tp: tuple[int, int] = (0, 1)) -> int:
    """Copy the checkpoint's weights into `model` (every tensor must be there); returns how many.

    With sharded parameters (train.shard=fsdp) a distattn checkpoint is read shard by shard, each
    rank reading only its part; a Hugging Face checkpoint's files are memory-mapped and each rank
    keeps its slice. `tp` = (this rank's tp index, tp size): under tensor parallelism each rank
    keeps its tp part of every whole weight (`distattn.model.tp_weights`).
    """
    from distattn.model.tp_weights import shard, split_of
    own = _tensors(model)
    tp_rank, tp_size = tp
    if is_hf_directory(path):
        from distattn.hf.convert import load_hf
        _, weights = load_hf(path)
        missing = sorted(set(own) - set(weights))
        if missing:
            raise ValueError(f"model.init_from={path}: the checkpoint lacks {missing[:4]}")
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(_place(shard(name, weights[name], tp_rank, tp_size), t))
        return len(own)
    import torch.distributed.checkpoint as dcp

    from distattn.hf.convert import locate_distattn
    dcp_dir, _, _ = locate_distattn(path)
    if tp_size > 1:  # checkpoints hold whole weights: read them whole, keep this rank's part
        whole = {}
        for name, t in own.items():
            how = split_of(name)
            shape = list(t.shape)
            if how is not None:
                shape[how[0]] *= tp_size
            whole[name] = torch.empty(shape, dtype=t.dtype)
        dcp.load({"model": whole}, checkpoint_id=str(dcp_dir), process_group=process_group)
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(_place(shard(name, whole[name], tp_rank, tp_size), t))
        return len(own)
    state = {"model": own}
    dcp.load(state, checkpoint_id=str(dcp_dir), process_group=process_group)
    with torch.no_grad():  # dcp loads in place where it can; copy in case a tensor was replaced
        for name, t in own.items():
            if state["model"][name] is not t:
                t.copy_(state["model"][name])
    return len(own)


__all__ = ["is_hf_directory", "load_initial_weights"]
