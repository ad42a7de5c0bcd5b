"""Another library's collectives counted in a distattn ledger (`ledgered_backend`).

DeepSpeed's ZeRO moves gradients and parameters through its own backend object,
FSDP2 through the collectives it is handed; neither goes through
:class:`distattn.comm.Comm`. Wrapping their collective methods for the length
of a block records every call in a :class:`~distattn.comm.CommLedger` with the
byte table of :mod:`distattn.comm`. This module issues no collective itself.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch.distributed as dist
from torch import Tensor

from distattn.profile.labels import COMM, COMM_WAIT, region

if TYPE_CHECKING:
    from distattn.comm import CommLedger

__all__ = ["FOREIGN_OPS", "ledgered_backend", "tensor_bytes"]


def tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


_nbytes = tensor_bytes


def _foreign_bytes(name: str, a: dict[str, Any], w: int, me: int) -> tuple[str, int, int]:
    """(ledger op, bytes sent, bytes received) of one call of a foreign backend, by the table above.

    ``reduce`` is not in the table: the non-root ranks send their tensor, the
    root receives W-1 of them (a flat reduce). Unequal splits of
    ``all_to_all_single`` are counted as equal ones.
    """
    if name in ("all_reduce", "all_reduce_coalesced"):
        n = _nbytes(a["tensor"]) if name == "all_reduce" else sum(_nbytes(t) for t in a["tensors"])
        b = 2 * (w - 1) * n // w
        return "all_reduce", b, b
    if name in ("reduce_scatter_tensor", "reduce_scatter"):
        out = a["output_tensor"] if name == "reduce_scatter_tensor" else a["output"]
        b = (w - 1) * _nbytes(out)
        return "reduce_scatter", b, b
    if name in ("all_gather_into_tensor", "all_gather_base", "all_gather", "all_gather_coalesced"):
        src = a.get("input_tensor", a.get("tensor"))
        n = _nbytes(src) if src is not None else sum(_nbytes(t) for t in a["input_tensors"])
        return "all_gather", (w - 1) * n, (w - 1) * n
    if name == "broadcast":
        n = _nbytes(a["tensor"])
        return ("broadcast", n, 0) if a["src"] == me else ("broadcast", 0, n)
    if name == "reduce":
        n = _nbytes(a["tensor"])
        return ("reduce", 0, (w - 1) * n) if a["dst"] == me else ("reduce", n, 0)
    if name == "all_to_all_single":
        return "all_to_all", (w - 1) * _nbytes(a["input"]) // w, (w - 1) * _nbytes(a["output"]) // w
    return name, 0, 0  # barrier


# the collective methods of a torch.distributed-style backend, with their parameters in order
# (wrappers such as DeepSpeed's CPU staging hide the signatures, so they are spelled out)
FOREIGN_OPS: dict[str, tuple[str, ...]] = {
    "all_reduce": ("tensor", "op", "group", "async_op"),
    "all_reduce_coalesced": ("tensors", "op", "group", "async_op"),
    "reduce_scatter_tensor": ("output_tensor", "input_tensor", "op", "group", "async_op"),
    "reduce_scatter": ("output", "input_list", "op", "group", "async_op"),
    "all_gather_into_tensor": ("output_tensor", "input_tensor", "group", "async_op"),
    "all_gather_base": ("output_tensor", "input_tensor", "group", "async_op"),
    "all_gather": ("tensor_list", "tensor", "group", "async_op"),
    "all_gather_coalesced": ("output_tensors", "input_tensors", "group", "async_op"),
    "broadcast": ("tensor", "src", "group", "async_op"),
    "reduce": ("tensor", "dst", "op", "group", "async_op"),
    "all_to_all_single": ("output", "input", "output_split_sizes", "input_split_sizes", "group",
                          "async_op"),
    "barrier": ("group", "async_op", "device_ids"),
}


@contextmanager
def ledgered_backend(backend: Any, ledger: CommLedger, tag: str) -> Iterator[None]:
    """Count the collectives of another library's communication backend in ``ledger``.

    DeepSpeed's ZeRO moves gradients and parameters through its own backend
    object (``deepspeed.comm.comm.cdb``), not through :class:`Comm`. Inside
    this block each of its collective methods (:data:`FOREIGN_OPS`) is wrapped
    so every call is recorded under ``tag`` with the bytes of the table above
    (``src``/``dst`` are global ranks there) and the time the caller was
    blocked; an async call is charged its bytes and issue time when issued.
    """
    me = dist.get_rank() if dist.is_initialized() else 0
    saved: dict[str, Any] = {}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        params = FOREIGN_OPS[name]

        def call(*args: Any, **kwargs: Any) -> Any:
            a = dict(zip(params, args))
            a.update(kwargs)
            group = a.get("group")
            w = dist.get_world_size(group) if dist.is_initialized() else 1
            op, sent, recv = _foreign_bytes(name, a, w, me)
            blocking = not a.get("async_op", False)
            start = time.perf_counter()
            try:
                with region(COMM + op), (region(COMM_WAIT + op) if blocking else nullcontext()):
                    return fn(*args, **kwargs)
            finally:
                ledger.record(op, w, sent, recv, time.perf_counter() - start, tag=tag)
        return call

    for name in FOREIGN_OPS:
        fn = getattr(backend, name, None)
        if callable(fn):
            saved[name] = backend.__dict__.get(name)
            setattr(backend, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                delattr(backend, name)
            else:
                setattr(backend, name, old)
