"""An open zigzag ring as a benchmark peer: ring-flash-attn's on aten's CPU flash kernel.

`distattn bench attention --peers` runs ring-flash-attn's
`zigzag_ring_flash_attn_func` (PyPI `ring-flash-attn==0.1.8`, pure Python) in
the same job as our ring, on the same inputs and the same zigzag shards, so the
two rings differ only in what they do around the kernel.

ring-flash-attn calls flash-attn's `_flash_attn_forward` / `_flash_attn_backward`.
This module provides both, with flash-attn's signatures and return values, on
our kernel selection (`select_backend`: aten's CPU flash kernel on CPU, and the
null kernel during the bench's communication-only pass). They are installed in
`sys.modules` as `flash_attn.flash_attn_interface` only while the peer's module
is imported, and only in the process that imports it (a benchmark rank); the
entries are removed again afterwards. Only the zigzag module and its `utils`
are imported: the package's `__init__` pulls in every variant (and an adapter
for transformers), which the benchmark does not need.

The peer's traffic goes through `torch.distributed` directly. While a step
runs, its `utils` module sees a `torch.distributed` whose `batch_isend_irecv`
records bytes and blocked time in our ledger, so its row has the same columns
as ours.

Differences from flash-attn worth knowing when reading the numbers:
- flash-attn writes dq/dk/dv into the peer's buffers; aten returns new tensors,
  so the shim copies them in (three copies per call, a few ms at 16K);
- with fp32 inputs (which flash-attn itself does not accept) ring-flash-attn's
  fp32 accumulators `dq_buffer.to(torch.float32)` (and dk, dv) are its kernel
  output buffers themselves, which later kernel calls overwrite (dk/dv while
  the first hop may still be reading them): its gradients are wrong in fp32,
  while its forward and all of its work (kernel calls, merges, bytes) are as
  in bf16. The benchmark times it anyway; its gradients are checked against
  ours in bf16, its forward in both (tests/test_peer_ring.py).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import time
import types
from typing import Any, Iterator

import torch

PEER = "ring-flash-attn"
PEER_PIN = "ring-flash-attn==0.1.8"
_PACKAGE = "ring_flash_attn"
_MODULE = "ring_flash_attn.zigzag_ring_flash_attn"


def peer_problem(seq_len: int, world: int, causal: bool, doc_lens) -> str | None:
    """Why the peer cannot run this benchmark (None: it can)."""
    if importlib.util.find_spec(_PACKAGE) is None:
        return (f"{PEER} is not installed; `pip install {PEER_PIN}` (it is in distattn's test extra: "
                f"pip install -e '.[test]')")
    if not causal:
        return f"{PEER}'s zigzag ring is causal only (bench.causal=false)"
    if doc_lens and len(doc_lens) > 1:
        return f"{PEER}'s zigzag ring here runs one document (bench.doc_lens has {len(doc_lens)})"
    if seq_len % (2 * world):
        return (f"{PEER}'s zigzag ring needs seq_len divisible by 2*world_size = {2 * world}, "
                f"got {seq_len}")
    return None


# ----------------------------------------------------------------------------- the kernel shim


def _check_options(dropout_p, window_left, window_right, softcap, alibi_slopes) -> None:
    if dropout_p or window_left != -1 or window_right != -1 or softcap or alibi_slopes is not None:
        raise NotImplementedError("the CPU shim runs plain attention: no dropout, window, softcap or alibi")


def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left=-1,
                        window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False):
    """flash-attn's forward on [B, S, H, D]: (out, lse [B, H, S] fp32, None, None)."""
    from distattn.kernels.backends import select_backend

    _check_options(dropout_p, window_size_left, window_size_right, softcap, alibi_slopes)
    be = select_backend(q.device, dtype=q.dtype, head_dim=q.shape[-1])
    out, lse = be.forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, softmax_scale)
    return out.transpose(1, 2), lse, None, None


def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                         window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                         deterministic=False, rng_state=None):
    """flash-attn's backward on [B, S, H, D]: writes dq, dk, dv in place."""
    from distattn.kernels.backends import select_backend

    _check_options(dropout_p, window_size_left, window_size_right, softcap, alibi_slopes)
    be = select_backend(q.device, dtype=q.dtype, head_dim=q.shape[-1])
    gq, gk, gv = be.backward(dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                             out.transpose(1, 2), softmax_lse, causal, softmax_scale)
    dq.copy_(gq.transpose(1, 2))
    dk.copy_(gk.transpose(1, 2))
    dv.copy_(gv.transpose(1, 2))
    return None


def _shim_modules() -> dict[str, types.ModuleType]:
    interface = types.ModuleType("flash_attn.flash_attn_interface")
    interface.__doc__ = "distattn's CPU stand-in for flash-attn's kernel entry points (benchmark peer only)"
    interface._flash_attn_forward = _flash_attn_forward
    interface._flash_attn_backward = _flash_attn_backward
    package = types.ModuleType("flash_attn")
    package.__path__ = []  # a package, so the submodule import resolves to the entry below
    package.flash_attn_interface = interface
    return {"flash_attn": package, "flash_attn.flash_attn_interface": interface}


@contextlib.contextmanager
def _modules_only_here(extra: dict[str, types.ModuleType]) -> Iterator[None]:
    """`extra` in sys.modules for the block; every flash_attn / ring_flash_attn entry the
    block adds is removed again, and the ones that were there before are put back."""
    prefixes = ("flash_attn", _PACKAGE)
    before = {name: mod for name, mod in sys.modules.items() if name.split(".")[0] in prefixes}
    sys.modules.update(extra)
    try:
        yield
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] in prefixes]:
            del sys.modules[name]
        sys.modules.update(before)


_LOADED: dict[str, Any] = {}


def load_zigzag() -> types.ModuleType:
    """ring-flash-attn's zigzag module, bound to the shim (imported once per process)."""
    mod = _LOADED.get(_MODULE)
    if mod is not None:
        return mod
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{PEER} is not installed; pip install {PEER_PIN}")
    # the package without its __init__: only the modules the zigzag ring imports get loaded
    package = types.ModuleType(_PACKAGE)
    package.__path__ = list(spec.submodule_search_locations)
    with _modules_only_here({**_shim_modules(), _PACKAGE: package}):
        mod = importlib.import_module(_MODULE)
        _LOADED["utils"] = sys.modules[f"{_PACKAGE}.utils"]  # where its RingComm finds `dist`
    _LOADED[_MODULE] = mod
    return mod


# ----------------------------------------------------------------------------- counting its traffic


class _TimedWork:
    def __init__(self, work, ledger, world: int):
        self._work, self._ledger, self._world = work, ledger, world

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._ledger.record("exchange", self._world, 0, 0, time.perf_counter() - t0)

    def __getattr__(self, name):
        return getattr(self._work, name)


class _LedgeredDist(types.ModuleType):
    """torch.distributed, with batch_isend_irecv counted in a ledger (bytes at issue, blocked time
    in each wait)."""

    def __init__(self, ledger):
        super().__init__("torch.distributed")
        self._ledger = ledger

    def __getattr__(self, name):
        return getattr(torch.distributed, name)

    def batch_isend_irecv(self, ops):
        dist = torch.distributed
        t0 = time.perf_counter()
        works = dist.batch_isend_irecv(ops)
        world = dist.get_world_size(ops[0].group) if ops else 1
        size = [op.tensor.numel() * op.tensor.element_size() for op in ops]
        sent = sum(n for n, op in zip(size, ops) if op.op is dist.isend)
        recv = sum(n for n, op in zip(size, ops) if op.op is dist.irecv)
        self._ledger.record("exchange", world, sent, recv, time.perf_counter() - t0)
        return [_TimedWork(w, self._ledger, world) for w in works]


@contextlib.contextmanager
def counted(ledger) -> Iterator[None]:
    """Count the peer's point-to-point traffic in `ledger` for the block."""
    load_zigzag()
    utils = _LOADED["utils"]
    saved = utils.dist
    utils.dist = _LedgeredDist(ledger)
    try:
        yield
    finally:
        utils.dist = saved


# ----------------------------------------------------------------------------- running it


def zigzag_attention(q, k, v, group, softmax_scale: float | None = None) -> torch.Tensor:
    """The peer's causal zigzag ring on THD shards [T, H, D] of our zigzag layout (which is its
    layout: rank r holds chunks r and 2W-1-r of 2W equal chunks); returns [T, H, D]."""
    mod = load_zigzag()
    out = mod.zigzag_ring_flash_attn_func(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                          softmax_scale=softmax_scale, causal=True, group=group)
    return out[0]
