"""Layer inputs in host memory between forward and backward (`model.offload_activations`).

With `model.recompute=full` a transformer layer keeps one activation through
the step: its input x_i, which the backward needs to re-run the layer. Wrapping
the forward in `torch.autograd.graph.save_on_cpu` missed it: inside a layer the
checkpoint's own saved-tensor hooks take precedence over the outer ones, and
x_i is not a saved tensor at all but an argument held by the checkpoint's
recompute closure, so it stayed on the device. This module moves x_i itself:

- forward, after layer i: a side stream waits on the compute stream, copies x_i
  into pinned host memory (non_blocking) and records an event. x_i's device
  storage is released (`resize_(0)`) only when the next layer offloads or the
  backward starts, after the compute stream has waited on that event.
- backward, when the checkpoint re-runs layer i: the compute stream waits on
  x_i's copy back (storage resized to its byte size, host data copied in), then
  the side stream starts bringing x_{i-1} back so the copy overlaps layer i's
  backward; layer i-1's recompute waits on its event.

Freeing x_i bumps its version counter, and so does the copy back, which writes
x_i in place: were x_i saved by any autograd node outside the checkpoint, that
node's backward would raise (before the copy back as after it) instead of
reading a freed storage or computing with data that had been away. For the same
reason the input reaches the checkpoint by keyword (held by its recompute
closure), not positionally (a saved tensor whose version the checkpoint
checks). Nothing may read x_i in the forward once the next layer has run
(megatron's TransformerBlock hands it to layer i only).

Without CUDA the copies are synchronous, and tensors already in host memory
are left alone unless `force=True`, which offloads them into separate CPU
buffers: the same mechanism, testable without a device.
"""
from __future__ import annotations

import weakref

import torch


class _Held:
    """One offloaded layer input: the tensor (weakly), its host copy and the copy's event."""

    __slots__ = ("ref", "device", "host", "nbytes", "event", "freed", "back")

    def __init__(self, x: torch.Tensor, host: torch.Tensor, event):
        self.ref, self.device = weakref.ref(x), x.device
        self.host, self.nbytes, self.event = host, x.untyped_storage().nbytes(), event
        self.freed = self.back = False


class LayerInputOffload:
    """Keeps each checkpointed layer's input in host memory from its forward until its recompute.

    `apply_recompute(model, "full", offload=LayerInputOffload())` calls `save`
    after a layer's forward and `restore` when the checkpoint re-runs it; keys
    identify the layer call. `force`: also offload tensors already in host memory.
    """

    def __init__(self, force: bool = False):
        self.force = force
        self._held: dict[object, _Held] = {}  # forward order; the backward pops from the end
        self._pending: _Held | None = None    # copied (or copying) to host, device storage not yet freed
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def held(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(layer input, host buffer) of every layer input now offloaded or being offloaded."""
        self._prune()
        return [(h.ref(), h.host) for h in self._held.values()]

    def save(self, key, x: torch.Tensor) -> None:
        """After the forward of layer `key` with input `x`: copy x to host; free the previous input."""
        self._prune()
        self._free_pending()
        if not isinstance(x, torch.Tensor) or not (x.is_cuda or self.force) or not _owns_storage(x):
            return  # a view into a larger buffer stays: freeing it would free the rest too
        with torch.no_grad():
            if x.is_cuda:
                host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                side = self._side(x.device)
                side.wait_stream(torch.cuda.current_stream(x.device))  # x's producer has run
                with torch.cuda.stream(side):
                    host.copy_(x, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(side)
            else:
                host, event = x.clone(), None
        self._pending = self._held[key] = _Held(x, host, event)

    def restore(self, key) -> None:
        """Before layer `key` is recomputed: its input back on the device; prefetch the layer before."""
        h = self._held.pop(key, None)
        if h is None:
            return
        x = h.ref()
        if h is self._pending:  # the backward starts with the last layer, whose input never left
            self._pending = None
            _wait(h)  # the host buffer is dropped below; its copy must be done with it
        elif x is not None:
            if not h.back:
                self._bring_back(x, h)
            _wait(h)
        self._free_pending()
        prev = next(reversed(self._held.values()), None)  # layer i-1: recomputed next
        if prev is not None and prev.freed and not prev.back and prev.ref() is not None:
            self._bring_back(prev.ref(), prev)

    def _free_pending(self) -> None:
        h, self._pending = self._pending, None
        x = h.ref() if h is not None else None
        if x is None:
            return
        # Freeing returns the block to the caching allocator at once, and the compute stream may
        # reuse it for its next kernel; the side stream may still be reading x. So the compute
        # stream first waits on the copy's event: every later kernel that could reuse the block
        # runs after the copy is complete.
        _wait(h)
        x.untyped_storage().resize_(0)
        torch.autograd.graph.increment_version(x)  # a saver outside the checkpoint now raises, see above
        h.freed = True

    def _bring_back(self, x: torch.Tensor, h: _Held) -> None:
        # allocated on the compute stream, so the block belongs to it like any activation
        x.untyped_storage().resize_(h.nbytes)
        with torch.no_grad():
            if x.is_cuda:
                side = self._side(x.device)
                side.wait_stream(torch.cuda.current_stream(x.device))  # the block's previous users are done
                with torch.cuda.stream(side):
                    x.copy_(h.host, non_blocking=True)
                    h.event = torch.cuda.Event()
                    h.event.record(side)
            else:
                x.copy_(h.host)
        h.back = True

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _prune(self) -> None:
        """Forget inputs whose graph is gone (a forward never backpropagated)."""
        for k in [k for k, h in self._held.items() if h.ref() is None]:
            del self._held[k]
        if self._pending is not None and self._pending.ref() is None:
            self._pending = None


def _wait(h: _Held) -> None:
    """The compute stream waits on h's last copy (nothing to wait for without CUDA)."""
    if h.event is not None:
        torch.cuda.current_stream(h.device).wait_event(h.event)


def _owns_storage(x: torch.Tensor) -> bool:
    """x is the whole of its storage: freeing that storage frees x and nothing else."""
    return (x.is_contiguous() and x.storage_offset() == 0
            and x.untyped_storage().nbytes() == x.numel() * x.element_size())


__all__ = ["LayerInputOffload"]
