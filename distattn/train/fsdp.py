"""`train.shard=fsdp`: parameters, gradients and optimizer state sharded over the trainer ranks (FSDP2).

Every transformer layer and the model root are wrapped with
`torch.distributed.fsdp.fully_shard` on a one-dimensional DeviceMesh made from
the mesh's trainer group (dp x cp ranks), so each rank keeps 1/(dp cp) of
every parameter, its gradient and its AdamW state; a layer's parameters are
all-gathered just before it runs (again for its backward) and its gradients
reduce-scattered right after. The loss of a step is already each rank's share
of the global mean, so the reduce-scatter sums (divide factor 1) and one step
equals a single rank's.

FSDP's collectives go through `LedgeredAllGather` / `LedgeredReduceScatter`,
which call `distattn.comm.TorchCollectives` wrapped by `comm.ledgered_backend`,
so they appear in the step's ledger under tag "fsdp" with comm.py's byte table.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from distattn.comm import CommLedger, TorchCollectives, ledgered_backend


class LedgeredAllGather(AllGather):
    def __init__(self, ops: TorchCollectives):
        self.ops = ops

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        return self.ops.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)


class LedgeredReduceScatter(ReduceScatter):
    def __init__(self, ops: TorchCollectives):
        self.ops = ops

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        return self.ops.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group,
                                              async_op=async_op)


def shard_model(model: torch.nn.Module, group, ops: TorchCollectives) -> list[FSDPModule]:
    """fully_shard every decoder layer, then the root (embedding, final norm, output layer)."""
    from torch.distributed.device_mesh import DeviceMesh
    device = "cuda" if torch.cuda.is_available() and dist.get_backend(group) == "nccl" else "cpu"
    mesh = DeviceMesh.from_group(group, device)
    units: list[FSDPModule] = []
    for layer in model.decoder.layers:
        fully_shard(layer, mesh=mesh)
        units.append(layer)
    fully_shard(model, mesh=mesh)
    units.append(model)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # the loss is each rank's share of the global mean: sum
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
        unit.set_custom_all_gather(LedgeredAllGather(ops))
        unit.set_custom_reduce_scatter(LedgeredReduceScatter(ops))
    return units


@contextlib.contextmanager
def counted(ops: TorchCollectives, ledger: CommLedger) -> Iterator[None]:
    """FSDP's all-gathers and reduce-scatters inside this block go to `ledger` under tag "fsdp"."""
    with ledgered_backend(ops, ledger, tag="fsdp"):
        yield


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's whole value (a collective over its mesh); plain tensors as they are."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


__all__ = ["LedgeredAllGather", "LedgeredReduceScatter", "counted", "full_tensor", "shard_model"]
