"""Partitioners: which global tokens of a packed sequence each context-parallel rank holds.

A layout is a pure function of ``(n_tokens, world, cu_seqlens, weights)``. Every
rank builds the same object and can therefore read every other rank's shard
without communicating, which the schemes rely on to know what they receive.
Per-rank sizes may differ (no padding); every layout keeps a rank's tokens in
increasing global order, so a rank's buffer is a concatenation of ascending
contiguous ranges.

Layouts:

- ``contiguous``: rank r holds piece r of ``split_sizes(N, W)``.
- ``zigzag``: ``N`` cut into ``2W`` pieces; rank r holds pieces r and 2W-1-r, so
  a cheap early piece pairs with an expensive late one under a causal mask.
- ``doc_zigzag``: the same head/tail pairing applied to every document, which
  balances causal cost when the sequence is a pack of documents.
- ``weighted``: uneven devices; each rank's share of causal attention cost is
  proportional to its weight (see :class:`Weighted`).
"""
from __future__ import annotations

import bisect
import math
import operator
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "LAYOUTS",
    "Contiguous",
    "DocZigzag",
    "Layout",
    "Run",
    "Weighted",
    "Zigzag",
    "as_cu_seqlens",
    "causal_cost",
    "doc_of",
    "get_layout",
    "split_sizes",
]

Range = tuple[int, int]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def _as_int(value: object, what: str) -> int:
    """Accept Python/NumPy/0-d tensor integers, refuse bools and floats (silent truncation hides bugs)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise ValueError(f"{what} must be an integer, got {value!r}")
        return int(value.item())
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def split_sizes(n: int, parts: int) -> list[int]:
    """Piece sizes of ``torch.tensor_split(x, parts)`` for ``len(x) == n``.

    Used everywhere a range is cut so that all layouts round the same way.
    """
    n = _as_int(n, "n")
    parts = _as_int(parts, "parts")
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base, extra = divmod(n, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


def _offsets(sizes: Sequence[int], start: int = 0) -> list[int]:
    out = [start]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def as_cu_seqlens(cu_seqlens: object, n_tokens: int) -> list[int]:
    """Normalise document boundaries to a validated ``[0, ..., n_tokens]`` list.

    ``None`` means one document. Validation happens once here so that every
    layout and scheme can index with the result without re-checking.
    """
    n_tokens = _as_int(n_tokens, "n_tokens")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    if cu_seqlens is None:
        return [0, n_tokens]
    if isinstance(cu_seqlens, Tensor):
        if cu_seqlens.dim() != 1:
            raise ValueError(f"cu_seqlens must be 1-D, got shape {tuple(cu_seqlens.shape)}")
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex \
                or cu_seqlens.dtype == torch.bool:
            raise ValueError(f"cu_seqlens must hold integers, got dtype {cu_seqlens.dtype}")
        values = [int(v) for v in cu_seqlens.tolist()]
    elif isinstance(cu_seqlens, (str, bytes)):
        raise ValueError(f"cu_seqlens must be a sequence of integers, got {cu_seqlens!r}")
    else:
        try:
            items = list(cu_seqlens)  # type: ignore[call-overload]
        except TypeError:
            raise ValueError(
                f"cu_seqlens must be None, a list/tuple or a 1-D integer tensor, got {cu_seqlens!r}"
            ) from None
        values = [_as_int(v, f"cu_seqlens[{i}]") for i, v in enumerate(items)]
    if len(values) < 2:
        raise ValueError(f"cu_seqlens needs at least two boundaries [0, ..., {n_tokens}], got {values}")
    if values[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {values[0]}")
    for i in range(1, len(values)):
        if values[i] <= values[i - 1]:
            raise ValueError(
                "cu_seqlens must be strictly increasing (no empty documents), got "
                f"cu_seqlens[{i - 1}]={values[i - 1]} and cu_seqlens[{i}]={values[i]}"
            )
    if values[-1] != n_tokens:
        raise ValueError(f"cu_seqlens must end at the sequence length {n_tokens}, got {values[-1]}")
    return values


def doc_of(index: Tensor, cu_seqlens: Sequence[int] | Tensor) -> Tensor:
    """Document index of every global token index (vectorised lookup for masks and RoPE)."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.long, device=index.device)
    idx = index.to(torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= int(cu[-1])):
        raise ValueError(
            f"token indices must lie in [0, {int(cu[-1])}), got range "
            f"[{int(idx.min())}, {int(idx.max())}]"
        )
    return torch.searchsorted(cu, idx, right=True) - 1


def _merge(ranges: Sequence[Range]) -> list[Range]:
    """Drop empty ranges and fuse touching ones, so callers see the fewest copies."""
    out: list[Range] = []
    for a, b in ranges:
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _series(p0: int, length: int) -> int:
    """Sum of (p + 1) for p in [p0, p0 + length): causal keys seen by those queries."""
    return length * (p0 + 1) + length * (length - 1) // 2


# ---------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """A contiguous block of one document inside a rank's buffer.

    Schemes build per-block masks and positions from runs, so a run never
    crosses a document boundary.
    """

    local_start: int  # offset in the rank's local buffer
    start: int  # first global token index
    length: int
    doc: int  # document index
    doc_start: int  # global index where the document starts

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def pos_start(self) -> int:
        """Position in its document of the run's first token."""
        return self.start - self.doc_start


class Layout:
    """Which global tokens each rank holds; subclasses only fill ``_ranges``.

    Derived views (indices, runs, permutations) are cached because schemes ask
    for them every step and the answers never change.
    """

    name: str = "layout"

    def __init__(self, n_tokens: int, world: int, cu_seqlens: object = None) -> None:
        n_tokens = _as_int(n_tokens, "n_tokens")
        world = _as_int(world, "world")
        _check_sizes(n_tokens, world)
        self.n_tokens = n_tokens
        self.world = world
        self.cu_seqlens = as_cu_seqlens(cu_seqlens, n_tokens)
        self._ranges: list[list[Range]] = [[] for _ in range(world)]
        self._indices: dict[int, Tensor] = {}
        self._runs: dict[int, list[Run]] = {}
        self._perm: Tensor | None = None

    # -- subclass hook --------------------------------------------------------
    def _set_ranges(self, ranges: list[list[Range]]) -> None:
        self._ranges = [_merge(r) for r in ranges]
        covered = sum(b - a for rs in self._ranges for a, b in rs)
        assert covered == self.n_tokens, (self.name, covered, self.n_tokens)

    def _rank(self, rank: int) -> int:
        rank = _as_int(rank, "rank")
        if not 0 <= rank < self.world:
            raise ValueError(f"rank must be in [0, {self.world}), got {rank}")
        return rank

    # -- queries --------------------------------------------------------------
    @property
    def n_docs(self) -> int:
        return len(self.cu_seqlens) - 1

    def ranges(self, rank: int) -> list[Range]:
        """Global ``[start, end)`` ranges in local order (may cross documents)."""
        return list(self._ranges[self._rank(rank)])

    def indices(self, rank: int) -> Tensor:
        """Global token index of every local row."""
        rank = self._rank(rank)
        idx = self._indices.get(rank)
        if idx is None:
            parts = [torch.arange(a, b, dtype=torch.long) for a, b in self._ranges[rank]]
            idx = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
            self._indices[rank] = idx
        return idx.clone()

    def size(self, rank: int) -> int:
        return sum(b - a for a, b in self._ranges[self._rank(rank)])

    def sizes(self) -> list[int]:
        return [self.size(r) for r in range(self.world)]

    def runs(self, rank: int) -> list[Run]:
        """Local ranges cut at document boundaries."""
        rank = self._rank(rank)
        cached = self._runs.get(rank)
        if cached is None:
            cached = []
            cu = self.cu_seqlens
            local = 0
            for a, b in self._ranges[rank]:
                d = bisect.bisect_right(cu, a) - 1
                i = a
                while i < b:
                    stop = min(b, cu[d + 1])
                    cached.append(Run(local, i, stop - i, d, cu[d]))
                    local += stop - i
                    i = stop
                    d += 1
            self._runs[rank] = cached
        return list(cached)

    def doc_ids(self, rank: int) -> Tensor:
        """Document index of every local row (for document masks)."""
        runs = self.runs(rank)
        if not runs:
            return torch.empty(0, dtype=torch.long)
        return torch.cat([torch.full((r.length,), r.doc, dtype=torch.long) for r in runs])

    def positions(self, rank: int) -> Tensor:
        """Position of every local row inside its document (what RoPE needs)."""
        runs = self.runs(rank)
        if not runs:
            return torch.empty(0, dtype=torch.long)
        return torch.cat([torch.arange(r.pos_start, r.pos_start + r.length, dtype=torch.long)
                          for r in runs])

    def cost(self, rank: int) -> int:
        """Causal same-document (query, key) pairs whose query lives on ``rank``."""
        return causal_cost(self, rank)

    def costs(self) -> list[int]:
        return [self.cost(r) for r in range(self.world)]

    # -- data movement --------------------------------------------------------
    def _check_full(self, x: Tensor, dim: int) -> int:
        dim = dim % x.dim() if x.dim() else dim
        if x.dim() == 0 or x.size(dim) != self.n_tokens:
            raise ValueError(
                f"{self.name} layout expects {self.n_tokens} tokens along dim {dim}, "
                f"got shape {tuple(x.shape)}"
            )
        return dim

    def shard(self, x_full: Tensor, rank: int, dim: int = 0) -> Tensor:
        """This rank's rows of a full tensor, contiguous."""
        dim = self._check_full(x_full, dim)
        rank = self._rank(rank)
        ranges = self._ranges[rank]
        if len(ranges) == 1:  # the common case for contiguous: one cheap copy
            a, b = ranges[0]
            return x_full.narrow(dim, a, b - a).contiguous()
        idx = self.indices(rank).to(x_full.device)
        return x_full.index_select(dim, idx).contiguous()

    def _inverse(self) -> Tensor:
        if self._perm is None:
            order = torch.cat([self.indices(r) for r in range(self.world)])
            inv = torch.empty_like(order)
            inv[order] = torch.arange(order.numel(), dtype=torch.long)
            self._perm = inv
        return self._perm

    def unshard(self, shards: Sequence[Tensor], dim: int = 0) -> Tensor:
        """Rebuild the full tensor from every rank's shard (differentiable)."""
        if len(shards) != self.world:
            raise ValueError(f"{self.name} layout needs {self.world} shards, got {len(shards)}")
        for r, s in enumerate(shards):
            d = dim % s.dim() if s.dim() else dim
            if s.dim() == 0 or s.size(d) != self.size(r):
                raise ValueError(
                    f"shard {r} should hold {self.size(r)} tokens along dim {dim}, "
                    f"got shape {tuple(s.shape)}"
                )
        cat = torch.cat(list(shards), dim=dim)
        return cat.index_select(dim, self._inverse().to(cat.device)).contiguous()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n_tokens={self.n_tokens}, world={self.world}, "
                f"docs={self.n_docs}, sizes={self.sizes()})")


def _check_sizes(n_tokens: int, world: int) -> None:
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if n_tokens < world:
        raise ValueError(
            f"n_tokens={n_tokens} is smaller than world={world}: some rank would hold no tokens; "
            f"use world <= {n_tokens} or a sequence of at least {world} tokens"
        )


class Contiguous(Layout):
    """Rank r holds piece r of ``split_sizes(N, W)``: cheapest to shard, causally unbalanced."""

    name = "contiguous"

    def __init__(self, n_tokens: int, world: int, cu_seqlens: object = None) -> None:
        super().__init__(n_tokens, world, cu_seqlens)
        off = _offsets(split_sizes(self.n_tokens, self.world))
        self._set_ranges([[(off[r], off[r + 1])] for r in range(self.world)])


class Zigzag(Layout):
    """``N`` cut into ``2W`` pieces; rank r holds pieces r and 2W-1-r.

    Under a causal mask piece i costs roughly in proportion to i, so pairing a
    head piece with its mirror tail gives every rank the same work for a single
    document. Touching pieces (W == 1) are fused into one range.
    """

    name = "zigzag"

    def __init__(self, n_tokens: int, world: int, cu_seqlens: object = None) -> None:
        super().__init__(n_tokens, world, cu_seqlens)
        w = self.world
        off = _offsets(split_sizes(self.n_tokens, 2 * w))
        self._set_ranges([
            [(off[r], off[r + 1]), (off[2 * w - 1 - r], off[2 * w - r])] for r in range(w)
        ])

    def pieces(self) -> list[Range]:
        """The 2W global pieces, for schemes that reason per chunk."""
        off = _offsets(split_sizes(self.n_tokens, 2 * self.world))
        return [(off[i], off[i + 1]) for i in range(2 * self.world)]


class DocZigzag(Layout):
    """Every document cut into ``2W`` pieces; rank r holds pieces r and 2W-1-r of each.

    Zigzag over the whole pack is unbalanced when it holds many documents (cost
    restarts at every boundary); mirroring inside each document restores balance.
    Documents shorter than 2W leave some pieces empty, and ``split_sizes`` hands
    the leftovers to the low pieces, so tiny documents land on low ranks: a rank
    can even hold nothing if every document is shorter than its rank index.
    """

    name = "doc_zigzag"

    def __init__(self, n_tokens: int, world: int, cu_seqlens: object = None) -> None:
        super().__init__(n_tokens, world, cu_seqlens)
        w = self.world
        ranges: list[list[Range]] = [[] for _ in range(w)]
        cu = self.cu_seqlens
        for d in range(self.n_docs):
            off = _offsets(split_sizes(cu[d + 1] - cu[d], 2 * w), cu[d])
            for r in range(w):
                ranges[r].append((off[r], off[r + 1]))
                ranges[r].append((off[2 * w - 1 - r], off[2 * w - r]))
        self._set_ranges(ranges)


class Weighted(Layout):
    """Uneven shards whose causal attention cost follows per-rank weights.

    For devices of different speed the work, not the token count, should be
    proportional to speed. Work is the exact causal pair count: a token at
    position p of its document costs p + 1.

    Algorithm (head/tail peeling over the whole sequence): keep a window
    ``[h, t)`` of unassigned tokens, initially ``[0, N)``. For ranks 0..W-2 in
    order, the target is ``remaining_cost * w_r / sum(w_r..w_{W-1})``; the rank
    takes ``k`` tokens from the window's ends, ``ceil(k/2)`` from the head and
    ``floor(k/2)`` from the tail, with ``k`` chosen by binary search (cost grows
    strictly with ``k``) to land closest to the target, while leaving at least
    one token for every later rank. The last rank takes the middle that is left.
    Pairing cheap head tokens with expensive tail tokens keeps token counts
    moderate, as in zigzag; re-targeting on the remaining cost spreads rounding
    over all later ranks. Each rank holds at most two ranges (one for the last),
    and rounding is bounded by the cost of two tokens per rank.
    """

    name = "weighted"

    def __init__(self, n_tokens: int, world: int, cu_seqlens: object = None,
                 weights: Sequence[float] | Tensor | None = None) -> None:
        super().__init__(n_tokens, world, cu_seqlens)
        self.weights = _check_weights(weights, self.world)
        cu = self.cu_seqlens
        doc_prefix = [0]
        for d in range(self.n_docs):
            doc_prefix.append(doc_prefix[-1] + _series(0, cu[d + 1] - cu[d]))

        def prefix(i: int) -> int:
            """Cost of tokens [0, i)."""
            d = bisect.bisect_right(cu, i) - 1
            if d >= self.n_docs:
                return doc_prefix[-1]
            return doc_prefix[d] + _series(0, i - cu[d])

        h, t = 0, self.n_tokens
        ranges: list[list[Range]] = []
        for r in range(self.world - 1):
            target = (prefix(t) - prefix(h)) * self.weights[r] / sum(self.weights[r:])
            base = prefix(t) - prefix(h)

            def take(k: int, h: int = h, t: int = t, base: int = base) -> int:
                """Cost of ceil(k/2) head and floor(k/2) tail tokens of the window."""
                return base - (prefix(t - k // 2) - prefix(h + (k + 1) // 2))

            lo, hi = 1, (t - h) - (self.world - 1 - r)
            while lo < hi:  # smallest k with take(k) >= target
                mid = (lo + hi) // 2
                if take(mid) >= target:
                    hi = mid
                else:
                    lo = mid + 1
            k = lo
            if k > 1 and target - take(k - 1) < take(k) - target:
                k -= 1
            nh, nt = h + (k + 1) // 2, t - k // 2
            ranges.append([(h, nh), (nt, t)])
            h, t = nh, nt
        ranges.append([(h, t)])
        self._set_ranges(ranges)

    def target(self, rank: int) -> float:
        """Ideal cost of ``rank``: its weight's share of the total."""
        rank = self._rank(rank)
        total = sum(self.costs())
        return total * self.weights[rank] / sum(self.weights)


def _check_weights(weights: Sequence[float] | Tensor | None, world: int) -> list[float]:
    if weights is None:
        return [1.0] * world
    if isinstance(weights, Tensor):
        weights = weights.tolist()
    try:
        values = [float(w) for w in weights]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"weights must be a sequence of {world} positive numbers, got {weights!r}") from None
    if len(values) != world:
        raise ValueError(f"weights needs one entry per rank (world={world}), got {len(values)}: {values}")
    bad = [(i, w) for i, w in enumerate(values) if not (math.isfinite(w) and w > 0)]
    if bad:
        raise ValueError(f"weights must be finite and > 0, got {', '.join(f'weights[{i}]={w}' for i, w in bad)}")
    return values


LAYOUTS: dict[str, type[Layout]] = {
    "contiguous": Contiguous,
    "zigzag": Zigzag,
    "doc_zigzag": DocZigzag,
    "weighted": Weighted,
}


def get_layout(name: str, n_tokens: int, world: int, cu_seqlens: object = None,
               weights: Sequence[float] | Tensor | None = None) -> Layout:
    """Build a layout by name; the one entry point configs and schemes use."""
    cls = LAYOUTS.get(name)
    if cls is None:
        raise ValueError(f"unknown layout {name!r}; valid layouts: {', '.join(sorted(LAYOUTS))}")
    if cls is Weighted:
        return Weighted(n_tokens, world, cu_seqlens, weights)
    if weights is not None:
        raise ValueError(f"weights only apply to the 'weighted' layout, not {name!r}")
    return cls(n_tokens, world, cu_seqlens)


def causal_cost(layout: Layout, rank: int) -> int:
    """Exact causal same-document pairs whose query is on ``rank``: sum of (pos_in_doc + 1)."""
    return sum(_series(run.pos_start, run.length) for run in layout.runs(rank))
