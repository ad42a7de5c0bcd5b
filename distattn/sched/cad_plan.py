"""What a CAD plan is: its shards, the traffic they cause, and the balance it reaches.

`distattn.sched.cad.plan` builds a `Plan`; the CAD scheme and dispatcher read it.
Kept apart from the planner's search so the result's accounting (bytes per
phase, per-server work, imbalance) reads on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from distattn.sched.cost import kv_end, pairs

__all__ = ["PHASES", "Plan", "Shard", "Traffic"]

PHASES = ("fwd_dispatch", "fwd_return", "bwd_dispatch", "bwd_return")


class Shard(NamedTuple):
    """One task: queries ``[q_start, q_end)`` of document ``doc`` on ``server``; KV = prefix to ``q_end``."""

    doc: int
    q_start: int
    q_end: int
    server: int


@dataclass(frozen=True)
class Traffic:
    """Bytes each participant rank sends and receives in every phase of one attention call.

    Participant ranks: colocated, rank ``i`` is source ``i`` and server ``i``;
    dedicated, sources are ``0..R-1`` and servers ``R..R+S-1``. Copies to
    oneself are free (the ledger's convention).
    """

    sent: dict[str, tuple[int, ...]]
    recv: dict[str, tuple[int, ...]]

    def total_sent(self, rank: int, phases: Sequence[str] = PHASES) -> int:
        return sum(self.sent[p][rank] for p in phases)

    def total_recv(self, rank: int, phases: Sequence[str] = PHASES) -> int:
        return sum(self.recv[p][rank] for p in phases)

    def fwd_sent(self, rank: int) -> int:
        return self.total_sent(rank, PHASES[:2])

    def bwd_sent(self, rank: int) -> int:
        return self.total_sent(rank, PHASES[2:])


@dataclass(frozen=True)
class Plan:
    """Where every query shard runs, what it costs, and what moves.

    ``shards`` are sorted by ``(server, doc, q_start)``; the shards of a
    document (or of each planned item) tile it exactly once. ``server_flops[s]``
    are the (query, key) pairs server ``s`` computes; ``imbalance`` is
    ``max / mean`` of them (``server_cost`` / ``cost_imbalance`` add
    ``token_cost`` per query token, the quantity balanced). ``q_tokens[r][s]`` / ``kv_tokens[r][s]`` count the
    query / KV tokens source ``r`` hands to server ``s`` (KV de-duplicated per
    (source, server) pair; self-pairs included, they cost nothing).
    ``send_bytes`` / ``recv_bytes`` are the forward dispatch bytes per
    participant rank, with ``q_bytes`` / ``kv_bytes`` per token;
    :meth:`traffic` gives every phase for a concrete tensor shape.
    """

    doc_lens: tuple[int, ...]
    n_servers: int
    n_sources: int
    colocated: bool
    causal: bool
    tolerance: float
    min_shard: int
    linear_cost: float
    shards: tuple[Shard, ...]
    server_flops: tuple[int, ...]
    server_cost: tuple[float, ...]
    token_cost: float
    source_tokens: tuple[int, ...]
    packing_flops: tuple[int, ...]
    q_tokens: tuple[tuple[int, ...], ...]
    kv_tokens: tuple[tuple[int, ...], ...]
    q_bytes: int = 1
    kv_bytes: int = 1
    plan_s: float = 0.0
    segments: tuple = field(default=(), repr=False, compare=False)

    # -- balance --------------------------------------------------------------
    @property
    def total_flops(self) -> int:
        return sum(self.server_flops)

    @property
    def imbalance(self) -> float:
        """max / mean of ``server_flops`` (1.0 is perfect; 1.0 when there is no work)."""
        return _ratio(self.server_flops)

    @property
    def cost_imbalance(self) -> float:
        """max / mean of ``server_cost`` (pairs plus ``token_cost`` per query token): what is balanced."""
        return _ratio(self.server_cost)

    @property
    def packing_imbalance(self) -> float:
        """max / mean attention pairs when every source computes its own queries (no dispatch)."""
        return _ratio(self.packing_flops)

    @property
    def step_loads(self) -> tuple[float, ...]:
        """Per server: attention cost plus ``linear_cost`` times the tokens it owns (colocated)."""
        if not self.colocated:
            return tuple(float(f) for f in self.server_cost)
        return tuple(f + self.linear_cost * t for f, t in zip(self.server_cost, self.source_tokens))

    @property
    def step_imbalance(self) -> float:
        return _ratio(self.step_loads)

    # -- ranks ------------------------------------------------------------------
    @property
    def n_ranks(self) -> int:
        return self.n_servers if self.colocated else self.n_sources + self.n_servers

    def server_rank(self, server: int) -> int:
        return server if self.colocated else self.n_sources + server

    def source_rank(self, source: int) -> int:
        return source

    def shards_of(self, server: int) -> list[Shard]:
        return [s for s in self.shards if s.server == server]

    def kv_prefix(self, server: int) -> dict[int, int]:
        """Per document held by ``server``: the end of the KV prefix it receives."""
        out: dict[int, int] = {}
        for sh in self.shards:
            if sh.server == server:
                e = kv_end(sh.q_end, self.doc_lens[sh.doc], self.causal)
                out[sh.doc] = max(out.get(sh.doc, 0), e)
        return out

    # -- traffic ----------------------------------------------------------------
    def _pair_bytes(self, qrow: int, kvrow: int) -> tuple[list[int], list[int]]:
        sent, recv = [0] * self.n_ranks, [0] * self.n_ranks
        for r in range(self.n_sources):
            for s in range(self.n_servers):
                a, b = self.source_rank(r), self.server_rank(s)
                if a == b:
                    continue
                n = self.q_tokens[r][s] * qrow + self.kv_tokens[r][s] * kvrow
                sent[a] += n
                recv[b] += n
        return sent, recv

    @property
    def send_bytes(self) -> tuple[int, ...]:
        return tuple(self._pair_bytes(self.q_bytes, self.kv_bytes)[0])

    @property
    def recv_bytes(self) -> tuple[int, ...]:
        return tuple(self._pair_bytes(self.q_bytes, self.kv_bytes)[1])

    def traffic(self, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> Traffic:
        """Bytes of every phase (what the cad scheme moves, per participant rank).

        Per query token / KV token (e = dtype_bytes, q row = H*D*e, kv row = 2*Hkv*D*e):
          fwd_dispatch  source -> server  q row            + kv row per KV token
          fwd_return    server -> source  out row + 4H (fp32 lse)
          bwd_dispatch  source -> server  3 q rows (q, out, dout) + 4H (lse) + kv row per KV token
          bwd_return    server -> source  dq row (input dtype) + 2*Hkv*D*4 (fp32 dK, dV) per KV token
        """
        qrow = heads * head_dim * dtype_bytes
        kvrow = 2 * kv_heads * head_dim * dtype_bytes
        lse = 4 * heads
        dkv = 2 * kv_heads * head_dim * 4
        per = {
            "fwd_dispatch": (qrow, kvrow, True),
            "fwd_return": (qrow + lse, 0, False),
            "bwd_dispatch": (3 * qrow + lse, kvrow, True),
            "bwd_return": (qrow, dkv, False),
        }
        sent: dict[str, tuple[int, ...]] = {}
        recv: dict[str, tuple[int, ...]] = {}
        for phase, (qb, kb, forward) in per.items():
            s, r = self._pair_bytes(qb, kb)
            sent[phase], recv[phase] = (tuple(s), tuple(r)) if forward else (tuple(r), tuple(s))
        return Traffic(sent=sent, recv=recv)

    def summary(self) -> str:
        return (f"CAD plan: {len(self.doc_lens)} docs, {sum(self.doc_lens)} tokens, "
                f"{self.n_servers} servers ({'colocated' if self.colocated else 'dedicated'}), "
                f"{len(self.shards)} shards, imbalance {self.imbalance:.4f} "
                f"(packing {self.packing_imbalance:.3f}), planned in {self.plan_s * 1e3:.1f} ms")


def _ratio(values: Sequence[float]) -> float:
    if not values:
        return 1.0
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else 1.0
