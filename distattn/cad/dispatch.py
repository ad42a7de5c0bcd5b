"""What each rank sends and receives under a CAD plan, and the byte-blob all-to-all that moves it.

A :class:`distattn.sched.cad.Plan` says which server computes which query shard.
:class:`RankPlan` turns it into this rank's concrete work:

- as a *source* (a rank that owns tokens): for every server, the local rows of
  the queries it hands over and the local rows of the K/V prefix that server
  needs (de-duplicated: each (source, server) pair sends a KV token once);
- as a *server*: how many query / KV rows arrive from each source, and the
  kernel calls (``plan_calls`` over runs) of all its tasks on the received
  buffers, planned once so the whole batch is one ``block_forward`` call.

Both sides enumerate rows in the same order (servers' shards sorted by
document and start; each source's owned segments in document order), so no
index travels with the data.

Messages mix dtypes (bf16 rows, fp32 lse and dK/dV), so each (sender,
receiver) message is the concatenation of its tensors' raw bytes and one
``Comm.all_to_all`` over a uint8 buffer moves every message of a phase.
The ledger therefore counts exactly the payload bytes.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from distattn.comm import Comm, Handle
from distattn.kernels.softmax import BlockCall, plan_calls
from distattn.layout import Run
from distattn.sched.cad import Plan
from distattn.sched.cost import kv_end

__all__ = ["BlobExchange", "RankPlan", "Roles", "ranges_index"]


@dataclass(frozen=True)
class Roles:
    """Group ranks playing each role: ``sources[r]`` owns tokens, ``servers[s]`` computes.

    Colocated: both lists are ``range(W)``. Dedicated: sources are the trainer
    ranks, servers the attention-server ranks of the same group.
    """

    sources: tuple[int, ...]
    servers: tuple[int, ...]

    @classmethod
    def colocated(cls, world: int) -> "Roles":
        return cls(tuple(range(world)), tuple(range(world)))

    @classmethod
    def dedicated(cls, world: int, server_ranks: Sequence[int]) -> "Roles":
        servers = tuple(int(s) for s in server_ranks)
        bad = [s for s in servers if not 0 <= s < world]
        if bad or len(set(servers)) != len(servers):
            raise ValueError(f"server_ranks {list(servers)} must be distinct ranks of the group "
                             f"(size {world})")
        sources = tuple(r for r in range(world) if r not in servers)
        if not sources or not servers:
            raise ValueError(f"a dedicated CAD group needs at least one trainer and one server rank; "
                             f"group size {world}, server_ranks {list(servers)}")
        return cls(sources, servers)


def ranges_index(starts: Sequence[int], lengths: Sequence[int]) -> Tensor:
    """Concatenation of ``arange(s, s + n)`` for every (s, n), built without a Python loop over tokens."""
    if not lengths:
        return torch.empty(0, dtype=torch.long)
    st = torch.tensor(list(starts), dtype=torch.long)
    ln = torch.tensor(list(lengths), dtype=torch.long)
    total = int(ln.sum())
    if total == 0:
        return torch.empty(0, dtype=torch.long)
    offs = torch.cumsum(ln, 0) - ln
    return torch.repeat_interleave(st - offs, ln) + torch.arange(total, dtype=torch.long)


def _server_rows(plan: Plan, shards: Sequence):
    """(q rows, kv rows) of one server's shards: per source, lists of (doc, lo, hi, local_start there)."""
    R = plan.n_sources
    q: list[list[tuple[int, int, int, int]]] = [[] for _ in range(R)]
    kv: list[list[tuple[int, int, int, int]]] = [[] for _ in range(R)]
    segs = plan.segments
    prefix: dict[int, int] = {}
    for sh in shards:
        for sa, sb, src, loc in segs[sh.doc]:
            lo, hi = max(sh.q_start, sa), min(sh.q_end, sb)
            if hi > lo:
                q[src].append((sh.doc, lo, hi, loc + lo - sa))
        e = kv_end(sh.q_end, plan.doc_lens[sh.doc], plan.causal)
        prefix[sh.doc] = max(prefix.get(sh.doc, 0), e)
    for d in sorted(prefix):
        e = prefix[d]
        for sa, sb, src, loc in segs[d]:
            hi = min(e, sb)
            if hi > sa:
                kv[src].append((d, sa, hi, loc))
    return q, kv


@dataclass
class SourceSide:
    q_index: list[Tensor]   # per server: local query rows, in send order
    kv_index: list[Tensor]  # per server: local K/V rows, in send order
    q_all: Tensor           # all of them, concatenated over servers (scatter target)
    kv_all: Tensor
    n_local: int

    @property
    def q_counts(self) -> list[int]:
        return [int(t.numel()) for t in self.q_index]

    @property
    def kv_counts(self) -> list[int]:
        return [int(t.numel()) for t in self.kv_index]


@dataclass
class ServerSide:
    q_counts: list[int]     # per source: query rows received
    kv_counts: list[int]    # per source: K/V rows received
    calls: list[BlockCall]  # all tasks, on the concatenated buffers
    pairs: int

    @property
    def n_q(self) -> int:
        return sum(self.q_counts)

    @property
    def n_kv(self) -> int:
        return sum(self.kv_counts)


class RankPlan:
    """This rank's part of a plan: its source side, its server side (either may be None)."""

    def __init__(self, plan: Plan, roles: Roles, me: int):
        if len(roles.sources) != plan.n_sources or len(roles.servers) != plan.n_servers:
            raise ValueError(f"plan has {plan.n_sources} sources / {plan.n_servers} servers but the "
                             f"roles give {len(roles.sources)} / {len(roles.servers)}")
        self.plan, self.roles, self.me = plan, roles, me
        self.source_idx = roles.sources.index(me) if me in roles.sources else None
        self.server_idx = roles.servers.index(me) if me in roles.servers else None
        by_server: list[list] = [[] for _ in range(plan.n_servers)]
        for sh in plan.shards:  # sorted by (server, doc, q_start)
            by_server[sh.server].append(sh)
        need = range(plan.n_servers) if self.source_idx is not None else [self.server_idx]
        rows = {s: _server_rows(plan, by_server[s]) for s in need if s is not None}
        self.source = self._source(rows) if self.source_idx is not None else None
        self.server = self._server(rows[self.server_idx]) if self.server_idx is not None else None

    def to(self, device) -> "RankPlan":
        """This plan with its index tensors on ``device`` (sources gather and scatter there)."""
        dev = torch.device(device)
        if self.source is None or self.source.q_all.device == dev:
            return self
        other = copy.copy(self)
        src = self.source
        other.source = SourceSide([t.to(dev) for t in src.q_index], [t.to(dev) for t in src.kv_index],
                                  src.q_all.to(dev), src.kv_all.to(dev), src.n_local)
        return other

    def _source(self, rows) -> SourceSide:
        r = self.source_idx
        qi, ki = [], []
        for s in range(self.plan.n_servers):
            q, kv = rows[s]
            qi.append(ranges_index([x[3] for x in q[r]], [x[2] - x[1] for x in q[r]]))
            ki.append(ranges_index([x[3] for x in kv[r]], [x[2] - x[1] for x in kv[r]]))
        q_all = torch.cat(qi) if qi else torch.empty(0, dtype=torch.long)
        kv_all = torch.cat(ki) if ki else torch.empty(0, dtype=torch.long)
        return SourceSide(qi, ki, q_all, kv_all, self.plan.source_tokens[r])

    def _server(self, rows) -> ServerSide:
        q, kv = rows
        cu = _cu(self.plan.doc_lens)
        q_runs: dict[int, list[Run]] = {}
        k_runs: dict[int, list[Run]] = {}
        off = 0
        for per_src in q:
            for d, lo, hi, _ in per_src:
                q_runs.setdefault(d, []).append(Run(off, cu[d] + lo, hi - lo, d, cu[d]))
                off += hi - lo
        off = 0
        for per_src in kv:
            for d, lo, hi, _ in per_src:
                k_runs.setdefault(d, []).append(Run(off, cu[d] + lo, hi - lo, d, cu[d]))
                off += hi - lo
        calls: list[BlockCall] = []
        for d in sorted(q_runs):  # per document: no cross-document run pairs to reject
            calls.extend(plan_calls(q_runs[d], k_runs.get(d, []), self.plan.causal))
        return ServerSide([sum(x[2] - x[1] for x in per) for per in q],
                          [sum(x[2] - x[1] for x in per) for per in kv],
                          calls, sum(c.pairs for c in calls))


def _cu(doc_lens: Sequence[int]) -> list[int]:
    cu = [0]
    for n in doc_lens:
        cu.append(cu[-1] + n)
    return cu


# ----------------------------------------------------------------------------- byte blobs

Spec = tuple[tuple[int, ...], torch.dtype]


def _nbytes(spec: Spec) -> int:
    shape, dtype = spec
    n = 1
    for x in shape:
        n *= x
    return n * torch.empty((), dtype=dtype).element_size()


def _as_bytes(t: Tensor) -> Tensor:
    t = t.contiguous()
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=t.device)
    return t.view(-1).view(torch.uint8)


class BlobExchange:
    """One all-to-all moving, per (sender, receiver), a message of several tensors of any dtypes.

    ``sends[j]``: tensors for group rank j, in order. ``recv_specs[j]``: the
    (shape, dtype) of each tensor coming from group rank j, in order. Posted
    asynchronously; :meth:`wait` returns ``{j: [tensors]}`` (views into one
    buffer, or copies where a tensor's bytes are not aligned to its dtype).
    A message to oneself never enters the buffer: its tensors are handed over
    as they are (colocated CAD keeps most work local, so this saves most copies).
    """

    def __init__(self, comm: Comm, sends: dict[int, list[Tensor]], recv_specs: dict[int, list[Spec]],
                 device: torch.device | str = "cpu"):
        W, me = comm.size, comm.rank
        self.me = me
        self.local = list(sends.get(me, ())) if me in recv_specs or me in sends else None
        parts: list[Tensor] = []
        in_splits = [0] * W
        for j in range(W):
            if j == me:
                continue
            for t in sends.get(j, ()):
                b = _as_bytes(t)
                parts.append(b)
                in_splits[j] += b.numel()
        buf = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=device)
        self.specs = recv_specs
        out_splits = [sum(_nbytes(s) for s in recv_specs.get(j, ())) if j != me else 0 for j in range(W)]
        self.out_splits = out_splits
        self.handle: Handle = comm.all_to_all(buf, in_splits, out_splits, async_op=True)
        self._result: dict[int, list[Tensor]] | None = None

    def wait(self) -> dict[int, list[Tensor]]:
        if self._result is not None:
            return self._result
        out = self.handle.wait()
        res: dict[int, list[Tensor]] = {}
        off = 0
        for j in range(len(self.out_splits)):
            if j == self.me:
                if self.local is not None:
                    res[j] = self.local
                continue
            got = []
            for shape, dtype in self.specs.get(j, ()):
                n = _nbytes((shape, dtype))
                raw = out[off:off + n]
                size = torch.empty((), dtype=dtype).element_size()
                if raw.numel() == 0:
                    got.append(torch.empty(shape, dtype=dtype, device=out.device))
                else:
                    if raw.storage_offset() % size:
                        raw = raw.clone()
                    got.append(raw.view(dtype).view(shape))
                off += n
            res[j] = got
        self._result = res
        return res
