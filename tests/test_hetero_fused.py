"""The fused path of `hetero` (one masked kernel call per head class and KV group) on CPU.

flex_attention has no backward on CPU, so the fused path runs here with its
reference kernel (dense masked fp32 attention from the same mask function):
- mask: per class and rank, the mask function over (my query rows) x (own | fetched
  virtual key rows) is exactly the pairs the blockwise calls cover; the BlockMask
  built from it tile by tile equals torch's create_block_mask;
- exactness: forward and q/k/v gradients equal the blockwise path (GQA kv and q
  patterns, dense heads, documents, odd lengths, causal and not, zigzag and
  contiguous layouts, W = 2 and 4), and the ledger equals `comm_bytes`;
- flex_attention's forward on CPU with the BlockMask (no gradients) equals the
  blockwise path through `distattn.attention`;
- selection: DISTATTN_HETERO_KERNEL, its errors and its log line, and the flex API it needs;
- on a CUDA machine only (skipped elsewhere): compiled flex forward and backward equal the
  blockwise path at W = 1, fp32 and bf16.
"""
from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

import distattn
from distattn.comm import CommLedger
from distattn.schemes import hetero_fused as hf
from distattn.schemes.base import AttnShape
from distattn.schemes.hetero import Hetero
from schemes_util import DTYPES, full_inputs

FP32 = dict(atol=3e-5, rtol=3e-4)
BF16 = dict(atol=2e-2, rtol=2e-2)
DOCS = [0, 3, 120, 121, 170, 203]
CPU = torch.device("cpu")

CASES = {
    # name: (scheme options, N, H, Hkv, cu_seqlens, causal)
    "kv-docs": (dict(block=8, local_blocks=2, stride=4), 203, 8, 4, DOCS, True),
    "q-gqa": (dict(block=8, local_blocks=1, stride=3, offset=1, gqa_pattern="q"), 203, 8, 2, DOCS, True),
    "dense-head-contig": (dict(block=16, local_blocks=2, stride=4, dense_heads=1, head_step=1,
                               layout_name="contiguous"), 160, 4, 4, None, True),
    "noncausal-docs": (dict(block=8, local_blocks=2, stride=4, layout_name="doc_zigzag"),
                       203, 8, 4, DOCS, False),
}


# ----------------------------------------------------------------------------- masks

@pytest.fixture
def one_thread():
    """Elementwise ops on ~1M-element masks: one thread beats two on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _calls_mask(plan, cls) -> torch.Tensor:
    """[Tq, Tk] bool: the pairs the blockwise calls of `cls` cover, own buffer then fetched."""
    m = hf.class_mask(plan, cls, CPU)
    out = torch.zeros(m.tq, m.tk, dtype=torch.bool)
    for calls, shift in ((plan.calls_own[cls], 0), (plan.calls_rem[cls], m.tk_own)):
        for c in calls:
            blk = torch.ones(c.q1 - c.q0, c.k1 - c.k0, dtype=torch.bool)
            if c.causal:
                blk = torch.tril(blk)
            assert not out[c.q0:c.q1, shift + c.k0:shift + c.k1][blk].any()  # calls never overlap
            out[c.q0:c.q1, shift + c.k0:shift + c.k1] |= blk
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_mask_function_is_the_blockwise_calls(case, world, one_thread):
    opts, n, h, hkv, cu, causal = CASES[case]
    scheme = Hetero(**opts)
    for rank in range(world):
        plan = scheme.plan(n, h, hkv, world, rank, cu, causal)
        for c in plan.classes:
            m = hf.class_mask(plan, c, CPU)
            assert m.tq == plan.sizes[rank]
            assert m.tk == len(plan.idx_own[c]) + next(
                (len(t) for (cc, _), t in plan.idx_rem.items() if cc == c), 0)
            assert torch.equal(m.dense(), _calls_mask(plan, c)), (rank, c)


@pytest.mark.parametrize("causal", [True, False])
def test_block_mask_equals_create_block_mask(causal, one_thread):
    from torch.nn.attention.flex_attention import create_block_mask
    scheme = Hetero(block=32, local_blocks=2, stride=4, layout_name="zigzag")
    n, cu = 1501, [0, 300, 301, 1250, 1501]
    for rank in range(2):
        plan = scheme.plan(n, 8, 4, 2, rank, cu, causal)
        for c in plan.classes:
            m = hf.class_mask(plan, c, CPU)
            want = create_block_mask(m.mask_mod, None, None, m.tq, m.tk, device="cpu")
            got = m.block_mask()
            assert got is m.block_mask()  # built once
            assert got.seq_lengths == (m.tq, m.tk)
            for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
                assert torch.equal(getattr(got, name), getattr(want, name)), name
            assert torch.equal(got.to_dense(), want.to_dense())
            partial, full = m.tiles()
            banded = m.tiles(max_elems=1)  # one query tile at a time
            assert torch.equal(banded[0], partial) and torch.equal(banded[1], full)
            assert partial.sum() + full.sum() < partial.numel()  # sparse at the tile level
    assert hf.class_mask(plan, c, CPU) is m  # cached with the plan


def test_block_mask_computes_close_to_the_mask_pairs(one_thread):
    """The virtual key order keeps each query tile's visible keys in few ranges, so the tiles
    flex computes hold little more than the visible pairs (a property of the plan, not a speed)."""
    scheme = Hetero(block=64, local_blocks=2, stride=4)
    n, world = 4096, 2
    plan = scheme.plan(n, 8, 8, world, 0)
    tiles = 0
    for c in plan.classes:
        partial, full = hf.class_mask(plan, c, CPU).tiles()
        work = int(partial.sum() + full.sum()) * hf.TILE ** 2
        assert plan.pairs_by_class[c] <= work <= 1.4 * plan.pairs_by_class[c], c
        tiles += work * plan.q_heads_of[c]
    dense = scheme.layout(n, world).cost(0) * 8
    assert plan.pairs / dense < 0.35 and tiles / dense < 0.45


# ----------------------------------------------------------------------------- exactness

def _run_path(scheme, n, h, hkv, d, dtype_name, cu, causal, fused: bool):
    """On each rank: fwd + bwd through the blockwise path, or the fused one (reference kernel)."""
    import torch.distributed as dist

    from distattn.kernels.softmax import default_scale
    from distattn.schemes.base import make_comm
    dtype = DTYPES[dtype_name]
    q, k, v, dout = full_inputs(n, h, hkv, d, dtype)
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    ql, kl, vl, dl = (distattn.shard(x, scheme=scheme, group=group, cu_seqlens=cu) for x in (q, k, v, dout))
    ql, kl, vl = (x.requires_grad_(True) for x in (ql, kl, vl))
    ledger = CommLedger()
    if fused:
        comm = make_comm(group, ledger)
        plan = scheme.plan(n, h, hkv, world, rank, cu, causal)
        out = hf.fused_attention(ql, kl, vl, comm, plan, default_scale(d, None), hf.reference_kernel)
    else:
        out = distattn.attention(ql, kl, vl, scheme=scheme, group=group, cu_seqlens=cu, causal=causal,
                                 ledger=ledger, n_tokens=n)
    out.backward(dl)
    expect = scheme.comm_bytes(AttnShape(n, h, hkv, d, q.element_size(), tuple(cu) if cu else None),
                               world, rank, causal=causal)
    got = {tag: {op: s.bytes_sent for op, s in ledger.summary(tag).items()} for tag in ("fwd", "bwd")}
    return dict(out=out.detach(), dq=ql.grad, dk=kl.grad, dv=vl.grad, dtype=out.dtype, ledger=got,
                expect={"fwd": expect.fwd, "bwd": expect.bwd})


def _compare(ranks, world, scheme, n, h, hkv, cu, causal, dtype="fp32"):
    args = (scheme, n, h, hkv, 16, dtype, cu, causal)
    blocks = ranks(world, _run_path, *args, False)
    fused = ranks(world, _run_path, *args, True)
    tol = FP32 if dtype == "fp32" else BF16
    for b, f in zip(blocks, fused):
        assert f["dtype"] == b["dtype"] == DTYPES[dtype]
        for t in ("out", "dq", "dk", "dv"):
            torch.testing.assert_close(f[t].float(), b[t].float(), **tol)
        assert f["ledger"] == f["expect"] == b["ledger"], (f["ledger"], f["expect"], b["ledger"])
    return fused


@pytest.mark.parametrize("case,world", [("kv-docs", 2), ("kv-docs", 4), ("q-gqa", 2),
                                        ("dense-head-contig", 2), ("noncausal-docs", 2)])
def test_fused_equals_blocks(ranks, case, world):
    opts, n, h, hkv, cu, causal = CASES[case]
    res = _compare(ranks, world, Hetero(**opts), n, h, hkv, cu, causal)
    sent_home = [sum(r["ledger"]["bwd"].values()) for r in res]
    assert sum(sent_home) > 0  # gradients did go home
    if opts.get("layout_name") == "contiguous":
        assert sent_home[0] == 0  # rank 0 fetched nothing, yet it takes its dK/dV from rank 1


def test_fused_equals_blocks_bf16_single_document(ranks):
    _compare(ranks, 2, Hetero(block=16, local_blocks=2, stride=4), 250, 8, 4, None, True, "bf16")


# ----------------------------------------------------------------------------- flex on CPU

def _flex_forward(scheme, n, h, hkv, d, cu, causal):
    """distattn.attention under no_grad with DISTATTN_HETERO_KERNEL=flex (eager flex on CPU), and blocks."""
    import torch.distributed as dist
    q, k, v, _ = full_inputs(n, h, hkv, d, torch.float32)
    group = dist.group.WORLD
    ql, kl, vl = (distattn.shard(x, scheme=scheme, group=group, cu_seqlens=cu) for x in (q, k, v))
    outs, ledgers = {}, {}
    old = os.environ.get(hf.ENV)
    try:
        for kind in ("blocks", "flex"):
            os.environ[hf.ENV] = kind
            ledger = CommLedger()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # eager flex's "use torch.compile" note
                outs[kind] = distattn.attention(ql, kl, vl, scheme=scheme, group=group, cu_seqlens=cu,
                                                causal=causal, ledger=ledger, n_tokens=n)
            ledgers[kind] = {op: s.bytes_sent for op, s in ledger.summary("fwd").items()}
    finally:
        os.environ.pop(hf.ENV, None) if old is None else os.environ.__setitem__(hf.ENV, old)
    return outs, ledgers


@pytest.mark.parametrize("case", ["kv-docs", "q-gqa", "noncausal-docs"])
def test_flex_forward_on_cpu_equals_blocks(ranks, case):
    opts, n, h, hkv, cu, causal = CASES[case]
    for outs, ledgers in ranks(2, _flex_forward, Hetero(**opts), n, h, hkv, 16, cu, causal):
        torch.testing.assert_close(outs["flex"], outs["blocks"], **FP32)
        assert ledgers["flex"] == ledgers["blocks"]


# ----------------------------------------------------------------------------- selection

def test_kernel_choice(monkeypatch, caplog):
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    monkeypatch.delenv(hf.ENV, raising=False)
    assert hf.hetero_kernel(CPU, True) == "blocks"
    assert hf.hetero_kernel(cuda, True) == ("flex" if hf.flex_available() else "blocks")
    monkeypatch.setenv(hf.ENV, "blocks")
    assert hf.hetero_kernel(cuda, True) == "blocks"
    monkeypatch.setenv(hf.ENV, "flex")
    assert hf.hetero_kernel(cuda, True) == "flex"
    assert hf.hetero_kernel(CPU, False) == "flex"  # forward only: eager flex runs on CPU
    with pytest.raises(ValueError, match=r"DISTATTN_HETERO_KERNEL=flex: flex_attention has no backward "
                                         r"on cpu.*auto or blocks"):
        hf.hetero_kernel(CPU, True)
    monkeypatch.setenv(hf.ENV, "fused")
    with pytest.raises(ValueError, match=r"DISTATTN_HETERO_KERNEL='fused' is not a hetero kernel; "
                                         r"use one of auto, blocks, flex"):
        hf.hetero_kernel(CPU, True)
    # the choice is logged once per (kind, device)
    hf._log_choice.cache_clear()
    monkeypatch.setenv(hf.ENV, "auto")
    with caplog.at_level(logging.INFO, logger="distattn"):
        for _ in range(3):
            hf.hetero_kernel(CPU, True)
    lines = [r.getMessage() for r in caplog.records if r.name == "distattn"]
    assert lines == ["hetero attention on cpu: blockwise kernel calls"]


def test_flex_needs_the_block_mask_api(monkeypatch, caplog):
    """A torch whose BlockMask.from_kv_blocks lacks seq_lengths cannot run the masks here
    (their lengths are not whole tiles): auto stays blockwise on CUDA and says why; flex refuses."""
    from types import SimpleNamespace

    class Old:
        @classmethod
        def from_kv_blocks(cls, kv_num_blocks, kv_indices, full_kv_num_blocks=None,
                           full_kv_indices=None, BLOCK_SIZE=128, mask_mod=None):
            pass

    class New(Old):
        @classmethod
        def from_kv_blocks(cls, kv_num_blocks, kv_indices, BLOCK_SIZE=128, seq_lengths=None):
            pass

    def flex_attention():
        pass

    assert hf._has_flex_api(SimpleNamespace(BlockMask=New, flex_attention=flex_attention))
    assert not hf._has_flex_api(SimpleNamespace(BlockMask=Old, flex_attention=flex_attention))
    assert not hf._has_flex_api(SimpleNamespace(flex_attention=flex_attention))
    assert not hf._has_flex_api(SimpleNamespace(BlockMask=New))

    monkeypatch.setattr(hf, "_flex_api", lambda: None)
    monkeypatch.delenv(hf.ENV, raising=False)
    hf._log_choice.cache_clear()
    with caplog.at_level(logging.INFO, logger="distattn"):
        assert hf.hetero_kernel(torch.device("cuda"), True) == "blocks"
    line, = [r.getMessage() for r in caplog.records if r.name == "distattn"]
    assert line.startswith("hetero attention on cuda: blockwise kernel calls (torch ")
    assert "no flex_attention with the BlockMask API" in line
    monkeypatch.setenv(hf.ENV, "flex")
    with pytest.raises(ValueError, match=r"DISTATTN_HETERO_KERNEL=flex needs .*from_kv_blocks\(seq_lengths"):
        hf.hetero_kernel(torch.device("cuda"), True)
    hf._log_choice.cache_clear()


# ----------------------------------------------------------------------------- CUDA (skipped without)

def _cuda_paths(scheme, n, h, hkv, d, dtype_name, cu, causal):
    """On one rank, CUDA tensors: fwd + bwd through DISTATTN_HETERO_KERNEL=blocks and =flex."""
    import torch.distributed as dist
    dev = torch.device("cuda")
    q, k, v, dout = (x.to(dev) for x in full_inputs(n, h, hkv, d, DTYPES[dtype_name]))
    res = {}
    old = os.environ.get(hf.ENV)
    try:
        for kind in ("blocks", "flex"):
            os.environ[hf.ENV] = kind
            a, b, c = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
            out = distattn.attention(a, b, c, scheme=scheme, group=dist.group.WORLD, cu_seqlens=cu,
                                     causal=causal, n_tokens=n)
            out.backward(dout)
            res[kind] = [x.detach().float().cpu() for x in (out, a.grad, b.grad, c.grad)]
    finally:
        os.environ.pop(hf.ENV, None) if old is None else os.environ.__setitem__(hf.ENV, old)
    return res


@pytest.mark.skipif(not torch.cuda.is_available() or not hf.flex_available(),
                    reason="needs a CUDA device and flex_attention")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case", ["kv-docs", "q-gqa", "noncausal-docs"])
def test_cuda_flex_equals_blocks(ranks, case, dtype):
    opts, n, h, hkv, cu, causal = CASES[case]
    res, = ranks(1, _cuda_paths, Hetero(**opts), n, h, hkv, 64, dtype, cu, causal, timeout=600)
    tol = dict(atol=1e-4, rtol=1e-3) if dtype == "fp32" else BF16
    for name, got, want in zip(("out", "dq", "dk", "dv"), res["flex"], res["blocks"]):
        torch.testing.assert_close(got, want, **tol, msg=lambda m, name=name: f"{name}: {m}")
