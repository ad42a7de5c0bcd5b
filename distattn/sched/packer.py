"""Attention-aware packing of documents onto dp ranks and micro-batches.

Packing a document stream into fixed windows gives every dp rank the same
number of tokens but not the same work: a causal document of ``L`` tokens costs
``L (L + 1) / 2`` attention pairs, so a rank that draws one long document is
the straggler every other rank waits for at the gradient all-reduce. This
module chooses *whole documents* per packed sequence so that the estimated step
time of every dp rank is about the same.

Cost model (``distattn.sched.cost``): a rank's predicted step work is the exact
causal pair count of its documents plus ``linear_cost`` per token
(``step_cost``), in pair units.

Bins. A step has ``dp`` ranks with ``M = grad_accum * micro_batch_size``
micro-batches each; a micro-batch is one packed sequence of at most ``seq_len``
tokens (the memory bound). Documents longer than ``seq_len`` are first cut into
``seq_len`` pieces; a piece is the unit of placement.

Sequence length. The model input length stays fixed at ``seq_len``: a sequence
whose pieces fill fewer tokens is padded with padding documents of at most
``pad_chunk`` tokens each, whose ``loss_mask`` is 0 (short padding documents keep
the wasted attention work linear in the padding, not quadratic). Fixed ``T``
keeps every layout, RoPE table and cp split exactly as in token packing.

One step's plan (deterministic, a pure function of the planner state):

1. *Intake.* The pool is the pieces carried from earlier steps plus fresh pieces
   in epoch order (a permutation drawn from ``seed + epoch``). The fresh pieces
   of one step (its *intake*) hold at most one step's capacity
   ``dp * M * seq_len`` tokens and fit the step's bins by first-fit-decreasing
   (FFD); each remembers its FFD bin (its *home*). The pool holds at most
   ``K + 1`` steps' capacity, so with ``K = max_defer`` the packer looks up to
   ``K`` steps ahead.
2. *Greedy, longest first.* Pieces carried ``K`` times go first; then every
   other piece by decreasing cost, each to the least-loaded rank that has a
   micro-batch with room (best fit inside the rank). With ``K > 0`` a piece
   waits (is carried to the next step, its age + 1) when it would push its
   rank above both the per-rank share of the pool's work and the step's
   current critical path; so long documents wait until they can go out
   together, and short ones fill the other ranks up to the critical path.
3. *Guarantees.* Pieces at the limit ``K`` all come from one intake, so they
   fit an empty step (in their home bins if the greedy cannot place them):
   every document is trained at most ``K`` steps after its intake and nothing
   is dropped. With ``K = 0`` every step places its whole pool: the plan is the
   best (least maximum per-rank cost) of the greedy by cost, the same greedy by
   tokens, and the FFD home bins. Since the token-balanced plan is a candidate,
   the attention-aware plan of a step is never less balanced than the
   token-balanced plan of the same documents.

State: the epoch cursor, the carried pieces with their ages and the step count:
plain ints, identical on every dp rank, restored exactly by
``load_state_dict`` (also under a different ``dp``).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from distattn.config import ConfigError
from distattn.sched.cost import doc_pairs, step_cost

__all__ = ["Piece", "StepPlan", "BalancedPacker", "ffd_fits", "seq_pairs", "STATE_VERSION"]

STATE_VERSION = 1


def _whole(name: str, value, low: int) -> int:
    """An integer >= low (numpy integers included), else a ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name}={value!r}: expected an integer >= {low}")
    return int(value)


def check_linear_cost(value) -> float:
    """Linear-layer work per token in pair units: a finite number >= 0, else a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not value >= 0 or value == float("inf"):
        raise ConfigError(f"linear_cost={value!r}: expected a finite number >= 0 (pairs per token)")
    return float(value)


def check_seed(value) -> int:
    """A seed: any integer (taken modulo 2**64), else a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"seed={value!r}: expected an integer")
    return int(value)


def _u64(x: int) -> int:
    return int(x) % (1 << 64)


@dataclass(frozen=True)
class Piece:
    """Tokens ``[start, stop)`` of document ``doc``; ``age`` counts the steps it was deferred."""

    doc: int
    start: int
    stop: int
    age: int = 0
    home: int = -1  # micro-batch slot (rank + dp * micro) of its intake's first-fit-decreasing packing

    @property
    def length(self) -> int:
        return self.stop - self.start

    def key(self) -> tuple[int, int, int]:
        return (self.doc, self.start, self.stop)


@dataclass
class StepPlan:
    """Where the pieces of one step go: ``bins[rank][micro]`` lists pieces in sequence order."""

    bins: list[list[list[Piece]]]
    costs: list[float]            # predicted work of each rank, pair units (pairs + linear * tokens)
    deferred: list[Piece] = field(default_factory=list)
    fallback: bool = False

    def rank_tokens(self, rank: int) -> int:
        return sum(p.length for b in self.bins[rank] for p in b)

    def pieces(self) -> list[Piece]:
        return [p for r in self.bins for b in r for p in b]


def seq_pairs(cu_seqlens: Sequence[int]) -> int:
    """Causal pairs of one packed sequence with the given document boundaries."""
    return sum(doc_pairs(int(b) - int(a)) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))


def _cost(length: int, linear_cost: float) -> float:
    return step_cost(doc_pairs(length), length, linear_cost)


def _ffd_homes(lengths: Sequence[int], bins: int, cap: int, strict: bool = True) -> list[int]:
    """First-fit-decreasing bin of every length (ties by position), -1 where none fits (strict: raise)."""
    room = [cap] * bins
    homes = [-1] * len(lengths)
    for j in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[j]
        for i, r in enumerate(room):
            if n <= r:
                room[i] = r - n
                homes[j] = i
                break
        else:
            if strict:
                raise RuntimeError("first-fit-decreasing could not place a piece")
    return homes


def ffd_fits(lengths: Sequence[int], bins: int, cap: int) -> bool:
    """Whether first-fit-decreasing places all ``lengths`` into ``bins`` bins of ``cap`` tokens."""
    return -1 not in _ffd_homes(lengths, bins, cap, strict=False)


class BalancedPacker:
    """The global planner: the same on every dp rank, a pure function of lengths, seed and state.

    ``lengths`` are the document lengths of the corpus; ``seq_len`` is the token
    cap of one micro-batch; ``max_defer`` (K) bounds how many steps a piece may
    wait after its intake (0: none); ``balance="tokens"`` turns the cost into a
    pure token count (a token-balanced whole-document packer, for comparison).
    A resume under another ``dp`` re-homes the carried pieces; the deferral
    bound then holds from the next intake on.
    """

    def __init__(self, lengths: Sequence[int], seq_len: int, seed: int = 0, shuffle: bool = True,
                 linear_cost: float = 0.0, max_defer: int = 0,
                 balance: str = "attention"):
        try:
            self.lengths = np.asarray(lengths, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError("lengths must be a non-empty list of positive document lengths") from None
        if self.lengths.ndim != 1 or self.lengths.size == 0 or (self.lengths <= 0).any():
            raise ConfigError("lengths must be a non-empty list of positive document lengths")
        _whole("seq_len", seq_len, 1)
        _whole("max_defer", max_defer, 0)
        if balance not in ("attention", "tokens"):
            raise ConfigError(f"balance must be 'attention' or 'tokens', got {balance!r}")
        check_linear_cost(linear_cost)
        check_seed(seed)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.linear_cost = float(linear_cost)
        self.max_defer = int(max_defer)
        self.balance = balance
        self._orders: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._nbins: int | None = None  # bins per step of the last plan (homes refer to them)
        # state
        self.epoch = 0
        self.cursor = 0          # index into the epoch's piece order
        self.carry: list[Piece] = []
        self.steps = 0

    # epoch piece order ---------------------------------------------------------------
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative piece counts) of one epoch."""
        hit = self._orders.get(epoch)
        if hit is not None:
            return hit
        n = self.lengths.size
        perm = (np.random.default_rng(_u64(self.seed + epoch)).permutation(n) if self.shuffle
                else np.arange(n))
        counts = -(-self.lengths[perm] // self.seq_len)
        self._orders[epoch] = (perm, np.cumsum(counts))
        while len(self._orders) > 3:
            self._orders.popitem(last=False)
        return self._orders[epoch]

    def pieces_per_epoch(self) -> int:
        return int(self._epoch(0)[1][-1])

    def _piece_at(self, epoch: int, index: int) -> Piece:
        perm, ends = self._epoch(epoch)
        i = int(np.searchsorted(ends, index, side="right"))
        k = index - (int(ends[i - 1]) if i else 0)
        doc = int(perm[i])
        start = k * self.seq_len
        return Piece(doc, start, min(start + self.seq_len, int(self.lengths[doc])))

    def _fresh(self):
        """Fresh pieces from the cursor on, with the (epoch, cursor) after each."""
        epoch, cur = self.epoch, self.cursor
        while True:
            total = self.pieces_per_epoch()
            if cur >= total:
                epoch, cur = epoch + 1, 0
            p = self._piece_at(epoch, cur)
            cur += 1
            yield p, epoch, cur

    # cost ------------------------------------------------------------------------------
    def cost(self, piece_len: int) -> float:
        if self.balance == "tokens":
            return float(piece_len)
        return _cost(piece_len, self.linear_cost)

    # planning --------------------------------------------------------------------------
    def plan(self, dp: int, micro: int, commit: bool = True) -> StepPlan:
        """The plan of the next step for ``dp`` ranks of ``micro`` micro-batches each."""
        _whole("dp", dp, 1)
        _whole("micro-batches per rank", micro, 1)
        T, nbins, K = self.seq_len, dp * micro, self.max_defer
        capacity = nbins * T
        pool = self._rehome(list(self.carry), nbins)
        tokens = sum(p.length for p in pool)
        epoch, cursor = self.epoch, self.cursor
        taken: list[tuple[Piece, int, int]] = []
        cohort_tokens = 0
        for p, ep, cur in self._fresh():
            if tokens + p.length > (K + 1) * capacity or cohort_tokens + p.length > capacity:
                break
            taken.append((p, ep, cur))
            tokens += p.length
            cohort_tokens += p.length
        while taken and not ffd_fits([p.length for p, _, _ in taken], nbins, T):
            taken.pop()
        if taken:
            epoch, cursor = taken[-1][1], taken[-1][2]
        homes = _ffd_homes([p.length for p, _, _ in taken], nbins, T)
        pool += [Piece(p.doc, p.start, p.stop, 0, h) for (p, _, _), h in zip(taken, homes)]

        if K == 0:
            # everything is placed now: the best of three complete plans by this packer's cost
            # (longest-first by cost, by tokens, and the intake's first-fit-decreasing bins)
            cands = [g for g in (self._greedy(pool, dp, micro, self.cost),
                                 self._greedy(pool, dp, micro, float)) if not g.deferred]
            cands.append(self._at_home(pool, dp, micro))
            plan = min(cands, key=lambda g: max(self._metric(g, self.cost)))
        else:
            plan = self._greedy(pool, dp, micro, self.cost)
        if commit:
            self.carry = [Piece(p.doc, p.start, p.stop, p.age + 1, p.home) for p in plan.deferred]
            self.epoch, self.cursor = epoch, cursor
            self.steps += 1
            self._nbins = nbins
        return plan

    def _rehome(self, carry: list[Piece], nbins: int) -> list[Piece]:
        """Carried pieces keep their intake bins unless the step's shape changed (a resume at another dp)."""
        if self._nbins in (None, nbins) and all(0 <= p.home < nbins for p in carry):
            return carry
        out = []
        for age in sorted({p.age for p in carry}):
            group = sorted((p for p in carry if p.age == age), key=lambda p: p.key())
            homes = _ffd_homes([p.length for p in group], nbins, self.seq_len, strict=False)
            out += [Piece(p.doc, p.start, p.stop, p.age, h) for p, h in zip(group, homes)]
        return out

    def _metric(self, plan: StepPlan, cost) -> list[float]:
        return [sum(cost(p.length) for b in rank for p in b) for rank in plan.bins]

    def _greedy(self, pool: list[Piece], dp: int, micro: int, cost) -> StepPlan:
        T, K = self.seq_len, self.max_defer
        room = [[T] * micro for _ in range(dp)]
        bins: list[list[list[Piece]]] = [[[] for _ in range(micro)] for _ in range(dp)]
        load = [0.0] * dp
        deferred: list[Piece] = []
        forced = [p for p in pool if K and p.age >= K]
        rest = sorted((p for p in pool if not (K and p.age >= K)), key=lambda p: (-cost(p.length), p.key()))
        # pieces at the deferral limit all come from one intake, whose first-fit-decreasing
        # bins hold them in an empty step
        spots = []
        for p in sorted(forced, key=lambda p: (-cost(p.length), p.key())):
            r, m = self._fit(room, load, p.length)
            if r is None:
                break
            spots.append((p, r, m))
            room[r][m] -= p.length
            load[r] += cost(p.length)
        if len(spots) < len(forced):  # fall back on the intake's bins, which hold them all
            room = [[T] * micro for _ in range(dp)]
            load = [0.0] * dp
            spots = []
            for p in forced:
                r, m = p.home % dp, p.home // dp
                if not 0 <= p.home < dp * micro or room[r][m] < p.length:
                    r, m = self._fit(room, load, p.length)
                    if r is None:
                        raise RuntimeError(f"piece {p.key()} reached the deferral limit but does not fit")
                spots.append((p, r, m))
                room[r][m] -= p.length
                load[r] += cost(p.length)
        for p, r, m in spots:
            bins[r][m].append(p)
        target = sum(cost(p.length) for p in pool) / ((K + 1) * dp)
        for p in rest:
            c = cost(p.length)
            r, m = self._fit(room, load, p.length)
            if r is None or (K and load[r] + c > max(target, max(load))):
                deferred.append(p)
                continue
            bins[r][m].append(p)
            room[r][m] -= p.length
            load[r] += c
        return StepPlan(bins, self._true_costs(bins), deferred)

    @staticmethod
    def _fit(room, load, n):
        """(rank, micro-batch): the least-loaded rank with room for ``n`` tokens, best fit inside it."""
        best = None
        for r in range(len(room)):
            if best is None or load[r] < load[best]:
                if any(x >= n for x in room[r]):
                    best = r
        if best is None:
            return None, None
        m = min((m for m in range(len(room[best])) if room[best][m] >= n), key=lambda m: (room[best][m], m))
        return best, m

    def _at_home(self, pool: list[Piece], dp: int, micro: int) -> StepPlan:
        bins: list[list[list[Piece]]] = [[[] for _ in range(micro)] for _ in range(dp)]
        for p in pool:
            bins[p.home % dp][p.home // dp].append(p)
        return StepPlan(bins, self._true_costs(bins), [], fallback=True)

    def _true_costs(self, bins) -> list[float]:
        return [sum(_cost(p.length, self.linear_cost) for b in rank for p in b) for rank in bins]

    # state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self.epoch, "cursor": self.cursor, "steps": self.steps,
                "carry": [[p.doc, p.start, p.stop, p.age, p.home] for p in self.carry],
                "bins": self._nbins,
                "seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle,
                "max_defer": self.max_defer, "num_docs": int(self.lengths.size),
                "num_tokens": int(self.lengths.sum())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"packer state version {state.get('version')!r} is not supported "
                             f"(expected {STATE_VERSION})")
        ours = {"seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle,
                "num_docs": int(self.lengths.size), "num_tokens": int(self.lengths.sum())}
        diffs = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in ours.items() if state.get(k) != v]
        if diffs:
            raise ValueError("cannot resume the balanced packer: it was saved for different data ("
                             + "; ".join(diffs) + ")")
        self.epoch, self.cursor, self.steps = int(state["epoch"]), int(state["cursor"]), int(state["steps"])
        self.carry = [Piece(int(d), int(a), int(b), int(g), int(h)) for d, a, b, g, h in state["carry"]]
        if state.get("bins") is not None:
            self._nbins = int(state["bins"])
