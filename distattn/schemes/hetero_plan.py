"""The plan of the `hetero` scheme: which K/V rows every rank fetches, and how it computes them.

Built once per shape and cached (`get_plan`). Every rank derives every other
rank's needs from the deterministic layout, so no metadata is exchanged:
- every rank's runs are cut into *pieces* at document-relative block boundaries;
- a key piece is *needed* by rank r for class c when some query piece of r sees
  it under c (off-diagonal blocks by the pattern rule; a piece of the query's own
  block when it holds a key at or before one of r's queries there);
- KV heads whose query heads span the same set of classes form a *group*; a
  group's KV heads are fetched at the union of its classes' needed pieces;
- per class, the needed pieces of the own and of the fetched part are laid out in
  a *virtual key buffer* ([strided blocks ascending | other blocks ascending] per
  document), and the blockwise kernel calls of the rank's queries against it are
  planned (`_calls`);
- *units* batch the query heads of one class whose KV heads lie in one group.

Pure CPU bookkeeping (ints and index tensors); the compute lives in `hetero.py`
(blockwise kernels) and `hetero_fused.py` (one masked kernel call per unit).
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch

from distattn.kernels.softmax import BlockCall, _coalesce, plan_calls
from distattn.kernels.sparse import HeteroPattern
from distattn.layout import Run, get_layout

@dataclass(frozen=True)
class Piece:
    """A run of one rank cut at a document-relative block boundary."""

    owner: int
    local_start: int  # row in the owner's buffer
    start: int        # global token index
    length: int
    doc: int
    doc_start: int
    block: int        # block index inside the document


def cut_pieces(runs: Sequence[Run], block: int, owner: int) -> list[Piece]:
    out = []
    for r in runs:
        i = r.start
        while i < r.end:
            b = (i - r.doc_start) // block
            stop = min(r.end, r.doc_start + (b + 1) * block)
            out.append(Piece(owner, r.local_start + i - r.start, i, stop - i, r.doc, r.doc_start, b))
            i = stop
    return out


def _ranges_tensor(ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Concatenated aranges of (start, length) row ranges."""
    parts = [torch.arange(a, a + n, dtype=torch.long) for a, n in ranges if n]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def _as_slice(idx: Sequence[int]) -> slice | None:
    if idx and list(idx) == list(range(idx[0], idx[0] + len(idx))):
        return slice(idx[0], idx[0] + len(idx))
    return None


class _QueryIndex:
    """Which blocks a rank's queries occupy, per document (for need tests)."""

    def __init__(self, q_pieces: Sequence[Piece]):
        blocks: dict[int, set[int]] = {}
        self.last: dict[tuple[int, int], int] = {}  # (doc, block) -> largest query index there
        for p in q_pieces:
            blocks.setdefault(p.doc, set()).add(p.block)
            key = (p.doc, p.block)
            self.last[key] = max(self.last.get(key, -1), p.start + p.length - 1)
        self.blocks = {d: sorted(b) for d, b in blocks.items()}

    def any_in(self, doc: int, lo: int, hi: int) -> bool:
        """Some query block b with lo <= b <= hi."""
        bs = self.blocks.get(doc)
        if not bs or hi < lo:
            return False
        i = bisect.bisect_left(bs, lo)
        return i < len(bs) and bs[i] <= hi


def _needed(pat: HeteroPattern, cls: int | None, qi: _QueryIndex, k: Piece, causal: bool) -> bool:
    """Does some query of the rank see key piece `k` under class `cls`?"""
    d, b = k.doc, k.block
    if d not in qi.blocks:
        return False
    if causal:
        last = qi.last.get((d, b))
        if last is not None and k.start <= last:
            return True  # the diagonal block: the piece starts at or before one of my queries
        if pat.strided(cls, b):
            return qi.blocks[d][-1] > b
        return qi.any_in(d, b + 1, b + pat.local_blocks - 1)
    if (d, b) in qi.last or pat.strided(cls, b):
        return True
    return qi.any_in(d, b - pat.local_blocks + 1, b + pat.local_blocks - 1)


@dataclass
class _Virtual:
    """A class's needed key pieces in one part (own or fetched), laid out for few kernel calls."""

    pieces: list[Piece]
    offsets: list[int]                        # buffer offset of every piece
    # per document: (first, blocks) of its strided list and of its other list
    strided: dict[int, tuple[int, list[int]]] = field(default_factory=dict)
    other: dict[int, tuple[int, list[int]]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.offsets[-1] if self.offsets else 0


def _virtual(pat: HeteroPattern, cls: int | None, pieces: Sequence[Piece]) -> _Virtual:
    by_doc: dict[int, list[Piece]] = {}
    for p in sorted(pieces, key=lambda p: p.start):
        by_doc.setdefault(p.doc, []).append(p)
    v = _Virtual([], [0])
    for d in sorted(by_doc):
        s = [p for p in by_doc[d] if pat.strided(cls, p.block)]
        o = [p for p in by_doc[d] if not pat.strided(cls, p.block)]
        for lst, table in ((s, v.strided), (o, v.other)):
            table[d] = (len(v.pieces), [p.block for p in lst])
            for p in lst:
                v.pieces.append(p)
                v.offsets.append(v.offsets[-1] + p.length)
    return v


def _calls(pat: HeteroPattern, v: _Virtual, q_pieces: Sequence[Piece], causal: bool) -> list[BlockCall]:
    """Kernel calls of my query pieces against virtual buffer `v` (local q rows x buffer rows)."""
    calls: list[BlockCall] = []
    L = pat.local_blocks
    off = v.offsets

    def rect(qp: Piece, table, d, lo_blk, hi_blk):
        """Rectangle over the pieces of `table[d]` with lo_blk <= block <= hi_blk."""
        if d not in table or hi_blk < lo_blk:
            return
        first, blocks = table[d]
        a = bisect.bisect_left(blocks, lo_blk)
        b = bisect.bisect_right(blocks, hi_blk)
        if b > a:
            calls.append(BlockCall(qp.local_start, qp.local_start + qp.length,
                                   off[first + a], off[first + b], False))

    def diag_runs(table, d, blk) -> list[Run]:
        if d not in table:
            return []
        first, blocks = table[d]
        a, b = bisect.bisect_left(blocks, blk), bisect.bisect_right(blocks, blk)
        return [Run(off[i], p.start, p.length, p.doc, p.doc_start)
                for i, p in ((first + j, v.pieces[first + j]) for j in range(a, b))]

    big = 1 << 62
    for qp in q_pieces:
        d, bq = qp.doc, qp.block
        rect(qp, v.strided, d, 0, bq - 1)
        rect(qp, v.other, d, bq - L + 1, bq - 1)
        if not causal:
            rect(qp, v.strided, d, bq + 1, big)
            rect(qp, v.other, d, bq + 1, bq + L - 1)
        diag = diag_runs(v.strided, d, bq) + diag_runs(v.other, d, bq)
        if diag:
            calls.extend(plan_calls([Run(qp.local_start, qp.start, qp.length, qp.doc, qp.doc_start)],
                                    diag, causal))
    return _coalesce(calls)


@dataclass
class _Unit:
    """One kernel batch: query heads of one class whose KV heads lie in one group."""

    cls: int | None
    group: int
    kv_heads: list[int]   # global KV heads
    q_heads: list[int]    # global query heads; q_heads[i] uses kv_heads[i // (len(q)/len(kv))]
    hpos: list[int]       # positions of kv_heads inside the group's head list


class HeteroPlan:
    """Everything rank `rank` needs to run the scheme for one shape (CPU ints and index tensors)."""

    def __init__(self, pat: HeteroPattern, heads: int, kv_heads: int, causal: bool,
                 peer_runs: Sequence[list[Run]], rank: int):
        self.rank, self.world = rank, len(peer_runs)
        self.pattern, self.causal = pat, causal
        self.heads, self.kv_heads = heads, kv_heads
        W = self.world
        self.sizes = [sum(r.length for r in runs) for runs in peer_runs]
        pieces = [cut_pieces(runs, pat.block, j) for j, runs in enumerate(peer_runs)]
        all_pieces = [p for ps in pieces for p in ps]

        q_cls = pat.head_classes(heads, kv_heads)
        order = sorted({c for c in q_cls if c is not None})
        self.classes: list[int | None] = order + ([None] if None in q_cls else [])
        rep = heads // kv_heads
        # KV groups: KV heads whose query heads span the same classes
        sig = [frozenset(q_cls[g * rep:(g + 1) * rep]) for g in range(kv_heads)]
        self.groups: list[list[int]] = []
        self.group_classes: list[frozenset] = []
        for g in range(kv_heads):
            if sig[g] in self.group_classes:
                self.groups[self.group_classes.index(sig[g])].append(g)
            else:
                self.group_classes.append(sig[g])
                self.groups.append([g])

        # needs of every rank (I send what my peers need)
        def needs_of(j: int) -> dict:
            qi = _QueryIndex(pieces[j])
            return {c: [p for p in all_pieces if _needed(pat, c, qi, p, causal)] for c in self.classes}

        mine = needs_of(rank)

        def group_rows(need: dict, gi: int, owner: int) -> list[Piece]:
            got = {p for c in self.group_classes[gi] for p in need[c] if p.owner == owner}
            return sorted(got, key=lambda p: p.local_start)

        # sends: rows of my buffer each peer needs, per group
        self.send_rows: dict[tuple[int, int], torch.Tensor] = {}
        self.send_count: dict[tuple[int, int], int] = {}
        for j in range(W):
            if j == rank:
                continue
            need_j = needs_of(j)
            for gi in range(len(self.groups)):
                rows = group_rows(need_j, gi, rank)
                self.send_count[(j, gi)] = sum(p.length for p in rows)
                self.send_rows[(j, gi)] = _ranges_tensor([(p.local_start, p.length) for p in rows])
        # receives: group gi's fetched rows, peer by peer in rank order
        self.recv_off: dict[tuple[int, int], tuple[int, int]] = {}  # (j, gi) -> (offset, rows)
        self.src_rows: list[int] = []
        row_of: list[dict[Piece, int]] = []
        for gi in range(len(self.groups)):
            at, where = 0, {}
            for j in range(W):
                if j == rank:
                    continue
                rows = group_rows(mine, gi, j)
                n = sum(p.length for p in rows)
                self.recv_off[(j, gi)] = (at, n)
                for p in rows:
                    where[p] = at
                    at += p.length
            self.src_rows.append(at)
            row_of.append(where)

        # per class: own and fetched virtual buffers, their calls and row indices
        qp = pieces[rank]
        self.q_pieces: list[Piece] = qp
        # per class: the pieces of its own and of its fetched virtual buffer, in buffer order
        self.key_pieces: dict[int | None, tuple[list[Piece], list[Piece]]] = {}
        self.calls_own: dict = {}
        self.calls_rem: dict = {}
        self.idx_own: dict = {}
        self.idx_rem: dict = {}
        self.pairs_by_class: dict = {}
        for c in self.classes:
            own = _virtual(pat, c, [p for p in mine[c] if p.owner == rank])
            rem = _virtual(pat, c, [p for p in mine[c] if p.owner != rank])
            self.key_pieces[c] = (own.pieces, rem.pieces)
            self.calls_own[c] = _calls(pat, own, qp, causal)
            self.calls_rem[c] = _calls(pat, rem, qp, causal)
            self.idx_own[c] = _ranges_tensor([(p.local_start, p.length) for p in own.pieces])
            for gi, cs in enumerate(self.group_classes):
                if c in cs:
                    self.idx_rem[(c, gi)] = _ranges_tensor([(row_of[gi][p], p.length) for p in rem.pieces])
            self.pairs_by_class[c] = sum(x.pairs for x in self.calls_own[c] + self.calls_rem[c])

        # kernel units: per class and group, query heads sharing a repetition factor
        self.units: list[_Unit] = []
        for c in self.classes:
            for gi, ks in enumerate(self.groups):
                per_kv = {g: [h for h in range(g * rep, (g + 1) * rep) if q_cls[h] == c] for g in ks}
                by_m: dict[int, list[int]] = {}
                for g in ks:
                    if per_kv[g]:
                        by_m.setdefault(len(per_kv[g]), []).append(g)
                for m, gs in sorted(by_m.items()):
                    self.units.append(_Unit(c, gi, gs, [h for g in gs for h in per_kv[g]],
                                            [ks.index(g) for g in gs]))
        self.q_heads_of = {c: sum(1 for h in q_cls if h == c) for c in self.classes}
        self._dev: dict = {}
        self.derived: dict = {}  # what other compute paths build from the plan (per device), cached with it

    # -- accounting ---------------------------------------------------------------
    @property
    def pairs(self) -> int:
        """(head, query, key) pairs this rank computes: the realised FLOPs / (4 * head_dim)."""
        return sum(self.pairs_by_class[c] * self.q_heads_of[c] for c in self.classes)

    def sent_rows(self) -> int:
        """K/V token rows x KV heads this rank sends (each way once)."""
        return sum(n * len(self.groups[gi]) for (j, gi), n in self.send_count.items())

    def fetched_rows(self) -> int:
        """K/V token rows x KV heads this rank receives."""
        return sum(n * len(self.groups[gi]) for (j, gi), (_, n) in self.recv_off.items())

    def index(self, device) -> dict:
        """Index tensors on `device` (moved once per device)."""
        key = str(device)
        if key not in self._dev:
            mv = lambda d: {k: t.to(device) for k, t in d.items()}  # noqa: E731
            self._dev[key] = {"own": mv(self.idx_own), "rem": mv(self.idx_rem),
                              "send": mv(self.send_rows),
                              "heads": {gi: torch.tensor(g, dtype=torch.long, device=device)
                                        for gi, g in enumerate(self.groups)}}
        return self._dev[key]


@functools.lru_cache(maxsize=8)  # plans hold O(N) index tensors; batches with new documents replan
def get_plan(pat: HeteroPattern, heads: int, kv_heads: int, causal: bool, layout_name: str,
             n_tokens: int, world: int, cu_seqlens: tuple | None, weights: tuple | None,
             rank: int) -> HeteroPlan:
    lay = get_layout(layout_name, n_tokens, world, list(cu_seqlens) if cu_seqlens else None,
                     weights=weights)
    return HeteroPlan(pat, heads, kv_heads, causal, [lay.runs(r) for r in range(world)], rank)


__all__ = ["HeteroPlan", "Piece", "cut_pieces", "get_plan"]
