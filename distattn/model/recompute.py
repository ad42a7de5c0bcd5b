"""Activation recomputation for the GPT model's transformer layers.

`model.recompute`:

- ``none``: every layer keeps all its activations.
- ``full``: each transformer layer keeps only its input; the backward pass
  re-runs the whole layer forward, core attention included, so the scheme's
  forward communication runs twice (the ledger shows the extra bytes).
- ``selective``: each layer is checkpointed *except* its core attention. The
  core attention runs once, outside the checkpoint's discard hooks, and keeps
  what its scheme saves (q, k, v, out, lse); the layer's norms, projections
  and SwiGLU MLP are recomputed. The recomputed forward takes the cached
  attention output instead of calling the scheme, and the backward of the
  attention goes through the graph built by the single forward, so no
  communication is repeated: the ledger shows the same bytes as ``none``.

Both wrap layers with non-reentrant `torch.utils.checkpoint` (megatron's own
`recompute_granularity` goes through its tensor-parallel checkpoint and CUDA
RNG tracker; our layers have no dropout, so no RNG state needs restoring).
Gradients equal those without recomputation.

With ``full`` an offloader (`distattn.model.offload.LayerInputOffload`) can
keep each layer's input, the one activation full recomputation keeps, in
host memory until the backward re-runs the layer (`model.offload_activations`).
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint

MODES = ("none", "selective", "full")


class _ReplayAttention(torch.autograd.Function):
    """The attention output, backpropagated through the graph of its one real forward."""

    @staticmethod
    def forward(ctx, query, key, value, entry: dict):
        ctx.entry = entry
        return entry["out"].detach()

    @staticmethod
    def backward(ctx, dout):
        e = ctx.entry
        leaves = e["inputs"]
        need = [x for x in leaves if x.requires_grad]
        grads = torch.autograd.grad(e["out"], need, dout, allow_unused=True)
        it = iter(grads)
        out = [next(it) if x.requires_grad else None for x in leaves]
        e.clear()  # the saved q/k/v/out/lse of the scheme are freed here
        return (*out, None)


class _LayerState:
    """Per checkpointed-layer call: is this the recompute, and the attention cache."""

    def __init__(self):
        self.calls = 0
        self.entries: list[dict] = []
        self.next = 0


_ACTIVE: list[_LayerState] = []


def _core_forward(orig, query, key, value, *args, **kwargs):
    """Core attention under selective recompute: run the scheme once, replay afterwards."""
    if not _ACTIVE:
        return orig(query, key, value, *args, **kwargs)
    state = _ACTIVE[-1]
    if state.calls == 1:  # the first forward: run the scheme outside the discard hooks
        leaves = [x.detach().requires_grad_(x.requires_grad) for x in (query, key, value)]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), torch.enable_grad():
            out = orig(*leaves, *args, **kwargs)
        entry = {"inputs": leaves, "out": out}
        state.entries.append(entry)
    else:  # recomputation: the cached output, no scheme call, no communication
        entry = state.entries[state.next]
        state.next += 1
    return _ReplayAttention.apply(query, key, value, entry)


def _checkpointed(orig_forward, selective: bool, offload, *args, **kwargs):
    if not torch.is_grad_enabled():
        return orig_forward(*args, **kwargs)
    if offload is not None and args and "hidden_states" not in kwargs:
        # the checkpoint version-checks positional inputs, and the offload bumps the input's version
        kwargs, args = {"hidden_states": args[0], **kwargs}, args[1:]
    state = _LayerState()

    def run(*a, **kw):
        state.calls += 1
        state.next = 0
        if offload is not None and state.calls > 1:  # the recompute: the input back on the device
            offload.restore(state)
        cm = _push(state) if selective else contextlib.nullcontext()
        with cm:
            return orig_forward(*a, **kw)

    out = checkpoint(run, *args, use_reentrant=False, **kwargs)
    if offload is not None:
        offload.save(state, kwargs["hidden_states"])
    return out


@contextlib.contextmanager
def _push(state: _LayerState):
    _ACTIVE.append(state)
    try:
        yield
    finally:
        _ACTIVE.pop()


def apply_recompute(model: torch.nn.Module, mode: str, offload=None) -> torch.nn.Module:
    """Wrap every transformer layer of a megatron GPTModel for `mode` (in place).

    `offload`: a `LayerInputOffload` keeping each layer's input in host memory
    between forward and backward; only with ``full``.
    """
    if mode not in MODES:
        raise ValueError(f"model.recompute={mode!r}; choose one of {', '.join(MODES)}")
    if offload is not None and mode != "full":
        raise ValueError(f"model.offload_activations=true with model.recompute={mode}: offloading moves "
                         "the layer inputs that full recomputation keeps; use model.recompute=full")
    if mode == "none":
        return model
    layers = list(model.decoder.layers)
    for layer in layers:
        layer.forward = functools.partial(_checkpointed, layer.forward, mode == "selective", offload)
        if mode == "selective":
            core = layer.self_attention.core_attention
            core.forward = functools.partial(_core_forward, core.forward)
    return model
