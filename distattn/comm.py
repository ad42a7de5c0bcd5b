"""Ledgered communication: every collective and p2p call of distattn goes through here.

Schemes never call ``torch.distributed`` directly. They build a :class:`Comm` over
an explicit process group and every call appends a :class:`CommRecord` to a
:class:`CommLedger`, so the analytic traffic a scheme declares
(``comm_bytes(shape, world)``) can be checked against what it really moved, and
the profiler can tell how long each rank sat waiting on the network.

Byte convention
---------------
``bytes_sent`` / ``bytes_recv`` are the bytes this rank puts on / takes off the
wire to and from *other* ranks under a bandwidth-optimal algorithm. Copies to
oneself are free. With ``W`` the group size and ``nbytes(x) = x.numel() *
x.element_size()``:

==================  ===============================================  ==============================================
op                  bytes_sent                                       bytes_recv
==================  ===============================================  ==============================================
send / recv         nbytes(t) (sender)                               nbytes(t) (receiver)
exchange            sum of nbytes of sends to other ranks            sum of nbytes of recvs from other ranks
all_gather          nbytes(t) * (W-1)                                nbytes(t) * (W-1)
all_gather_uneven   max(sizes) * row_bytes * (W-1)  (padded wire)    same
reduce_scatter      sum_{j != me} sizes[j] * row_bytes               (W-1) * sizes[me] * row_bytes
all_to_all          sum_{j != me} in_splits[j] * row_bytes           sum_{j != me} out_splits[j] * row_bytes
all_reduce          2*(W-1)*nbytes(t) // W  (ring)                   2*(W-1)*nbytes(t) // W
broadcast           nbytes(t) on src, 0 elsewhere                    nbytes(t) off src, 0 on src
==================  ===============================================  ==============================================

``row_bytes`` is the size of one dim-0 row. Broadcast ignores the tree/ring the
backend really uses: it counts the payload once on each end, which is what a
scheme's formula can state without knowing the backend. At ``W == 1`` every op
is a local copy or no-op with 0 bytes, but is still recorded so call counts do
not depend on the world size.

Exposed time
------------
``exposed_s`` is host time the caller was blocked. A synchronous op records the
wall time of the whole call; an asynchronous op (``async_op=True`` and every
``exchange``) records only the time spent inside :meth:`Handle.wait`, so
communication hidden behind compute costs nothing. An async op is recorded when
it is waited on (with the ledger tag active when it was issued); a handle never
waited on is never recorded. On CUDA, ``work.wait()`` only orders streams, so the
host clock would not see the transfer: set ``ledger.sync_cuda = True`` to add a
``torch.cuda.synchronize()`` before the clock stops (accurate, but serialising).

Profiler labels
---------------
While a ``torch.profiler`` runs, every call is labelled ``comm/<op>`` and the
time the caller is blocked ``comm_wait/<op>`` (the whole call of a blocking op,
``Handle.wait()`` of an async one: the same span the ledger records), so
``distattn.profile`` can split a trace into compute and communication. Without
a profiler the labels cost one C-level check per call.

Foreign collectives
-------------------
:func:`ledgered_backend` wraps the collective methods of another library's
backend object (DeepSpeed ZeRO's ``deepspeed.comm.comm.cdb``) for the length
of a block, so their traffic lands in the same ledger under a tag, counted by
the same table.

Groups
------
``group=None`` means the default WORLD group. When ``torch.distributed`` is not
initialised, or the group has one member, every op runs locally, so
single-process users and tests need no process group. Peers (``dst``, ``src``)
are always *group* ranks.
"""
from __future__ import annotations

import math
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from distattn.comm_handle import CommError, Handle
from distattn.foreign_comm import FOREIGN_OPS, ledgered_backend, tensor_bytes
from distattn.profile.labels import comm_op

__all__ = [
    "CommRecord",
    "OpSummary",
    "CommLedger",
    "default_ledger",
    "Handle",
    "Comm",
    "CommError",
    "OPS",
    "REDUCE_OPS",
    "FOREIGN_OPS",
    "TorchCollectives",
    "ledgered_backend",
]

OPS = ("send", "recv", "exchange", "all_gather", "all_gather_uneven", "reduce_scatter",
       "all_to_all", "all_reduce", "broadcast")
REDUCE_OPS = ("sum", "max", "min", "avg")

# Newer torch names the single-tensor collectives *_single and deprecates the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ----------------------------------------------------------------------------- ledger


@dataclass
class CommRecord:
    """One communication call as seen by this rank."""

    op: str
    group_size: int
    bytes_sent: int
    bytes_recv: int
    exposed_s: float
    tag: str = ""


@dataclass
class OpSummary:
    """Aggregate of records: what a report or a scheme's byte formula compares against."""

    calls: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    exposed_s: float = 0.0

    def add(self, rec: CommRecord) -> None:
        self.calls += 1
        self.bytes_sent += rec.bytes_sent
        self.bytes_recv += rec.bytes_recv
        self.exposed_s += rec.exposed_s


def _combine(dicts: Sequence[dict[str, Any]], how: Callable[[Sequence[Any]], Any]) -> dict[str, Any]:
    """Combine OpSummary dicts field by field; a missing entry counts as zero."""
    names = [f.name for f in fields(OpSummary)]
    return {n: how([d.get(n, 0) for d in dicts]) for n in names}


class CommLedger:
    """Per-process record of communication calls.

    Kept separate from :class:`Comm` so that several groups (ulysses and ring in
    USP, dp and cp in training) can report into one ledger, and a benchmark can
    reset or disable it around warm-up.
    """

    def __init__(self, enabled: bool = True, sync_cuda: bool = False) -> None:
        self.records: list[CommRecord] = []
        self.enabled = enabled
        self.sync_cuda = sync_cuda
        self._tags: list[str] = []

    @property
    def current_tag(self) -> str:
        """Innermost active tag, "" outside any :meth:`tag` block."""
        return self._tags[-1] if self._tags else ""

    def record(self, op: str, group_size: int, bytes_sent: int, bytes_recv: int,
               exposed_s: float, tag: str | None = None) -> None:
        if not self.enabled:
            return
        self.records.append(CommRecord(op, int(group_size), int(bytes_sent), int(bytes_recv),
                                       float(exposed_s), self.current_tag if tag is None else tag))

    def reset(self) -> None:
        self.records.clear()

    @contextmanager
    def tag(self, name: str) -> Iterator[CommLedger]:
        """Label records made inside the block (e.g. "fwd" / "bwd"); nested tags: innermost wins."""
        self._tags.append(name)
        try:
            yield self
        finally:
            self._tags.pop()

    def _selected(self, tag: str | None) -> Iterator[CommRecord]:
        return (r for r in self.records if tag is None or r.tag == tag)

    def summary(self, tag: str | None = None) -> dict[str, OpSummary]:
        """Per-op aggregate, optionally restricted to one tag."""
        out: dict[str, OpSummary] = {}
        for r in self._selected(tag):
            out.setdefault(r.op, OpSummary()).add(r)
        return out

    def totals(self, tag: str | None = None) -> OpSummary:
        """Aggregate over all ops, optionally restricted to one tag."""
        tot = OpSummary()
        for r in self._selected(tag):
            tot.add(r)
        return tot

    def local_report(self, tag: str | None = None) -> dict[str, Any]:
        """Plain-dict form of :meth:`totals` and :meth:`summary` (picklable, JSON-able)."""
        return {"totals": asdict(self.totals(tag)),
                "ops": {op: asdict(s) for op, s in sorted(self.summary(tag).items())}}

    def reduce(self, group: dist.ProcessGroup | None = None, tag: str | None = None) -> dict[str, Any]:
        """Gather every rank's report over ``group``; the max over ranks is the critical path.

        Collective over ``group`` (all_gather_object), not itself recorded. Returns
        ``{"per_rank": [report, ...], "max": report, "sum": report}`` where a report
        is ``{"totals": {calls, bytes_sent, bytes_recv, exposed_s}, "ops": {op: {...}}}``
        and max/sum are taken field by field.
        """
        mine = self.local_report(tag)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            per_rank: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(per_rank, mine, group=group)
        else:
            per_rank = [mine]
        ops = sorted({op for rep in per_rank for op in rep["ops"]})

        def combined(how: Callable[[Sequence[Any]], Any]) -> dict[str, Any]:
            return {"totals": _combine([rep["totals"] for rep in per_rank], how),
                    "ops": {op: _combine([rep["ops"].get(op, {}) for rep in per_rank], how)
                            for op in ops}}

        return {"per_rank": per_rank, "max": combined(max), "sum": combined(sum)}


_DEFAULT_LEDGER = CommLedger()


def default_ledger() -> CommLedger:
    """The process-wide ledger a :class:`Comm` uses when given none.

    One per process, so code that builds its own Comm objects still reports
    somewhere a profiler can find without threading a ledger through every call.
    """
    return _DEFAULT_LEDGER


# ----------------------------------------------------------------------------- comm


_nbytes = tensor_bytes


def _row_bytes(t: Tensor) -> int:
    """Bytes of one dim-0 row (defined even when there are no rows)."""
    return math.prod(t.shape[1:]) * t.element_size()


def _contig_out(t: Tensor) -> tuple[Tensor, Callable[[], None]]:
    """A contiguous buffer to receive into, and how to copy it back into ``t``."""
    if t.is_contiguous():
        return t, lambda: None
    buf = torch.empty_like(t, memory_format=torch.contiguous_format)
    return buf, lambda: t.copy_(buf)


def _check_splits(name: str, splits: Sequence[int], world: int) -> list[int]:
    splits = [int(s) for s in splits]
    if len(splits) != world:
        raise ValueError(f"{name} needs one entry per rank ({world}), got {len(splits)}")
    if any(s < 0 for s in splits):
        raise ValueError(f"{name} must be non-negative, got {splits}")
    return splits


class Comm:
    """Ledgered communication over one process group (None = default WORLD group).

    The group is explicit so a scheme can never silently talk over WORLD when it
    was configured for a CP sub-group.
    """

    def __init__(self, group: dist.ProcessGroup | None = None,
                 ledger: CommLedger | None = None) -> None:
        self.group = group
        self.ledger = default_ledger() if ledger is None else ledger
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.size = dist.get_world_size(group)
            if self.rank < 0:
                raise ValueError("this process is not a member of the given process group")
        elif group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        else:
            self.rank, self.size = 0, 1
        self._distributed = self.size > 1
        self._backend = str(dist.get_backend(group)) if self._distributed else "local"
        self._loopback: deque[Tensor] = deque()  # send-to-self, consumed by recv-from-self

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, size={self.size}, backend={self._backend})"

    # -- helpers

    def global_rank(self, group_rank: int) -> int:
        """WORLD rank of a group member (what torch.distributed p2p calls address)."""
        self._check_peer(group_rank, "group_rank")
        if not self._distributed or self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def _check_peer(self, peer: int, what: str) -> None:
        if not 0 <= peer < self.size:
            raise ValueError(f"{what}={peer} is outside the group (size {self.size})")

    def _issue(self, op: str, sent: int, recv: int, works: Sequence[Any], finish: Callable[[], Any],
               async_op: bool, start: float, cuda: bool) -> Any:
        if not self._distributed:
            sent = recv = 0
        h = Handle(self.ledger, op, self.size, sent, recv, works, finish, cuda=cuda,
                   start=None if async_op else start)
        return h if async_op else h.wait()

    def _native_nccl(self, t: Tensor) -> bool:
        return t.is_cuda and "nccl" in self._backend

    # -- point to point

    @comm_op("send", blocking=True)
    def send(self, t: Tensor, dst: int) -> None:
        """Blocking send to group rank ``dst``; sending to oneself queues for a later recv."""
        start = time.perf_counter()
        self._check_peer(dst, "dst")
        if dst == self.rank:
            self._loopback.append(t.detach().clone())
            self._issue("send", 0, 0, [], lambda: None, False, start, t.is_cuda)
            return
        dist.send(t.detach().contiguous(), dst=self.global_rank(dst), group=self.group)
        self._issue("send", _nbytes(t), 0, [], lambda: None, False, start, t.is_cuda)

    @comm_op("recv", blocking=True)
    def recv(self, t: Tensor, src: int) -> Tensor:
        """Blocking receive from group rank ``src`` into ``t``; returns ``t``."""
        start = time.perf_counter()
        self._check_peer(src, "src")
        if src == self.rank:
            if not self._loopback:
                raise RuntimeError("recv from self with no pending send to self")
            t.copy_(self._loopback.popleft())
            return self._issue("recv", 0, 0, [], lambda: t, False, start, t.is_cuda)
        buf, copy_back = _contig_out(t)
        dist.recv(buf, src=self.global_rank(src), group=self.group)
        copy_back()
        return self._issue("recv", 0, _nbytes(t), [], lambda: t, False, start, t.is_cuda)

    @comm_op("exchange", blocking=False)
    def exchange(self, sends: Sequence[tuple[Tensor, int]],
                 recvs: Sequence[tuple[Tensor, int]]) -> Handle:
        """Post all sends and recvs together; ``wait()`` returns the recv tensors in order.

        Posting both directions in one batch is what makes a ring safe: with
        blocking send/recv every rank would send first and, on backends with
        bounded buffers, wait forever. Self-addressed pairs are matched in order
        and copied locally. Note: with NCCL the first batched p2p call on a group
        must include every rank of the group.
        """
        start = time.perf_counter()
        for _, p in sends:
            self._check_peer(p, "send peer")
        for _, p in recvs:
            self._check_peer(p, "recv peer")
        self_sends = [t for t, p in sends if p == self.rank]
        self_recvs = [t for t, p in recvs if p == self.rank]
        if len(self_sends) != len(self_recvs):
            raise ValueError(f"exchange has {len(self_sends)} send(s) to self but "
                             f"{len(self_recvs)} recv(s) from self")
        for dst_t, src_t in zip(self_recvs, self_sends):
            dst_t.copy_(src_t)
        ops: list[dist.P2POp] = []
        copy_backs: list[Callable[[], None]] = []
        sent = recv = 0
        for t, p in sends:
            if p != self.rank:
                ops.append(dist.P2POp(dist.isend, t.detach().contiguous(), self.global_rank(p), self.group))
                sent += _nbytes(t)
        for t, p in recvs:
            if p != self.rank:
                buf, cb = _contig_out(t)
                ops.append(dist.P2POp(dist.irecv, buf, self.global_rank(p), self.group))
                copy_backs.append(cb)
                recv += _nbytes(t)
        works = dist.batch_isend_irecv(ops) if ops else []
        result = [t for t, _ in recvs]

        def finish() -> list[Tensor]:
            for cb in copy_backs:
                cb()
            return result

        cuda = any(t.is_cuda for t, _ in [*sends, *recvs])
        return self._issue("exchange", sent, recv, works, finish, True, start, cuda)

    # -- collectives

    @comm_op("all_gather")
    def all_gather(self, t: Tensor, async_op: bool = False) -> Tensor | Handle:
        """Gather equal-shaped tensors; result is ``[W, *t.shape]``, contiguous, rank-ordered."""
        start = time.perf_counter()
        out = torch.empty((self.size, *t.shape), dtype=t.dtype, device=t.device)
        if not self._distributed:
            out[0].copy_(t)
            return self._issue("all_gather", 0, 0, [], lambda: out, async_op, start, t.is_cuda)
        # Flat 1-D form: the one output layout every backend and torch version accepts.
        work = _all_gather_flat(out.view(-1), t.detach().contiguous().view(-1),
                                group=self.group, async_op=True)
        n = _nbytes(t) * (self.size - 1)
        return self._issue("all_gather", n, n, [work], lambda: out, async_op, start, t.is_cuda)

    @comm_op("all_gather_uneven")
    def all_gather_uneven(self, t: Tensor, sizes: Sequence[int],
                          async_op: bool = False) -> list[Tensor] | Handle:
        """Gather tensors whose dim-0 length differs per rank (``sizes`` known everywhere).

        Pads to ``max(sizes)`` so a single equal-size all-gather does the work;
        bytes count the padded wire traffic. Results are views into one buffer.
        """
        start = time.perf_counter()
        sizes = _check_splits("sizes", sizes, self.size)
        if t.dim() == 0 or t.shape[0] != sizes[self.rank]:
            raise ValueError(f"rank {self.rank}: tensor dim 0 is "
                             f"{t.shape[0] if t.dim() else 'scalar'} but sizes[{self.rank}] = "
                             f"{sizes[self.rank]}")
        m = max(sizes)
        if not self._distributed:
            res = [t.clone(memory_format=torch.contiguous_format)]
            return self._issue("all_gather_uneven", 0, 0, [], lambda: res, async_op, start, t.is_cuda)
        padded = t.new_zeros((m, *t.shape[1:]))
        padded[: t.shape[0]].copy_(t)
        out = torch.empty((self.size, *padded.shape), dtype=t.dtype, device=t.device)
        work = _all_gather_flat(out.view(-1), padded.view(-1), group=self.group, async_op=True)
        n = _nbytes(padded) * (self.size - 1)
        return self._issue("all_gather_uneven", n, n, [work],
                           lambda: [out[r, : sizes[r]] for r in range(self.size)],
                           async_op, start, t.is_cuda)

    @comm_op("reduce_scatter")
    def reduce_scatter(self, t: Tensor, sizes: Sequence[int] | None = None,
                       async_op: bool = False) -> Tensor | Handle:
        """Sum ``t`` (the full ``[sum(sizes), ...]`` tensor) over ranks; return this rank's dim-0 chunk.

        Built from all_to_all_single plus a local sum of the W received pieces,
        because gloo (in older torch) has no reduce-scatter and none supports
        uneven chunks; the wire traffic is the same as a ring reduce-scatter. On
        NCCL with equal sizes the native collective is used.
        """
        start = time.perf_counter()
        W = self.size
        if t.dim() == 0:
            raise ValueError("reduce_scatter needs a tensor with at least one dimension")
        if sizes is None:
            if t.shape[0] % W:
                raise ValueError(f"reduce_scatter: dim 0 ({t.shape[0]}) is not divisible by the "
                                 f"group size ({W}); pass explicit sizes")
            sizes = [t.shape[0] // W] * W
        sizes = _check_splits("sizes", sizes, W)
        if sum(sizes) != t.shape[0]:
            raise ValueError(f"reduce_scatter: sum(sizes) = {sum(sizes)} but dim 0 is {t.shape[0]}")
        me = self.rank
        if not self._distributed:
            out = t.clone(memory_format=torch.contiguous_format)
            return self._issue("reduce_scatter", 0, 0, [], lambda: out, async_op, start, t.is_cuda)
        row = _row_bytes(t)
        sent = sum(s for j, s in enumerate(sizes) if j != me) * row
        recv = (W - 1) * sizes[me] * row
        x = t.detach().contiguous()
        if self._native_nccl(t) and len(set(sizes)) == 1:
            out = torch.empty((sizes[me], *t.shape[1:]), dtype=t.dtype, device=t.device)
            work = _reduce_scatter_flat(out, x, group=self.group, async_op=True)
            return self._issue("reduce_scatter", sent, recv, [work], lambda: out, async_op, start, True)
        pieces = torch.empty((W, sizes[me], *t.shape[1:]), dtype=t.dtype, device=t.device)
        work = dist.all_to_all_single(pieces.view(W * sizes[me], *t.shape[1:]), x,
                                      output_split_sizes=[sizes[me]] * W, input_split_sizes=sizes,
                                      group=self.group, async_op=True)
        return self._issue("reduce_scatter", sent, recv, [work], lambda: pieces.sum(dim=0),
                           async_op, start, t.is_cuda)

    @comm_op("all_to_all")
    def all_to_all(self, t: Tensor, in_splits: Sequence[int] | None = None,
                   out_splits: Sequence[int] | None = None,
                   async_op: bool = False) -> Tensor | Handle:
        """Dim-0 all-to-all with ``all_to_all_single`` semantics; the output is allocated here.

        ``in_splits[j]`` rows of ``t`` go to rank j; ``out_splits[j]`` rows arrive
        from rank j. A missing split list means equal splits; a missing
        ``out_splits`` also means the output has as many rows as ``t``.
        """
        start = time.perf_counter()
        W, me = self.size, self.rank
        if t.dim() == 0:
            raise ValueError("all_to_all needs a tensor with at least one dimension")
        n_in = t.shape[0]

        def equal(name: str, rows: int) -> list[int]:
            if rows % W:
                raise ValueError(f"all_to_all: {name} not given and {rows} rows are not "
                                 f"divisible by the group size ({W})")
            return [rows // W] * W

        ins = equal("in_splits", n_in) if in_splits is None else _check_splits("in_splits", in_splits, W)
        outs = equal("out_splits", n_in) if out_splits is None else _check_splits("out_splits", out_splits, W)
        if sum(ins) != n_in:
            raise ValueError(f"all_to_all: sum(in_splits) = {sum(ins)} but dim 0 is {n_in}")
        out = torch.empty((sum(outs), *t.shape[1:]), dtype=t.dtype, device=t.device)
        if not self._distributed:
            if outs[0] != ins[0]:
                raise ValueError(f"all_to_all: in_splits {ins} and out_splits {outs} disagree")
            out.copy_(t)
            return self._issue("all_to_all", 0, 0, [], lambda: out, async_op, start, t.is_cuda)
        row = _row_bytes(t)
        sent = sum(s for j, s in enumerate(ins) if j != me) * row
        recv = sum(s for j, s in enumerate(outs) if j != me) * row
        work = dist.all_to_all_single(out, t.detach().contiguous(), output_split_sizes=outs,
                                      input_split_sizes=ins, group=self.group, async_op=True)
        return self._issue("all_to_all", sent, recv, [work], lambda: out, async_op, start, t.is_cuda)

    @comm_op("all_reduce")
    def all_reduce(self, t: Tensor, op: str = "sum", async_op: bool = False) -> Tensor | Handle:
        """In-place reduction over the group; "avg" is sum / W (gloo has no AVG)."""
        start = time.perf_counter()
        if op not in REDUCE_OPS:
            raise ValueError(f"all_reduce op must be one of {REDUCE_OPS}, got {op!r}")
        if op == "avg" and not (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"all_reduce avg needs a floating tensor, got {t.dtype}")
        if not self._distributed:
            return self._issue("all_reduce", 0, 0, [], lambda: t, async_op, start, t.is_cuda)
        red = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM,
               "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        buf, copy_back = _contig_out(t)
        if buf is not t:
            buf.copy_(t)
        work = dist.all_reduce(buf, op=red, group=self.group, async_op=True)

        def finish() -> Tensor:
            if op == "avg":
                buf.div_(self.size)
            copy_back()
            return t

        n = 2 * (self.size - 1) * _nbytes(t) // self.size
        return self._issue("all_reduce", n, n, [work], finish, async_op, start, t.is_cuda)

    @comm_op("broadcast", blocking=True)
    def broadcast(self, t: Tensor, src: int) -> Tensor:
        """In-place broadcast from group rank ``src``; returns ``t``."""
        start = time.perf_counter()
        self._check_peer(src, "src")
        if not self._distributed:
            return self._issue("broadcast", 0, 0, [], lambda: t, False, start, t.is_cuda)
        buf, copy_back = _contig_out(t)
        if buf is not t and self.rank == src:
            buf.copy_(t)
        dist.broadcast(buf, src=self.global_rank(src), group=self.group)
        copy_back()
        n = _nbytes(t)
        sent, recv = (n, 0) if self.rank == src else (0, n)
        return self._issue("broadcast", sent, recv, [], lambda: t, False, start, t.is_cuda)

    def barrier(self) -> None:
        """Synchronise the group; not recorded (it moves no data)."""
        if self._distributed:
            dist.barrier(group=self.group)


class TorchCollectives:
    """torch.distributed's flat all-gather and reduce-scatter under the names `ledgered_backend` counts.

    For a library that takes its collectives as an object (FSDP2's custom comms,
    `distattn.train.fsdp`): wrapped with `ledgered_backend` for a step, every call
    lands in the ledger; outside such a block the calls go through uncounted.
    """

    def all_gather_into_tensor(self, output_tensor, input_tensor, group=None, async_op=False):
        return _all_gather_flat(output_tensor, input_tensor, group=group, async_op=async_op)

    def reduce_scatter_tensor(self, output_tensor, input_tensor, op=dist.ReduceOp.SUM, group=None,
                              async_op=False):
        return _reduce_scatter_flat(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
