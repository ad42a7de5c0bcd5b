"""distattn.comm: values, ledger byte counts against the documented formulas, exposed time.

Worker functions are module level so the rank pool can pickle them; they check
values on each rank and return the ledger records, which the tests compare with
the byte convention in the comm module docstring. World size 1 runs in this
process with no process group at all.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from distattn.comm import Comm, CommLedger, CommRecord, Handle, OpSummary, default_ledger

F32 = 4  # bytes per float32 element


def _on(ranks, world: int, fn, *args):
    """W == 1 runs here without torch.distributed; W > 1 on the gloo pool."""
    if world == 1:
        assert not (dist.is_available() and dist.is_initialized())
        return [fn(*args)]
    return ranks(world, fn, *args)


def _recs(ledger: CommLedger) -> list[tuple[str, int, int, int, str]]:
    return [(r.op, r.group_size, r.bytes_sent, r.bytes_recv, r.tag) for r in ledger.records]


# ----------------------------------------------------------------------------- workers


def _w_send_recv():
    c = Comm(ledger=CommLedger())
    me, W = c.rank, c.size
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * me
    if W == 1:
        c.send(x, 0)
        got = c.recv(torch.empty(2, 3), 0)
        torch.testing.assert_close(got, x)
    elif me % 2 == 0:
        c.send(x, me + 1)
    else:
        buf = torch.empty(3, 2).t()  # non-contiguous receive buffer
        got = c.recv(buf, me - 1)
        assert got is buf
        torch.testing.assert_close(got, x - 10)
    return _recs(c.ledger)


def _w_exchange_ring():
    c = Comm(ledger=CommLedger())
    me, W = c.rank, c.size
    nxt, prv = (me + 1) % W, (me - 1) % W
    k = torch.full((4, 2), float(me))
    v = torch.full((3,), 100.0 + me)
    kb, vb = torch.empty(4, 2), torch.empty(3)
    h = c.exchange([(k, nxt), (v, nxt)], [(kb, prv), (vb, prv)])
    assert isinstance(h, Handle)
    out = h.wait()
    assert h.is_completed()
    assert out[0] is kb and out[1] is vb
    torch.testing.assert_close(kb, torch.full((4, 2), float(prv)))
    torch.testing.assert_close(vb, torch.full((3,), 100.0 + prv))
    assert h.wait() is out  # a second wait neither blocks nor records again
    # Two rounds back to back, the second posted before the first is waited on.
    h1 = c.exchange([(kb.clone(), nxt)], [(k, prv)])
    h1.wait()
    torch.testing.assert_close(k, torch.full((4, 2), float((me - 2) % W)))
    return _recs(c.ledger)


def _w_all_gather():
    c = Comm(ledger=CommLedger())
    me, W = c.rank, c.size
    x = torch.arange(6, dtype=torch.float32).reshape(3, 2) + 100 * me
    want = torch.stack([torch.arange(6, dtype=torch.float32).reshape(3, 2) + 100 * r
                        for r in range(W)])
    out = c.all_gather(x)
    assert out.shape == (W, 3, 2) and out.is_contiguous()
    torch.testing.assert_close(out, want)
    h = c.all_gather(x.t(), async_op=True)  # non-contiguous input
    torch.testing.assert_close(h.wait(), want.transpose(1, 2))
    return _recs(c.ledger)


def _sizes(W: int) -> list[int]:
    return [2, 0, 3, 1][:W] if W > 1 else [3]


def _w_all_gather_uneven():
    c = Comm(ledger=CommLedger())
    me, W = c.rank, c.size
    sizes = _sizes(W)
    x = torch.full((sizes[me], 2), float(me)) + torch.arange(sizes[me]).unsqueeze(1)
    for async_op in (False, True):
        res = c.all_gather_uneven(x, sizes, async_op=async_op)
        res = res.wait() if async_op else res
        assert [r.shape[0] for r in res] == sizes
        for r in range(W):
            torch.testing.assert_close(res[r], torch.full((sizes[r], 2), float(r))
                                       + torch.arange(sizes[r]).unsqueeze(1))
    with pytest.raises(ValueError, match="sizes"):
        c.all_gather_uneven(x, [s + 1 for s in sizes])
    return _recs(c.ledger)


def _w_reduce_scatter():
    c = Comm(ledger=CommLedger())
    me, W = c.rank, c.size
    full = torch.arange(4 * W * 3, dtype=torch.float32).reshape(4 * W, 3)
    total = full * (W * (W + 1) / 2)  # sum over ranks of full * (rank + 1)
    got = c.reduce_scatter(full * (me + 1))
    torch.testing.assert_close(got, total[4 * me: 4 * (me + 1)])
    sizes = _sizes(W)
    n = sum(sizes)
    fu = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    h = c.reduce_scatter(fu * (me + 1), sizes=sizes, async_op=True)
    lo = sum(sizes[:me])
    torch.testing.assert_close(h.wait(), fu[lo: lo + sizes[me]] * (W * (W + 1) / 2))
    if W > 1:
        with pytest.raises(ValueError, match="not divisible"):
            c.reduce_scatter(torch.zeros(W + 1, 2))
    return _recs(c.ledger)


def _w_all_to_all():
    c = Comm(ledger=CommLedger())
    me, W = c.rank, c.size
    # Rank i sends i + 2j + 1 rows to rank j; row value = 100*src + 10*dst + index.
    ins = [me + 2 * j + 1 for j in range(W)] if W > 1 else [5]
    outs = [j + 2 * me + 1 for j in range(W)] if W > 1 else [5]
    x = torch.cat([100.0 * me + 10 * j + torch.arange(ins[j], dtype=torch.float32)
                   for j in range(W)]).unsqueeze(1).repeat(1, 2)
    want = torch.cat([100.0 * j + 10 * me + torch.arange(outs[j], dtype=torch.float32)
                      for j in range(W)]).unsqueeze(1).repeat(1, 2)
    torch.testing.assert_close(c.all_to_all(x, ins, outs), want)
    h = c.all_to_all(x, ins, outs, async_op=True)
    torch.testing.assert_close(h.wait(), want)
    # Equal splits by default: chunk j of rank i lands as chunk i on rank j.
    y = torch.arange(2 * W, dtype=torch.float32) + 1000 * me
    want_eq = torch.cat([torch.arange(2 * me, 2 * me + 2, dtype=torch.float32) + 1000 * j
                         for j in range(W)])
    torch.testing.assert_close(c.all_to_all(y), want_eq)
    return _recs(c.ledger), ins, outs


def _w_all_reduce():
    c = Comm(ledger=CommLedger())
    me, W = c.rank, c.size
    base = torch.tensor([1.0, -2.0, 3.0, 0.5])
    out = {}
    for op in ("sum", "avg", "max", "min"):
        t = base * (me + 1)
        r = c.all_reduce(t, op=op)
        assert r is t
        out[op] = t.tolist()
    t = (base * (me + 1)).repeat(2, 1).t()  # non-contiguous, reduced in place
    h = c.all_reduce(t, op="sum", async_op=True)
    assert h.wait() is t
    torch.testing.assert_close(t, base.repeat(2, 1).t() * (W * (W + 1) / 2))
    with pytest.raises(ValueError, match="all_reduce op"):
        c.all_reduce(t, op="prod")
    return out, _recs(c.ledger)


def _w_broadcast():
    c = Comm(ledger=CommLedger())
    me, W = c.rank, c.size
    src = W - 1
    t = torch.full((5, 2), float(me), dtype=torch.float64)
    assert c.broadcast(t, src) is t
    torch.testing.assert_close(t, torch.full((5, 2), float(src), dtype=torch.float64))
    c.barrier()
    return _recs(c.ledger)


def _w_ledger_reduce():
    led = CommLedger()
    c = Comm(ledger=led)
    me, W = c.rank, c.size
    with led.tag("fwd"):
        c.all_reduce(torch.zeros(8))
        c.all_reduce(torch.zeros(8))
        for _ in range(me + 1):  # rank-dependent traffic, recorded by hand
            led.record("send", W, 10, 0, 0.0)
    with led.tag("bwd"):
        c.all_gather(torch.zeros(2))
    n_before = len(led.records)
    rep = led.reduce()
    assert len(led.records) == n_before  # the reduction does not record itself
    return rep, led.reduce(tag="fwd")


def _w_delayed_peer():
    c = Comm(ledger=CommLedger())
    me = c.rank
    x = torch.ones(1000)
    # 1. blocking recv from a late sender
    if me == 0:
        time.sleep(0.2)
        c.send(x, 1)
    elif me == 1:
        c.recv(torch.empty(1000), 0)
    # 2. async exchange: blocked inside wait() while the peer is late
    if me == 0:
        time.sleep(0.2)
    h = c.exchange([(x, 1 - me)], [(torch.empty(1000), 1 - me)])
    h.wait()
    # 3. async exchange whose transfer is hidden behind "compute"
    h = c.exchange([(x, 1 - me)], [(torch.empty(1000), 1 - me)])
    time.sleep(0.5)
    h.wait()
    # 4. a collective that one rank joins late
    if me == 0:
        time.sleep(0.2)
    c.all_reduce(torch.ones(4))
    return [(r.op, r.exposed_s) for r in c.ledger.records]


def _w_subgroup():
    # Every rank must create every group, in the same order.
    ws = dist.get_world_size()
    evens = dist.new_group(list(range(0, ws, 2)))
    odds = dist.new_group(list(range(1, ws, 2)))
    g = evens if dist.get_rank() % 2 == 0 else odds
    c = Comm(g, ledger=CommLedger())
    me, W = c.rank, c.size
    glob = [c.global_rank(r) for r in range(W)]
    nxt, prv = (me + 1) % W, (me - 1) % W
    buf = torch.empty(2)
    c.exchange([(torch.full((2,), float(dist.get_rank())), nxt)], [(buf, prv)]).wait()
    s = c.all_reduce(torch.tensor([float(dist.get_rank())]))
    return glob, buf.tolist(), s.item(), (me, W)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("world", [1, 2, 4])
def test_send_recv(ranks, world):
    out = _on(ranks, world, _w_send_recv)
    n = 6 * F32
    if world == 1:
        assert out[0] == [("send", 1, 0, 0, ""), ("recv", 1, 0, 0, "")]
        return
    for r, recs in enumerate(out):
        assert recs == ([("send", world, n, 0, "")] if r % 2 == 0 else [("recv", world, 0, n, "")])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_exchange_ring(ranks, world):
    out = _on(ranks, world, _w_exchange_ring)
    kv = (8 + 3) * F32
    k = 8 * F32
    b = 0 if world == 1 else 1
    for recs in out:
        assert recs == [("exchange", world, kv * b, kv * b, ""), ("exchange", world, k * b, k * b, "")]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_all_gather(ranks, world):
    for recs in _on(ranks, world, _w_all_gather):
        n = 6 * F32 * (world - 1)
        assert recs == [("all_gather", world, n, n, "")] * 2


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_all_gather_uneven(ranks, world):
    for recs in _on(ranks, world, _w_all_gather_uneven):
        n = max(_sizes(world)) * 2 * F32 * (world - 1)  # padded wire bytes
        assert recs == [("all_gather_uneven", world, n, n, "")] * 2


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_reduce_scatter(ranks, world):
    sizes = _sizes(world)
    row = 3 * F32
    for me, recs in enumerate(_on(ranks, world, _w_reduce_scatter)):
        eq = 4 * row * (world - 1)
        sent = sum(s for j, s in enumerate(sizes) if j != me) * row if world > 1 else 0
        recv = (world - 1) * sizes[me] * row
        assert recs == [("reduce_scatter", world, eq, eq, ""),
                        ("reduce_scatter", world, sent, recv, "")]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_all_to_all(ranks, world):
    row = 2 * F32
    for me, (recs, ins, outs) in enumerate(_on(ranks, world, _w_all_to_all)):
        sent = sum(s for j, s in enumerate(ins) if j != me) * row
        recv = sum(s for j, s in enumerate(outs) if j != me) * row
        eq = 2 * (world - 1) * F32
        assert recs == [("all_to_all", world, sent, recv, "")] * 2 + [("all_to_all", world, eq, eq, "")]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_all_reduce(ranks, world):
    base = torch.tensor([1.0, -2.0, 3.0, 0.5])
    scales = torch.arange(1, world + 1, dtype=torch.float32)
    per_rank = base * scales.unsqueeze(1)
    for vals, recs in _on(ranks, world, _w_all_reduce):
        torch.testing.assert_close(torch.tensor(vals["sum"]), per_rank.sum(0))
        torch.testing.assert_close(torch.tensor(vals["avg"]), per_rank.mean(0))
        torch.testing.assert_close(torch.tensor(vals["max"]), per_rank.max(0).values)
        torch.testing.assert_close(torch.tensor(vals["min"]), per_rank.min(0).values)
        n4 = 2 * (world - 1) * 4 * F32 // world
        n8 = 2 * (world - 1) * 8 * F32 // world
        assert recs == [("all_reduce", world, n4, n4, "")] * 4 + [("all_reduce", world, n8, n8, "")]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_broadcast(ranks, world):
    n = 10 * 8  # float64
    for me, recs in enumerate(_on(ranks, world, _w_broadcast)):
        if world == 1:
            want = (0, 0)
        else:
            want = (n, 0) if me == world - 1 else (0, n)
        assert recs == [("broadcast", world, *want, "")]  # barrier is not recorded


def test_ledger_local():
    led = CommLedger()
    c = Comm(ledger=led)
    assert (c.rank, c.size, c.global_rank(0)) == (0, 1, 0)
    c.all_reduce(torch.ones(3))
    with led.tag("fwd"):
        c.all_gather(torch.ones(3))
        with led.tag("inner"):
            c.all_to_all(torch.ones(3))
        c.all_gather(torch.ones(3), async_op=True).wait()
    with led.tag("bwd"):
        h = c.reduce_scatter(torch.ones(3), async_op=True)
    h.wait()  # recorded under the tag active when it was issued
    assert [r.tag for r in led.records] == ["", "fwd", "inner", "fwd", "bwd"]
    s = led.summary()
    assert set(s) == {"all_reduce", "all_gather", "all_to_all", "reduce_scatter"}
    assert s["all_gather"].calls == 2 and s["all_gather"].bytes_sent == 0
    assert set(led.summary("fwd")) == {"all_gather"} and led.summary("fwd")["all_gather"].calls == 2
    assert led.totals().calls == 5 and led.totals("inner").calls == 1
    assert all(r.exposed_s >= 0 for r in led.records)
    led.record("send", 2, 10, 0, 0.5, tag="manual")
    assert led.totals("manual") == OpSummary(1, 10, 0, 0.5)
    assert led.records[-1] == CommRecord("send", 2, 10, 0, 0.5, "manual")
    led.enabled = False
    c.all_reduce(torch.ones(3))
    assert len(led.records) == 6
    led.enabled = True
    led.reset()
    assert led.records == [] and led.totals() == OpSummary()
    rep = led.reduce()  # no process group: this rank only
    assert rep["per_rank"] == [led.local_report()] and rep["max"]["totals"]["calls"] == 0


def test_default_ledger_and_errors():
    assert Comm().ledger is default_ledger()
    before = len(default_ledger().records)
    Comm().all_reduce(torch.ones(2))
    assert len(default_ledger().records) == before + 1
    c = Comm(ledger=CommLedger())
    with pytest.raises(ValueError, match="outside the group"):
        c.send(torch.ones(1), 1)
    with pytest.raises(RuntimeError, match="no pending send"):
        c.recv(torch.ones(1), 0)
    with pytest.raises(ValueError, match="send.*to self"):
        c.exchange([(torch.ones(1), 0)], [])
    with pytest.raises(TypeError, match="floating"):
        c.all_reduce(torch.ones(2, dtype=torch.int64), op="avg")
    with pytest.raises(ValueError, match="sum\\(sizes\\)"):
        c.reduce_scatter(torch.ones(4, 2), sizes=[3])


def test_ledger_reduce_max_and_sum(ranks):
    W = 4
    out = ranks(W, _w_ledger_reduce)
    ar = 2 * (W - 1) * 8 * F32 // W
    ag = 2 * F32 * (W - 1)
    for rep, fwd in out:
        assert len(rep["per_rank"]) == W
        assert [p["ops"]["send"]["calls"] for p in rep["per_rank"]] == [1, 2, 3, 4]
        assert rep["max"]["ops"]["send"] == {"calls": 4, "bytes_sent": 40, "bytes_recv": 0,
                                             "exposed_s": 0.0}
        assert rep["sum"]["ops"]["send"]["bytes_sent"] == 100
        assert rep["max"]["ops"]["all_reduce"]["calls"] == 2
        assert rep["sum"]["ops"]["all_reduce"]["calls"] == 2 * W
        assert rep["max"]["totals"]["calls"] == 7 and rep["sum"]["totals"]["calls"] == 22
        assert rep["sum"]["totals"]["bytes_sent"] == W * (2 * ar + ag) + 100
        assert rep["max"]["totals"]["bytes_sent"] == 2 * ar + ag + 40
        assert rep["max"]["totals"]["bytes_recv"] == 2 * ar + ag
        assert rep["sum"]["ops"]["all_gather"]["bytes_recv"] == W * ag
        assert set(fwd["sum"]["ops"]) == {"all_reduce", "send"}
        assert fwd["sum"]["totals"]["calls"] == 2 * W + 10
    assert out[0][0] == out[3][0]  # every rank sees the same reduction


def test_exposed_time_for_a_late_peer(ranks):
    late, recv_side = ranks(2, _w_delayed_peer)
    ops = [op for op, _ in recv_side]
    assert ops == ["recv", "exchange", "exchange", "all_reduce"]
    _, blocked_recv = recv_side[0]
    _, blocked_wait = recv_side[1]
    _, hidden = recv_side[2]
    _, blocked_ar = recv_side[3]
    assert blocked_recv >= 0.15
    assert blocked_wait >= 0.15
    assert hidden < 0.1  # waited only after the data had arrived
    assert blocked_ar >= 0.15
    assert late[0][0] == "send" and late[0][1] < 0.15  # the late sender itself did not wait


def test_subgroups_use_group_ranks(ranks):
    out = ranks(4, _w_subgroup)
    for g, (glob, buf, s, (me, W)) in enumerate(out):
        assert W == 2 and me == g // 2
        assert glob == ([0, 2] if g % 2 == 0 else [1, 3])
        peer = glob[1 - me]
        assert buf == [float(peer)] * 2
        assert s == float(sum(glob))


def test_group_without_distributed_is_rejected():
    with pytest.raises(RuntimeError, match="not initialised"):
        Comm(group=object())  # type: ignore[arg-type]


def _one_rank_skips_all_reduce():
    import torch.distributed as dist
    from distattn.comm import Comm, CommLedger
    if dist.get_rank() == 0:
        Comm(None, CommLedger()).all_reduce(torch.ones(4))
    else:
        import time
        time.sleep(6)


def test_hung_collective_fails_naming_the_op():
    from distattn.multiproc import RankError, RankPool
    pool = RankPool(2, pg_timeout_s=2)
    try:
        with pytest.raises(RankError, match=r"all_reduce over a group of 2 ranks .* failed after"):
            pool.run(_one_rank_skips_all_reduce, timeout=30)
    finally:
        pool.close(force=True)


class _TorchStyleBackend:
    """A backend object shaped like DeepSpeed's (torch.distributed signatures, global ranks)."""

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)

    def all_gather_into_tensor(self, output_tensor, input_tensor, group=None, async_op=False):
        return dist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)

    def reduce_scatter_tensor(self, output_tensor, input_tensor, op=dist.ReduceOp.SUM, group=None,
                              async_op=False):
        return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)

    def broadcast(self, tensor, src, group=None, async_op=False):
        return dist.broadcast(tensor, src, group=group, async_op=async_op)


def _foreign_calls():
    from distattn.comm import ledgered_backend
    w, me = dist.get_world_size(), dist.get_rank()
    backend, ledger = _TorchStyleBackend(), CommLedger()
    with ledgered_backend(backend, ledger, tag="zero"):
        t = torch.full((6,), float(me + 1))
        backend.all_reduce(t)
        out = torch.empty(w * 4)
        backend.all_gather_into_tensor(out, torch.full((4,), float(me)))
        part = torch.empty(2)
        backend.reduce_scatter_tensor(part, torch.ones(2 * w), group=None)
        b = torch.full((5,), float(me))
        backend.broadcast(b, 1)
    assert "all_reduce" not in backend.__dict__  # the class's methods are back after the block
    values = (t.tolist(), out.tolist(), part.tolist(), b.tolist())
    return values, [(r.op, r.group_size, r.bytes_sent, r.bytes_recv, r.tag) for r in ledger.records]


def test_foreign_backend_calls_are_ledgered(ranks):
    """Byte counts of a foreign backend's collectives follow the module's table (W=3, fp32)."""
    w = 3
    res = ranks(w, _foreign_calls)
    for me, (values, recs) in enumerate(res):
        total = float(sum(range(1, w + 1)))
        assert values == ([total] * 6, [float(r) for r in range(w) for _ in range(4)], [float(w)] * 2,
                          [1.0] * 5)
        bcast = (20, 0) if me == 1 else (0, 20)
        assert recs == [("all_reduce", w, 2 * (w - 1) * 24 // w, 2 * (w - 1) * 24 // w, "zero"),
                        ("all_gather", w, (w - 1) * 16, (w - 1) * 16, "zero"),
                        ("reduce_scatter", w, (w - 1) * 8, (w - 1) * 8, "zero"),
                        ("broadcast", w, *bcast, "zero")]
