"""The result of an asynchronous ledgered call: `Handle.wait()` is where its exposed time is counted."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from distattn.profile.labels import COMM_WAIT, region

if TYPE_CHECKING:
    from distattn.comm import CommLedger

__all__ = ["CommError", "Handle"]


class CommError(RuntimeError):
    """A collective failed or timed out; the message names the op, group size and phase."""



class Handle:
    """Result of an async op. wait() blocks, returns the result, and records exposed time = time spent in wait().

    Waiting twice returns the same result and records once.
    """

    def __init__(self, ledger: CommLedger, op: str, group_size: int, bytes_sent: int,
                 bytes_recv: int, works: Sequence[Any], finish: Callable[[], Any],
                 cuda: bool = False, start: float | None = None) -> None:
        self._ledger = ledger
        self._op = op
        self._group_size = group_size
        self._bytes = (bytes_sent, bytes_recv)
        self._works = list(works)
        self._finish = finish
        self._cuda = cuda
        self._start = start  # set for sync ops: the clock started before the launch
        self._tag = ledger.current_tag  # the phase that issued the op owns it
        self._done = False
        self._result: Any = None

    def wait(self) -> Any:
        if self._done:
            return self._result
        if self._start is None:  # async: the blocked time is this call (sync ops are labelled whole)
            with region(COMM_WAIT + self._op):
                return self._wait()
        return self._wait()

    def _wait(self) -> Any:
        t0 = time.perf_counter() if self._start is None else self._start
        try:
            for w in self._works:
                w.wait()
        except RuntimeError as e:  # a dead peer or the process-group time-out: say which op
            raise CommError(f"{self._op} over a group of {self._group_size} ranks "
                            f"(phase {self._tag or 'untagged'}) failed after "
                            f"{time.perf_counter() - t0:.1f}s: {e}") from e
        result = self._finish()
        if self._cuda and self._ledger.sync_cuda:
            torch.cuda.synchronize()
        exposed = time.perf_counter() - t0
        self._ledger.record(self._op, self._group_size, *self._bytes, exposed, tag=self._tag)
        self._works = []
        self._result, self._done = result, True
        return result

    def is_completed(self) -> bool:
        """True once the transfer finished (wait() will not block on the network)."""
        return self._done or all(w.is_completed() for w in self._works)
