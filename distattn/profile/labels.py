"""Profiler labels for communication and compute regions, free when no profiler runs.

Every collective and p2p call of :mod:`distattn.comm` and every attention kernel
entry point labels its host-side region with ``torch.profiler.record_function``,
so a Chrome trace can be split into compute and communication without guessing
from operator names:

==================  ==========================================================
label               region
==================  ==========================================================
``comm/<op>``       the call that issues ``<op>`` (for a blocking op: the whole
                    call, transfer included)
``comm_wait/<op>``  the time the caller is blocked on ``<op>``: the whole call
                    of a blocking op, ``Handle.wait()`` of an asynchronous one
                    (exactly what the ledger records as exposed time)
``compute/<kind>``  kernel work: ``attn_fwd``, ``attn_bwd`` (softmax blocks),
                    ``linear_fwd``, ``linear_bwd``, ``linear_state`` (linear
                    attention)
==================  ==========================================================

Opening a ``record_function`` costs about 15 us even with no profiler attached
(it still enters the dispatcher); :func:`region` first asks the profiler whether
it is on (a 0.2 us C call) and returns a shared no-op context otherwise.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable

import torch

__all__ = ["COMM", "COMM_WAIT", "COMPUTE", "region", "profiler_active", "comm_op"]

COMM = "comm/"
COMM_WAIT = "comm_wait/"
COMPUTE = "compute/"

_NULL = contextlib.nullcontext()

try:  # the cheap check; fall back to the Python flag on builds without it
    profiler_active: Callable[[], bool] = torch._C._autograd._profiler_enabled
except AttributeError:  # pragma: no cover - very old or unusual builds
    def profiler_active() -> bool:
        return bool(getattr(torch.autograd.profiler, "_is_profiler_enabled", False))


def region(name: str):
    """A ``record_function(name)`` context while a profiler runs, a shared no-op otherwise."""
    if profiler_active():
        return torch.autograd.profiler.record_function(name)
    return _NULL


def comm_op(op: str, blocking: bool | None = None) -> Callable:
    """Decorate a :class:`distattn.comm.Comm` method: label the call ``comm/<op>``.

    A blocking call (``blocking=True``, or an ``async_op`` argument that is false)
    is also labelled ``comm_wait/<op>`` from start to end, since the caller is
    blocked for all of it. ``blocking=None`` reads the method's ``async_op``
    argument (keyword or positional, default from the signature).
    """
    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        names = list(sig.parameters)
        pos = names.index("async_op") if "async_op" in names else None
        default = sig.parameters["async_op"].default if pos is not None else None
        issue, wait = COMM + op, COMM_WAIT + op

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any):
            if not profiler_active():
                return fn(*args, **kwargs)
            if blocking is not None:
                sync = blocking
            elif "async_op" in kwargs:
                sync = not kwargs["async_op"]
            elif pos is not None and len(args) > pos:
                sync = not args[pos]
            else:
                sync = not default
            rf = torch.autograd.profiler.record_function
            if sync:
                with rf(issue), rf(wait):
                    return fn(*args, **kwargs)
            with rf(issue):
                return fn(*args, **kwargs)
        return wrapper
    return deco
