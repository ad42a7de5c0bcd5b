"""The CAD task planner: place core-attention tasks on attention servers so every server has equal work.

Core attention (softmax(QK^T)V) has no parameters, so any rank can compute any
query shard as long as it receives the queries and the keys/values they see.
Its cost grows with the square of document length, so ranks that happen to hold
long documents straggle. The planner cuts documents into *query shards* and
assigns each shard to a server; a shard ``[a, b)`` of document ``d`` is one
task whose KV is the document prefix ``[0, b)`` (``[0, L)`` without a causal
mask), so each task is complete on one server and no partial results need
merging.

Inputs
------
``doc_lens``: document lengths, in packing order; together they form one
packed sequence of ``N = sum(doc_lens)`` global tokens.

``owner`` says which *source* rank holds which tokens before dispatch (the
ranks that run the linear layers and own the queries' outputs):

- ``None``: contiguous packing over ``n_servers`` sources
  (``distattn.layout.split_sizes(N, n_servers)``);
- a list of ints: source ``r`` holds the next ``owner[r]`` tokens of the packed
  sequence (contiguous packing with any per-rank sizes; ``sum == N``);
- a ``distattn.layout.Layout``: any partition (zigzag, doc_zigzag, ...); the
  order of a rank's rows is the layout's local order.

``colocated=True``: server ``s`` is source rank ``s`` (every rank both owns
tokens and serves); moving work off a rank costs bytes only if the shard's
tokens live elsewhere. ``colocated=False``: the servers are a separate pool
that owns nothing, so every shard's queries and KV travel.

Algorithm (greedy, communication-aware, ``O(P log P + P log S)`` for P pieces)
--------------------------------------------------------------------------
1. *Targets.* Total cost ``F``; server ``s`` gets ``target_s`` with
   ``target_s + linear_cost * tokens_s`` equal for all servers (water filling;
   with ``linear_cost = 0`` or equal token counts every target is ``F / S``).
   ``margin = tolerance * F / S / 2``.
2. *Start where the data is.* Colocated: every document is first split at its
   owners' boundaries and each piece stays on its owner (slivers shorter than
   ``min_shard`` merge into a neighbour; a document shorter than ``min_shard``
   stays whole on the owner of most of it). Dedicated: nothing is placed yet.
3. *Shed.* A server above ``target + margin`` gives away pieces until it is at
   its target, best ratio of pairs per byte first (long documents move the most
   work per byte). The last piece is cut so the shed part has exactly the
   missing pairs (head or tail, whichever moves fewer bytes); both parts keep
   at least ``min_shard`` tokens.
4. *Fill.* Shed pieces, largest first, go to servers below target: a server
   that already holds the document's tokens or KV takes a piece when it fits
   (``cost <= deficit + margin``; fewest bytes wins), otherwise the server with
   the largest deficit takes it whole if it fits, else a head of the piece cut
   to its deficit (``>= min_shard`` tokens) while the rest returns to the pool.
   Dedicated mode runs only this step, from an empty start (largest-first,
   worst-fit, with cuts).
5. Adjacent pieces of a document on one server merge into one shard.

Guarantee: every server ends at most ``target + max(margin, q)`` where ``q``
is one indivisible unit (a piece shorter than ``2 * min_shard`` tokens, a cut
rounded to ``min_shard`` tokens, or one token of rounding), all bounded by
``(2 * min_shard + 1) * (max(doc_lens) + token_cost)``. So the balanced cost's
max/mean is at most ``1 + tolerance`` whenever that unit is at most
``tolerance * F / S`` and targets are equal (``imbalance``, on exact pairs,
when ``token_cost = 0``) -- and in practice far more often: a server ends
within ``margin`` unless an indivisible piece lands on it.

Cost is the exact pair count, plus ``token_cost`` per query token when given
(:func:`distattn.sched.cost.task_cost`); ``F`` above is the total cost.
"""
from __future__ import annotations

import heapq
import time
from typing import Sequence

from distattn.layout import Layout, split_sizes
from distattn.sched.cad_plan import Plan, Shard, Traffic  # noqa: F401  (re-exported)
from distattn.sched.cost import doc_pairs, head_len_for, kv_end, pairs, tail_len_for, task_cost

__all__ = ["Plan", "Shard", "Traffic", "plan", "split_halves"]


# ----------------------------------------------------------------------------- inputs


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    value = int(value)
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _ownership(doc_lens: list[int], owner, n_default: int):
    """Per document: sorted (a, b, source, local_start) segments; and tokens per source."""
    n = sum(doc_lens)
    segs: list[list[tuple[int, int, int, int]]] = [[] for _ in doc_lens]
    if isinstance(owner, Layout):
        if owner.n_tokens != n:
            raise ValueError(f"owner layout covers {owner.n_tokens} tokens but doc_lens sum to {n}")
        if list(owner.cu_seqlens) != _cu(doc_lens):
            raise ValueError("owner layout's cu_seqlens differ from doc_lens")
        for r in range(owner.world):
            for run in owner.runs(r):
                segs[run.doc].append((run.pos_start, run.pos_start + run.length, r, run.local_start))
        for s in segs:
            s.sort()
        return segs, [owner.size(r) for r in range(owner.world)]
    sizes = split_sizes(n, n_default) if owner is None else [_check_int("owner[i]", x, 0) for x in owner]
    if not sizes:
        raise ValueError("owner must list at least one source rank")
    if sum(sizes) != n:
        raise ValueError(f"owner sizes sum to {sum(sizes)} but doc_lens sum to {n}")
    r, r_start, r_end = 0, 0, sizes[0]
    g = 0
    for d, length in enumerate(doc_lens):
        a = 0
        while a < length:
            while g + a >= r_end:  # skip empty or finished ranks
                r += 1
                r_start, r_end = r_end, r_end + sizes[r]
            b = min(length, r_end - g)
            segs[d].append((a, b, r, g + a - r_start))
            a = b
        g += length
    return segs, list(sizes)


def _cu(doc_lens: Sequence[int]) -> list[int]:
    cu = [0]
    for x in doc_lens:
        cu.append(cu[-1] + x)
    return cu


def _items(doc_lens: list[int], items) -> list[tuple[int, int, int]]:
    if items is None:
        return [(d, 0, length) for d, length in enumerate(doc_lens)]
    out = sorted((int(d), int(a), int(b)) for d, a, b in items)
    last: dict[int, int] = {}
    for d, a, b in out:
        if not 0 <= d < len(doc_lens):
            raise ValueError(f"item document {d} is outside [0, {len(doc_lens)})")
        if not 0 <= a < b <= doc_lens[d]:
            raise ValueError(f"item ({d}, {a}, {b}) is not a non-empty range of a document of "
                             f"length {doc_lens[d]}")
        if a < last.get(d, 0):
            raise ValueError(f"items overlap in document {d} at position {a}")
        last[d] = b
    return out


def _water_fill(total: float, base: list[float]) -> list[float]:
    """Targets t_s >= 0 with sum t_s = total and t_s + base_s equal wherever t_s > 0."""
    n = len(base)
    order = sorted(range(n), key=lambda i: base[i])
    acc = 0.0
    level = 0.0
    k = 0
    for k in range(1, n + 1):  # level with the k least-loaded servers active
        acc = sum(base[order[i]] for i in range(k))
        level = (total + acc) / k
        if k == n or level <= base[order[k]]:
            break
    return [max(0.0, level - base[i]) for i in range(n)]


# ----------------------------------------------------------------------------- planner


class _State:
    """Mutable planning state: pieces per server, loads, who holds which document."""

    def __init__(self, doc_lens, segs, n_servers, causal, colocated, q_bytes, kv_bytes, token_cost):
        self.L = doc_lens
        self.tc = token_cost
        self.segs = segs
        self.S = n_servers
        self.causal = causal
        self.colocated = colocated
        self.qb, self.kvb = q_bytes, kv_bytes
        self.pieces: list[list[tuple[int, int, int]]] = [[] for _ in range(n_servers)]
        self.load = [0] * n_servers
        self.kvmax: dict[int, dict[int, int]] = {}

    def cost(self, d: int, a: int, b: int) -> float:
        return task_cost(a, b, self.L[d], self.causal, self.tc)

    def head(self, d: int, a: int, b: int, target: float, lo: int, hi: int) -> int:
        return head_len_for(a, b, target, self.L[d], self.causal, lo, hi, self.tc)

    def tail(self, d: int, a: int, b: int, target: float, lo: int, hi: int) -> int:
        return tail_len_for(a, b, target, self.L[d], self.causal, lo, hi, self.tc)

    def kv_end(self, d: int, b: int) -> int:
        return kv_end(b, self.L[d], self.causal)

    def put(self, s: int, d: int, a: int, b: int) -> None:
        self.pieces[s].append((d, a, b))
        self.load[s] += self.cost(d, a, b)
        held = self.kvmax.setdefault(d, {})
        held[s] = max(held.get(s, 0), self.kv_end(d, b))

    def owned(self, d: int, s: int, a: int, b: int) -> int:
        """Tokens of [a, b) of document d owned by server s (colocated)."""
        if not self.colocated:
            return 0
        n = 0
        for sa, sb, src, _ in self.segs[d]:
            if src == s and sb > a and sa < b:
                n += min(b, sb) - max(a, sa)
        return n

    def bytes_to(self, d: int, a: int, b: int, s: int) -> int:
        """Dispatch bytes if server s computes queries [a, b) of document d."""
        q = (b - a) - self.owned(d, s, a, b)
        e = self.kv_end(d, b)
        have = self.kvmax.get(d, {}).get(s, 0)
        kv = max(0, e - have) - (self.owned(d, s, have, e) if e > have else 0)
        return q * self.qb + kv * self.kvb

    def holders(self, d: int) -> set[int]:
        out = set(self.kvmax.get(d, {}))
        if self.colocated:
            out.update(src for _, _, src, _ in self.segs[d])
        return out


def _initial_pieces(d, a, b, segs_d, min_shard):
    """Owner-aligned pieces of item [a, b), slivers below min_shard merged into a neighbour."""
    parts: list[list[int]] = []
    for sa, sb, src, _ in segs_d:
        lo, hi = max(a, sa), min(b, sb)
        if hi <= lo:
            continue
        if parts and parts[-1][2] == src and parts[-1][1] == lo:
            parts[-1][1] = hi
        else:
            parts.append([lo, hi, src])
    if len(parts) > 1 and b - a < min_shard:
        best = max(parts, key=lambda p: p[1] - p[0])
        return [(a, b, best[2])]
    while len(parts) > 1:
        i = min(range(len(parts)), key=lambda j: parts[j][1] - parts[j][0])
        if parts[i][1] - parts[i][0] >= min_shard:
            break
        if i == 0:
            j = 1
        elif i == len(parts) - 1:
            j = i - 1
        else:
            j = i - 1 if parts[i - 1][1] - parts[i - 1][0] >= parts[i + 1][1] - parts[i + 1][0] else i + 1
        lo, hi = min(parts[i][0], parts[j][0]), max(parts[i][1], parts[j][1])
        src = parts[j][2] if parts[j][1] - parts[j][0] >= parts[i][1] - parts[i][0] else parts[i][2]
        k = min(i, j)
        parts[k:k + 2] = [[lo, hi, src]]
    return [(lo, hi, src) for lo, hi, src in parts]


def plan(doc_lens: Sequence[int], n_servers: int, tolerance: float = 0.05, min_shard: int = 128, *,
         owner=None, colocated: bool = True, causal: bool = True, linear_cost: float = 0.0,
         q_bytes: int = 1, kv_bytes: int = 1, token_cost: float = 0.0,
         items: Sequence[tuple[int, int, int]] | None = None) -> Plan:
    """Split documents into query shards and place them on ``n_servers`` attention servers.

    ``tolerance``: accepted relative excess of a server over its target (the
    planner moves no work off a server within it). ``min_shard``: no shard is
    shorter, except a document (or item) shorter than it, which stays whole.
    ``owner``: which source rank holds which tokens (see the module docstring).
    ``linear_cost``: linear-layer work per owned token in pair units (colocated
    only; see :mod:`distattn.sched.cost`). ``q_bytes`` / ``kv_bytes``: the size
    of one query row / one K+V row, for communication-aware choices and
    ``send_bytes``. ``token_cost``: per-query-token kernel work in pair units
    that servers balance too (:func:`distattn.sched.cost.task_cost`; reported
    ``server_flops`` stay exact pairs). ``items``: plan only these ``(doc, start, end)`` query ranges
    (their KV is still the document prefix) -- ping-pong plans each half so.
    """
    t0 = time.perf_counter()
    L = [_check_int(f"doc_lens[{i}]", x, 1) for i, x in enumerate(doc_lens)]
    if not L:
        raise ValueError("doc_lens is empty: nothing to plan")
    S = _check_int("n_servers", n_servers, 1)
    min_shard = _check_int("min_shard", min_shard, 1)
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    if linear_cost < 0:
        raise ValueError(f"linear_cost must be >= 0, got {linear_cost!r}")
    if token_cost < 0:
        raise ValueError(f"token_cost must be >= 0, got {token_cost!r}")
    segs, source_tokens = _ownership(L, owner, S)
    R = len(source_tokens)
    if colocated and R != S:
        raise ValueError(f"colocated CAD needs one source per server: owner has {R} ranks, "
                         f"n_servers={S}; pass colocated=False for a dedicated server pool")
    todo = _items(L, items)
    st = _State(L, segs, S, causal, colocated, q_bytes, kv_bytes, token_cost)
    total = sum(st.cost(d, a, b) for d, a, b in todo)
    base = [linear_cost * t for t in source_tokens] if colocated else [0.0] * S
    targets = _water_fill(float(total), base)
    margin = tolerance * total / S / 2.0
    pool: list[tuple[int, int, int]] = []

    if colocated:
        for d, a, b in todo:
            for lo, hi, src in _initial_pieces(d, a, b, segs[d], min_shard):
                st.put(src, d, lo, hi)
        for s in range(S):
            _shed(st, s, targets[s], margin, min_shard, pool)
    else:
        pool = list(todo)
    _fill(st, pool, targets, margin, min_shard)

    shards = _merge(st)
    server_flops = [0] * S
    server_cost = [0.0] * S
    for sh in shards:
        server_flops[sh.server] += pairs(sh.q_start, sh.q_end, L[sh.doc], causal)
        server_cost[sh.server] += st.cost(sh.doc, sh.q_start, sh.q_end)
    q_tok, kv_tok = _token_matrix(st, shards, R)
    packing = [0] * R
    for d, a, b in todo:
        for sa, sb, src, _ in segs[d]:
            lo, hi = max(a, sa), min(b, sb)
            if hi > lo:
                packing[src] += pairs(lo, hi, L[d], causal)
    return Plan(doc_lens=tuple(L), n_servers=S, n_sources=R, colocated=colocated, causal=causal,
                tolerance=float(tolerance), min_shard=min_shard, linear_cost=float(linear_cost),
                shards=tuple(shards), server_flops=tuple(server_flops),
                server_cost=tuple(server_cost), token_cost=float(token_cost),
                source_tokens=tuple(source_tokens), packing_flops=tuple(packing),
                q_tokens=tuple(map(tuple, q_tok)), kv_tokens=tuple(map(tuple, kv_tok)),
                q_bytes=q_bytes, kv_bytes=kv_bytes, plan_s=time.perf_counter() - t0,
                segments=tuple(tuple(s) for s in segs))


def _shed(st: _State, s: int, target: float, margin: float, min_shard: int, pool: list) -> None:
    """Move pieces off server s (best pairs per byte first) until it is at its target."""
    excess = st.load[s] - target
    if excess <= margin:
        return

    def ratio(p):
        d, a, b = p
        moved = (b - a) * st.qb + st.kv_end(d, b) * st.kvb
        return st.cost(d, a, b) / max(moved, 1)

    keep: list[tuple[int, int, int]] = []
    for p in sorted(st.pieces[s], key=ratio, reverse=True):
        d, a, b = p
        if excess <= 0:
            keep.append(p)
            continue
        c = st.cost(d, a, b)
        if c <= excess:
            pool.append(p)
            excess -= c
            continue
        n = b - a
        if n < 2 * min_shard:
            keep.append(p)
            continue
        lo, hi = min_shard, n - min_shard
        h = st.head(d, a, b, excess, lo, hi)
        t = st.tail(d, a, b, excess, lo, hi)
        head_bytes = h * st.qb + st.kv_end(d, a + h) * st.kvb
        tail_bytes = t * st.qb + st.kv_end(d, b) * st.kvb
        head_err = abs(st.cost(d, a, a + h) - excess)
        tail_err = abs(st.cost(d, b - t, b) - excess)
        if (head_bytes, head_err) <= (tail_bytes, tail_err):
            pool.append((d, a, a + h))
            keep.append((d, a + h, b))
            excess -= st.cost(d, a, a + h)
        else:
            pool.append((d, b - t, b))
            keep.append((d, a, b - t))
            excess -= st.cost(d, b - t, b)
    for d, _, _ in st.pieces[s]:
        st.kvmax.get(d, {}).pop(s, None)
    st.pieces[s] = []
    st.load[s] = 0
    for d, a, b in keep:
        st.put(s, d, a, b)


def _fill(st: _State, pool: list, targets: list[float], margin: float, min_shard: int) -> None:
    """Hand pooled pieces to servers below target, largest piece first (see module docstring)."""
    S = st.S
    deficit = [targets[s] - st.load[s] for s in range(S)]
    heap = [(-deficit[s], s) for s in range(S) if deficit[s] > 0]
    heapq.heapify(heap)
    work = [(-st.cost(d, a, b), d, a, b) for d, a, b in pool]
    heapq.heapify(work)

    def top() -> int | None:
        while heap:
            neg, s = heap[0]
            if -neg != deficit[s] or deficit[s] <= 0:
                heapq.heappop(heap)
                continue
            return s
        return None

    def give(s: int, d: int, a: int, b: int) -> None:
        st.put(s, d, a, b)
        deficit[s] -= st.cost(d, a, b)
        if deficit[s] > 0:
            heapq.heappush(heap, (-deficit[s], s))

    while work:
        negc, d, a, b = heapq.heappop(work)
        c = -negc
        t = top()
        if t is None:  # rounding left work but nobody is below target: least loaded takes it
            s = min(range(S), key=lambda i: (-deficit[i], i))
            give(s, d, a, b)
            continue
        special = [r for r in st.holders(d) if deficit[r] > 0]
        fits = [r for r in special if c <= deficit[r] + margin]
        if fits:
            r = min(fits, key=lambda x: (st.bytes_to(d, a, b, x), -deficit[x], x))
            give(r, d, a, b)
            continue
        if c <= deficit[t] + margin:
            give(t, d, a, b)
            continue
        r = t
        if special:
            r2 = max(special, key=lambda x: (deficit[x], -x))
            if deficit[r2] > margin:
                r = r2
        n = b - a
        if n < 2 * min_shard:  # indivisible: the largest deficit takes it
            give(t, d, a, b)
            continue
        h = st.head(d, a, b, deficit[r], min_shard, n - min_shard)
        give(r, d, a, a + h)
        heapq.heappush(work, (-st.cost(d, a + h, b), d, a + h, b))


def _merge(st: _State) -> list[Shard]:
    out: list[Shard] = []
    for s in range(st.S):
        cur: list[int] | None = None
        for d, a, b in sorted(st.pieces[s]):
            if cur is not None and cur[0] == d and cur[2] == a:
                cur[2] = b
                continue
            if cur is not None:
                out.append(Shard(cur[0], cur[1], cur[2], s))
            cur = [d, a, b]
        if cur is not None:
            out.append(Shard(cur[0], cur[1], cur[2], s))
    return out


def _token_matrix(st: _State, shards: list[Shard], n_sources: int):
    q = [[0] * st.S for _ in range(n_sources)]
    kv = [[0] * st.S for _ in range(n_sources)]
    prefix: dict[tuple[int, int], int] = {}
    for sh in shards:
        for sa, sb, src, _ in st.segs[sh.doc]:
            lo, hi = max(sh.q_start, sa), min(sh.q_end, sb)
            if hi > lo:
                q[src][sh.server] += hi - lo
        key = (sh.doc, sh.server)
        prefix[key] = max(prefix.get(key, 0), st.kv_end(sh.doc, sh.q_end))
    for (d, s), e in prefix.items():
        for sa, sb, src, _ in st.segs[d]:
            hi = min(e, sb)
            if hi > sa:
                kv[src][s] += hi - sa
    return q, kv


def split_halves(doc_lens: Sequence[int], min_shard: int = 128, causal: bool = True,
                 groups: Sequence[int] | None = None
                 ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """Two query sets of about equal pairs, for ping-pong (each is planned on its own).

    Documents go, largest first, to the lighter half; then the heavier half's
    largest document gives a head shard to the lighter half to even them out
    (kept ``>= min_shard`` tokens on both sides). One long document is cut in
    two: head ``[0, c)`` and tail ``[c, L)`` of equal pairs.

    ``groups`` (e.g. the rank that owns most of each document) halves every
    group on its own, so each half keeps the batch's per-rank profile and its
    plan moves about half of what the whole batch's plan moves.
    """
    L = [_check_int(f"doc_lens[{i}]", x, 1) for i, x in enumerate(doc_lens)]
    if groups is None:
        groups = [0] * len(L)
    if len(groups) != len(L):
        raise ValueError(f"groups has {len(groups)} entries for {len(L)} documents")
    members: dict[int, list[int]] = {}
    for d, g in enumerate(groups):
        members.setdefault(int(g), []).append(d)
    out: tuple[list, list] = ([], [])
    for g in sorted(members):
        a, b = _halve(L, members[g], min_shard, causal)
        out[0].extend(a)
        out[1].extend(b)
    return sorted(out[0]), sorted(out[1])


def _halve(L: list[int], docs: list[int], min_shard: int, causal: bool):
    halves: list[list[tuple[int, int, int]]] = [[], []]
    load = [0, 0]
    for d in sorted(docs, key=lambda i: (-L[i], i)):
        h = 0 if load[0] <= load[1] else 1
        halves[h].append((d, 0, L[d]))
        load[h] += doc_pairs(L[d], causal)
    heavy = 0 if load[0] > load[1] else 1
    gap = (load[heavy] - load[1 - heavy]) / 2.0
    if halves[heavy] and gap > 0:
        i = max(range(len(halves[heavy])), key=lambda j: L[halves[heavy][j][0]])
        d, _, n = halves[heavy][i]
        if n >= 2 * min_shard:
            h = head_len_for(0, n, gap, n, causal, min_shard, n - min_shard)
            before = abs(load[heavy] - load[1 - heavy])
            moved = pairs(0, h, n, causal)
            if abs((load[heavy] - moved) - (load[1 - heavy] + moved)) < before:
                halves[heavy][i] = (d, h, n)
                halves[1 - heavy].append((d, 0, h))
    return halves[0], halves[1]
