"""LASP-2 and LASP-1 on gloo ranks against the dense reference; ledger == formula; hybrid spec.

Tolerances, relative to the largest reference magnitude: ranks compute in fp32
with fp32 states, the reference in fp64 from the same input values. A rank's
result differs from a single-device fp32 computation only by the order of a few
fp32 additions of d_k x d_v states (W terms at most), so the single-device
bound of ~1e-7 relative holds at every W; 2e-6 leaves room while any wrong
prefix, decay power or document reset costs >= 1e-2. bf16: the inputs are the
same bf16 values on both sides; outputs and gradients are rounded to bf16 once
(2^-8 relative), states stay fp32, so 1e-2 holds independent of W.
"""
from __future__ import annotations

import pytest
import torch

import distattn
from distattn.comm import CommLedger
from distattn.kernels.linear import reference_linear_attention
from distattn.schemes.base import AttnShape
from distattn.schemes.hybrid import HybridSpec
from distattn.schemes.lasp1 import Lasp1
from distattn.schemes.lasp2 import Lasp2

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {"fp32": 2e-6, "bf16": 1e-2}
DOCS = [0, 3, 120, 121, 170, 203]  # a document shorter than a chunk, a 1-token one, one across ranks
PER_HEAD = torch.tensor([0.9, 0.7, 0.99, 0.5])  # differs inside GQA groups: 4 state heads
PER_GROUP = torch.tensor([0.9, 0.9, 0.6, 0.6])  # uniform inside groups: 2 state heads (per KV head)
N, H, HKV, D = 203, 4, 2, 8
BLOCK = 16  # local lengths 203/W are not multiples of it


def inputs(n, h, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, h, d, generator=g).to(dtype)
    k = torch.randn(n, hkv, d, generator=g).to(dtype)
    v = torch.randn(n, hkv, d, generator=g).to(dtype)
    do = torch.randn(n, h, d, generator=g).to(dtype)
    return q, k, v, do


# ----------------------------------------------------------------------------- rank side


def run_linear(scheme, n, h, hkv, d, dtype_name, cu, decay, fmap):
    """On each rank: shard, linear attention fwd + bwd; local results, indices and ledger."""
    import torch.distributed as dist
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v, do = inputs(n, h, hkv, d, DTYPES[dtype_name])
    ql, kl, vl, dl = (distattn.shard(x, scheme=scheme, group=group, cu_seqlens=cu) for x in (q, k, v, do))
    ql, kl, vl = (x.requires_grad_(True) for x in (ql, kl, vl))
    ledger = CommLedger()
    out = distattn.linear_attention(ql, kl, vl, scheme=scheme, group=group, cu_seqlens=cu, decay=decay,
                                    feature_map=fmap, ledger=ledger, n_tokens=n)
    out.backward(dl)
    expect = scheme.comm_bytes(AttnShape(n, h, hkv, d, q.element_size(), tuple(cu) if cu else None),
                               world, rank, decay=decay)
    got = {tag: {op: s.bytes_sent for op, s in ledger.summary(tag).items()} for tag in ("fwd", "bwd")}
    return dict(idx=scheme.layout(n, world, cu).indices(rank), out=out.detach(), dq=ql.grad,
                dk=kl.grad, dv=vl.grad, ledger=got, expect={"fwd": expect.fwd, "bwd": expect.bwd},
                dtype_out=str(out.dtype))


def run_causality(scheme, n, cu, cut, decay):
    import torch.distributed as dist
    group = dist.group.WORLD
    outs = []
    for perturb in (False, True):
        q, k, v, _ = inputs(n, H, HKV, D, torch.float32)
        if perturb:
            for x in (q, k, v):
                x[cut:] = torch.randn_like(x[cut:]) * 3
        ql, kl, vl = (distattn.shard(x, scheme=scheme, group=group, cu_seqlens=cu) for x in (q, k, v))
        outs.append(distattn.linear_attention(ql, kl, vl, scheme=scheme, group=group, cu_seqlens=cu,
                                              decay=decay, feature_map="elu1", n_tokens=n))
    return scheme.layout(n, dist.get_world_size(), cu).indices(dist.get_rank()), outs[0], outs[1]


def run_hybrid(spec: HybridSpec, n, cu, decay):
    """A two-layer "NL" stack: softmax attention, then linear attention on its output."""
    import torch.distributed as dist
    group = dist.group.WORLD
    soft, lin = spec.for_pattern("NL")
    q, k, v, do = inputs(n, H, HKV, D, torch.float32)
    ql, kl, vl, dl = (distattn.shard(x, scheme=soft, group=group, cu_seqlens=cu) for x in (q, k, v, do))
    ql, kl, vl = (x.requires_grad_(True) for x in (ql, kl, vl))
    h1 = distattn.attention(ql, kl, vl, scheme=soft, group=group, cu_seqlens=cu, n_tokens=n)
    out = distattn.linear_attention(h1, kl, vl, scheme=lin, group=group, cu_seqlens=cu, decay=decay,
                                    n_tokens=n)
    out.backward(dl)
    return soft.layout(n, dist.get_world_size(), cu).indices(dist.get_rank()), out.detach(), ql.grad, \
        kl.grad, vl.grad


# ----------------------------------------------------------------------------- checks


def rel_err(got, ref, scale=None) -> float:
    """Max abs error relative to the largest reference magnitude (of `scale` if given)."""
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape
    if got.numel() == 0:
        return 0.0
    top = (ref if scale is None else scale.detach().double()).abs().max().clamp_min(1e-30)
    return float((got - ref).abs().max() / top)


def reference(n, cu, decay, fmap, dtype=torch.float32):
    q, k, v, do = inputs(n, H, HKV, D, dtype)
    qr, kr, vr = (x.double().requires_grad_(True) for x in (q, k, v))
    ref = reference_linear_attention(qr, kr, vr, cu, decay, fmap)
    ref.backward(do.double())
    return ref.detach(), qr.grad, kr.grad, vr.grad


def check(ranks, scheme, world, cu, decay, fmap, dtype="fp32", n=N):
    res = ranks(world, run_linear, scheme, n, H, HKV, D, dtype, cu, decay, fmap)
    want = reference(n, cu, decay, fmap, DTYPES[dtype])
    for r in res:
        idx = r["idx"]
        assert r["dtype_out"] == str(DTYPES[dtype])
        for name, got, full in zip(("out", "dq", "dk", "dv"), (r["out"], r["dq"], r["dk"], r["dv"]), want):
            err = rel_err(got, full[idx], full)
            assert err < TOL[dtype], (name, err)
        for tag in ("fwd", "bwd"):  # every byte counted: the ledger equals the scheme's formula
            got = {op: b for op, b in r["ledger"][tag].items() if b or op in r["expect"][tag]}
            exp = {op: b for op, b in r["expect"][tag].items() if b or op in got}
            assert got == exp, (tag, got, exp)
    return res


CASES = [  # id, scheme, world, cu_seqlens, decay, feature map, dtype
    ("lasp2-contig-w1", Lasp2(block=BLOCK), 1, DOCS, PER_GROUP, None, "fp32"),
    ("lasp2-contig-w2-lam1", Lasp2(block=BLOCK), 2, DOCS, None, None, "fp32"),
    ("lasp2-contig-w4", Lasp2(block=BLOCK), 4, DOCS, 0.9, "elu1", "fp32"),
    ("lasp2-zigzag-w2", Lasp2("zigzag", BLOCK), 2, None, PER_HEAD, None, "fp32"),
    ("lasp2-zigzag-w4", Lasp2("zigzag", BLOCK), 4, DOCS, PER_GROUP, "elu1", "fp32"),
    ("lasp2-zigzag-w4-lam1", Lasp2("zigzag", BLOCK), 4, None, None, None, "fp32"),
    ("lasp2-doczigzag-w4", Lasp2("doc_zigzag", BLOCK), 4, DOCS, PER_HEAD, None, "fp32"),
    ("lasp2-weighted-w2", Lasp2("weighted", BLOCK), 2, DOCS, 0.95, None, "fp32"),
    ("lasp2-zigzag-w4-bf16", Lasp2("zigzag", BLOCK), 4, DOCS, 0.9, "elu1", "bf16"),
    ("lasp1-w2", Lasp1(block=BLOCK), 2, DOCS, 0.9, None, "fp32"),
    ("lasp1-w4", Lasp1(block=BLOCK), 4, DOCS, PER_HEAD, "elu1", "fp32"),
    ("lasp1-w4-lam1", Lasp1(block=BLOCK), 4, None, None, None, "fp32"),
    ("lasp1-w2-bf16", Lasp1(block=BLOCK), 2, None, PER_GROUP, None, "bf16"),
]


@pytest.mark.parametrize("scheme,world,cu,decay,fmap,dtype", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_exact(ranks, scheme, world, cu, decay, fmap, dtype):
    check(ranks, scheme, world, cu, decay, fmap, dtype)


def _sent(res) -> list[int]:
    return [sum(r["ledger"]["fwd"].values()) + sum(r["ledger"]["bwd"].values()) for r in res]


@pytest.mark.parametrize("world", [2, 4])
def test_ledger_bytes_are_flat_in_n(ranks, world):
    state = HKV * D * D * 4  # one fp32 d x d state per KV head (no decay: states shared per KV head)
    # zigzag: two chunks per rank, two state slots; at W = 2 rank 1's chunks 1 and 2 touch and
    # form one run, so every rank needs one slot each way
    zigzag_slots = 2 if world > 2 else 1
    for scheme, slots in ((Lasp2(block=BLOCK), 1), (Lasp2("zigzag", BLOCK), zigzag_slots)):
        for n in (128, 256):
            res = ranks(world, run_linear, scheme, n, H, HKV, D, "fp32", None, None, None)
            # one all_gather each way: (W-1) x slots x state, forward + backward
            assert scheme.slots(n, world) == (slots, slots)
            assert _sent(res) == [2 * (world - 1) * slots * state] * world, (scheme, n)
    res = ranks(world, run_linear, Lasp1(block=BLOCK), 128, H, HKV, D, "fp32", None, None, None)
    # lasp1: one state forward (all but the last rank), one backward (all but the first)
    assert _sent(res) == [state * ((r < world - 1) + (r > 0)) for r in range(world)]


@pytest.mark.parametrize("scheme,cu", [(Lasp2("zigzag", BLOCK), None), (Lasp2("doc_zigzag", BLOCK), DOCS),
                                       (Lasp1(block=BLOCK), DOCS)], ids=["lasp2-zigzag",
                                                                        "lasp2-doczigzag", "lasp1"])
def test_causality_is_bitwise(ranks, scheme, cu):
    cut = 150
    changed = 0
    for idx, a, b in ranks(4, run_causality, scheme, N, cu, cut, 0.9):
        keep = idx < cut
        assert torch.equal(a[keep], b[keep])
        changed += int((a[~keep] != b[~keep]).any())
    assert changed > 0


def test_intra_compute_overlaps_the_gather(monkeypatch):
    """The gather is posted before the local work and waited after it (forward and backward)."""
    import distattn.schemes.lasp2 as mod
    from distattn.layout import get_layout

    events: list[str] = []

    class FakeHandle:
        def __init__(self, t, world):
            self.out = torch.stack([t] * world)

        def wait(self):
            events.append("wait")
            return self.out

    class FakeComm:
        rank, size, ledger = 1, 2, CommLedger()

        def all_gather(self, t, async_op=False):
            events.append("post")
            return FakeHandle(t, self.size)

    for fn in ("chunk_forward", "chunk_backward"):
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _real=real, _fn=fn, **kw: (events.append(_fn),
                                                                            _real(*a, **kw))[1])
    lay = get_layout("zigzag", 64, 2)
    q = torch.randn(32, 2, 4, requires_grad=True)
    out = mod.lasp2_attention(q, q, q, comm=FakeComm(), peer_runs=[lay.runs(r) for r in range(2)],
                              cu_seqlens=lay.cu_seqlens, decay=0.9)
    out.sum().backward()
    assert events == ["post", "chunk_forward", "wait", "post", "chunk_backward", "wait"]


def test_lasp1_refuses_other_layouts():
    with pytest.raises(ValueError, match="lasp1 supports only the contiguous layout"):
        Lasp1(layout_name="zigzag")
    with pytest.raises(ValueError, match="layout_name must be one of"):
        Lasp2(layout_name="spiral")


# ----------------------------------------------------------------------------- hybrid


def test_hybrid_spec_shares_one_layout():
    spec = HybridSpec(linear="lasp2", softmax="allgather", layout="zigzag")
    lin, soft = spec.scheme_for("linear"), spec.scheme_for("N")
    assert lin.kind == "linear" and soft.kind == "softmax"
    assert lin.layout_name == soft.layout_name == "zigzag"
    assert spec.for_pattern("LLLN") == [lin, lin, lin, soft]
    spec.check(4096, 4, [0, 1000, 4096])
    ring = HybridSpec(softmax="ring", layout="doc_zigzag", linear_options={"block": 32})
    assert ring.scheme_for("L").block == 32 and ring.scheme_for("softmax").layout_name == "doc_zigzag"


def test_hybrid_spec_refuses_mismatches():
    with pytest.raises(ValueError, match="uses layout 'contiguous' but the hybrid layout is 'zigzag'"):
        HybridSpec(softmax=distattn.get_scheme("allgather", layout_name="contiguous"), layout="zigzag")
    with pytest.raises(ValueError, match="lasp1 supports only the contiguous layout"):
        HybridSpec(linear="lasp1", layout="zigzag")
    with pytest.raises(ValueError, match="is a softmax scheme"):
        HybridSpec(linear="ring")
    with pytest.raises(ValueError, match="is a linear scheme"):
        HybridSpec(softmax="lasp2")
    with pytest.raises(ValueError, match="layer kind must be one of"):
        HybridSpec().scheme_for("X")
    with pytest.raises(ValueError, match="layer pattern"):
        HybridSpec().for_pattern("LLMN")
    # usp with ulysses > 1 names zigzag but realises another token placement
    spec = HybridSpec(softmax=distattn.get_scheme("usp", ulysses=2), layout="zigzag")
    with pytest.raises(ValueError, match="rank .* would hold"):
        spec.check(256, 4)


def test_hybrid_stack_is_exact(ranks):
    spec = HybridSpec(linear="lasp2", softmax="allgather", layout="zigzag",
                      linear_options={"block": BLOCK})
    decay = 0.9
    res = ranks(2, run_hybrid, spec, N, DOCS, decay)
    q, k, v, do = inputs(N, H, HKV, D, torch.float32)
    qr, kr, vr = (x.double().requires_grad_(True) for x in (q, k, v))
    h1 = distattn.kernels.reference_attention(qr, kr, vr, DOCS).double()
    ref = reference_linear_attention(h1, kr, vr, DOCS, decay)
    ref.backward(do.double())
    for idx, out, dq, dk, dv in res:
        for got, want in ((out, ref), (dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
            assert rel_err(got, want[idx]) < 2e-5  # softmax side in fp32: 3e-5-level agreement


# ----------------------------------------------------------------------------- benchmark


def test_bench_smoke(ranks, capsys):
    from distattn.bench.linear import LinearBenchSpec, format_table, run_linear_bench
    from distattn.cli import main as cli_main

    spec = LinearBenchSpec(lengths=[128, 256], worlds=[2], heads=4, kv_heads=2, head_dim=8, iters=1,
                           warmup=0, block=16, softmax_max_len=128)
    rows = run_linear_bench(spec, pools={2: ranks.pool(2)})
    got = {(r.scheme, r.n_tokens): r for r in rows}
    assert ("ring", 256) not in got and ("allgather", 128) in got  # softmax capped at 128 tokens
    state = 2 * 8 * 8 * 4
    assert got[("lasp2", 128)].bytes_per_rank == got[("lasp2", 256)].bytes_per_rank == 2 * state
    assert got[("lasp1", 256)].bytes_per_rank == state
    assert all(r.cpu_s > 0 and r.wall_s > 0 for r in rows)
    assert "lasp2 vs lasp1" in format_table(rows, spec)
    assert cli_main(["bench", "linear", "--lengths", "64", "--worlds", "1", "--schemes", "lasp2",
                     "--set", "bench.iters=1", "--set", "bench.warmup=0", "--set", "bench.heads=2",
                     "--set", "bench.kv_heads=2", "--set", "bench.head_dim=8"]) == 0
    assert "lasp2" in capsys.readouterr().out


def test_bench_delta_rule_bytes_are_the_schemes(ranks):
    from distattn.bench.linear import LinearBenchSpec, run_linear_bench
    from distattn.schemes import get_scheme
    from distattn.schemes.base import AttnShape

    spec = LinearBenchSpec(lengths=[96, 192], worlds=[2], heads=2, kv_heads=2, head_dim=8, iters=1, warmup=0,
                           rule="kda", schemes=["lasp2", "lasp1"])
    rows = run_linear_bench(spec, pools={2: ranks.pool(2)})
    for r in rows:
        want = [get_scheme(r.scheme).comm_bytes(AttnShape(r.n_tokens, 2, 2, 8), 2, rank, rule="kda").total
                for rank in range(2)]
        assert r.bytes_per_rank == max(want) > 0, r
    with pytest.raises(ValueError, match=r"rule=kda shares q, k and v heads: set kv_heads equal to heads \(4\)"):
        LinearBenchSpec(heads=4, kv_heads=2, rule="kda")


def test_lasp2_rank_with_no_tokens(ranks):
    # documents shorter than 2W leave ranks 2 and 3 empty under doc_zigzag
    check(ranks, Lasp2("doc_zigzag", BLOCK), 4, [0, 2, 4, 6, 9], 0.9, None, n=9)
