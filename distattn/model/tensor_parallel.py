"""Megatron-core tensor parallelism inside each context-parallel rank (parallel.tp).

Megatron's column- and row-parallel linears split q/k/v by query groups, the
output projection and the FFN by columns/rows, and the embedding and output
layer by vocabulary; each linear is handed the mesh's tp group explicitly, so
megatron's global parallel state stays untouched. Our core attention receives
the rank's local heads and runs the cp scheme over them, on the cp group of
the same tp index.

With `parallel.sequence_parallel`, the norms and residual adds run on 1/tp of
the rank's tokens (megatron all-gathers before each column-parallel linear and
reduce-scatters after each row-parallel one). Megatron refuses its torch norm
there, so `SequenceParallelRMSNorm` is ours: the same RMSNorm, with its weight
marked `sequence_parallel`; the trainer sums the norms' gradients over tp.

`counted_tp_comm` routes megatron's tensor-parallel collectives through
`ledgered_backend`, so they appear in the step's ledger under tag "tp".
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


class SequenceParallelRMSNorm(nn.Module):
    """RMSNorm (`torch.nn.functional.rms_norm`, as torch.nn.RMSNorm) for megatron's layer specs.

    Takes megatron's norm arguments. Under sequence parallelism each tp rank sees
    different tokens, so the weight's gradient is partial: the attribute
    `sequence_parallel` tells the trainer to all-reduce it over tp.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.rms_norm(x, (self.hidden_size,), self.weight, self.eps)


def megatron_groups(tp_group) -> "ProcessGroupCollection":  # noqa: F821
    """Megatron's process groups: `tp_group` for tensor parallelism, groups of one rank otherwise.

    Collective over the world (every rank makes every one-rank group). With
    `tp_group=None` megatron sees no parallelism at all.
    """
    from megatron.core.process_groups_config import ProcessGroupCollection
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed must be initialised before building the model "
                           "(a world of one gloo rank is enough)")
    mine = None
    for r in range(dist.get_world_size()):
        g = dist.new_group([r])
        if r == dist.get_rank():
            mine = g
    pgs = ProcessGroupCollection()
    for name in ("pp", "cp", "embd", "pos_embd", "dp", "dp_cp"):
        setattr(pgs, name, mine)
    for name in ("tp", "tp_cp", "mp"):
        setattr(pgs, name, tp_group if tp_group is not None else mine)
    return pgs


def sequence_parallel_embedding(embedding) -> None:
    """Megatron's embedding forward under sequence parallelism, without its dropout's RNG fork.

    Megatron runs the embedding dropout inside its CUDA RNG tracker's fork under sequence
    parallelism, which needs CUDA even at dropout 0. Our models have no dropout, position or
    token-type embeddings, so the embedding is the vocabulary-parallel lookup, which already
    reduce-scatters over the sequence, or a lookup and a scatter to this rank's tokens.
    """
    from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
    cfg = embedding.config
    if embedding.add_position_embedding or cfg.hidden_dropout or cfg.fp32_residual_connection:
        raise ValueError("sequence_parallel_embedding: only for embeddings without position embeddings, "
                         "dropout or fp32 residuals (the models distattn builds)")

    def forward(input_ids, position_ids=None, tokentype_ids=None):
        if tokentype_ids is not None:
            raise ValueError("token-type embeddings are not used by distattn's models")
        emb = embedding.word_embeddings(input_ids)
        if embedding.reduce_scatter_embeddings:
            return emb  # [s/tp, b, h]: the lookup reduce-scattered it
        emb = emb.transpose(0, 1).contiguous()
        return scatter_to_sequence_parallel_region(emb, group=embedding.tp_group)
    embedding.forward = forward


# megatron modules that call torch.distributed and torch.cuda for tensor parallelism
_MEGATRON_TP_MODULES = ("megatron.core.tensor_parallel.mappings", "megatron.core.tensor_parallel.layers",
                        "megatron.core.utils")


class _DistView:
    """torch.distributed as megatron's tp modules see it; `counted_tp_comm` wraps its collectives."""

    def __getattr__(self, name):
        return getattr(dist, name)


class _CudaView:
    """torch.cuda for megatron's tp modules: its buffers go on `current_device()`, the CPU when there is
    no CUDA (gloo runs), the real device otherwise."""

    def current_device(self):
        return torch.cuda.current_device() if torch.cuda.is_available() else torch.device("cpu")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchView(types.ModuleType):
    def __init__(self):
        super().__init__("torch")
        self.distributed = _DistView()
        self.cuda = _CudaView()

    def __getattr__(self, name):
        return getattr(torch, name)


_VIEW = _TorchView()


class _NoDropoutRngTracker:
    """Megatron's RNG tracker where there is no CUDA: its forks change nothing.

    Megatron forks a per-tp-rank CUDA generator around dropout under sequence parallelism.
    distattn's models have no dropout, so nothing random runs inside a fork.
    """

    def __init__(self):
        self.states_: dict = {}

    def is_initialized(self) -> bool:
        return True

    def reset(self) -> None:
        self.states_ = {}

    def get_states(self) -> dict:
        return dict(self.states_)

    def set_states(self, states) -> None:
        self.states_ = dict(states)

    def add(self, name, seed) -> None:
        self.states_[name] = seed

    @contextlib.contextmanager
    def fork(self, name=None):
        yield


def _rng_tracker(seed: int, tp_rank: int) -> None:
    from megatron.core.tensor_parallel import random as mrandom
    if not torch.cuda.is_available():
        if not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, _NoDropoutRngTracker):
            mrandom._CUDA_RNG_STATE_TRACKER = _NoDropoutRngTracker()
            mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
        return
    tracker = mrandom.get_cuda_rng_tracker()
    name = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME
    if name not in tracker.get_states():
        tracker.add(name, seed + 2718 + tp_rank)  # megatron's offset for its model-parallel generator


def install_megatron_tp(seed: int = 1234, tp_rank: int = 0) -> None:
    """Let megatron's tensor and sequence parallelism run on any device, with countable collectives.

    Megatron's tp modules look up `torch.distributed.*` and `torch.cuda.current_device()` when called;
    here they see `_VIEW` instead (the real functions, except that the current device is the CPU on a
    machine without CUDA), and the module-level all-gather/reduce-scatter functions they bound at import
    go through it too. Megatron's shared all-gather buffer is created if its parallel state has none,
    and its RNG tracker gets the model-parallel generator its sequence-parallel forks expect.
    Idempotent; affects megatron's tp modules only.
    """
    _rng_tracker(seed, tp_rank)
    import importlib

    from megatron.core import parallel_state
    for m in (importlib.import_module(name) for name in _MEGATRON_TP_MODULES):
        if m.__dict__.get("torch") is not _VIEW:
            m.torch = _VIEW
        if "dist_all_gather_func" in m.__dict__:
            m.dist_all_gather_func = lambda *a, **k: _VIEW.distributed.all_gather_into_tensor(*a, **k)
            m.dist_reduce_scatter_func = lambda *a, **k: _VIEW.distributed.reduce_scatter_tensor(*a, **k)
    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()


@contextlib.contextmanager
def counted_tp_comm(ledger, tag: str = "tp") -> Iterator[None]:
    """Megatron's tensor-parallel all-reduces, all-gathers and reduce-scatters go to `ledger`."""
    from distattn.foreign_comm import ledgered_backend
    install_megatron_tp()
    with ledgered_backend(_VIEW.distributed, ledger, tag=tag):
        yield


def tp_step_bytes(num_layers: int, tokens: int, hidden: int, elem: int, tp: int, sequence_parallel: bool,
                  recompute: str = "none") -> dict[str, int]:
    """Bytes one rank sends for megatron's tensor parallelism in one micro-batch's forward and backward.

    `tokens` is the cp rank's token count. Each collective moves a `[tokens, hidden]` activation:
    with sequence parallelism an all-gather or reduce-scatter sends (tp-1)/tp of it, without it an
    all-reduce sends 2 (tp-1)/tp. Per layer, the forward has two of each (before q/k/v and fc1;
    after the output projection and fc2) and the backward six (each column-parallel linear gathers
    its input again and reduce-scatters its input gradient; each row-parallel one gathers its output
    gradient); without sequence parallelism two all-reduces each way. The embedding and the loss's
    gather add one each way. Recomputation repeats the forward up to the last tensor the backward
    needs (torch's checkpoint stops there), which leaves out the layer's last reduce.
    """
    act = tokens * hidden * elem
    per_layer_fwd, per_layer_bwd, ends, again = (4, 6, 4, 3) if sequence_parallel else (2, 2, 2, 1)
    ops = num_layers * (per_layer_fwd + per_layer_bwd) + ends
    if recompute in ("full", "selective"):
        ops += num_layers * again
    if sequence_parallel:
        return {"ops": ops, "bytes": ops * (tp - 1) * act // tp}
    return {"ops": ops, "bytes": ops * 2 * (tp - 1) * act // tp}


__all__ = ["SequenceParallelRMSNorm", "counted_tp_comm", "install_megatron_tp",
           "megatron_groups", "sequence_parallel_embedding", "tp_step_bytes"]
