"""Heterogeneous per-head context shards (scheme `hetero`) and uneven (weighted) shards.

- coverage: the union of the per-head block masks is the causal block mask
  (GQA "kv" and "q" patterns, stride offsets, dense heads, head slicing), and a
  pattern that cannot cover is refused unless partial coverage is allowed;
- exactness: forward and q/k/v gradients equal a dense fp32 reference with the
  same per-head token mask at W = 1, 2, 4 (fp32 tolerances as in test_schemes);
- work: the pairs the kernels compute equal the mask's pairs exactly, and the
  bytes in the ledger equal the K/V rows the mask needs from other ranks exactly
  (so both fractions equal the mask densities), and equal `comm_bytes`;
- uneven devices: ring and allgather with the weighted layout, weights (2, 1);
- `distattn bench hetero`'s runner on CPU, and the runs it refuses (device, kernel).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distattn
from distattn.comm import CommLedger
from distattn.config import ConfigError, load_config
from distattn.kernels import reference_attention
from distattn.kernels.sparse import HeteroPattern, layer_is_dense, masked_reference
from distattn.schemes.base import AttnShape
from distattn.schemes.hetero import Hetero
from schemes_util import DTYPES, full_inputs
from test_schemes import check

FP32 = dict(atol=3e-5, rtol=3e-4)
BF16 = dict(atol=2e-2, rtol=2e-2)
DOCS = [0, 3, 120, 121, 170, 203]  # odd lengths, a 1-token document, one spanning all ranks


# ----------------------------------------------------------------------------- coverage

PATTERNS = {
    # name: (pattern options, heads, kv_heads)
    "kv": (dict(block=16, local_blocks=2, stride=4), 8, 4),
    "kv-offset": (dict(block=16, local_blocks=1, stride=3, head_step=2, offset=1), 6, 3),
    "q": (dict(block=16, local_blocks=2, stride=4, gqa_pattern="q"), 8, 2),
    "dense-head": (dict(block=16, local_blocks=1, stride=8, dense_heads=1), 8, 4),
}


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("causal", [True, False])
def test_union_of_heads_is_the_full_mask(name, causal):
    opts, h, hkv = PATTERNS[name]
    pat = HeteroPattern(**opts)
    pat.check_coverage(h, hkv)
    nb = 37
    bm = pat.block_mask(nb, h, hkv, causal)
    full = torch.ones(nb, nb, dtype=torch.bool)
    full = torch.tril(full) if causal else full
    assert torch.equal(bm.any(0), full)
    assert not (bm & ~full).any()
    sparse = [hh for hh, c in enumerate(pat.head_classes(h, hkv)) if c is not None]
    assert all(bm[hh].sum() < full.sum() for hh in sparse)  # each sparse head really is sparse
    # GQA: with gqa_pattern="kv" the query heads of a KV group share its mask
    if pat.gqa_pattern == "kv":
        rep = h // hkv
        for hh in range(h):
            assert torch.equal(bm[hh], bm[hh // rep * rep])
    # head slicing (a rank holding heads [h0, h1)): its masks are the full ones' rows
    for parts in (2, h):
        cuts = [i * h // parts for i in range(parts + 1)]
        union = torch.zeros(nb, nb, dtype=torch.bool)
        for h0, h1 in zip(cuts, cuts[1:]):
            sl = pat.block_mask(nb, h, hkv, causal, head_range=(h0, h1))
            assert torch.equal(sl, bm[h0:h1])
            union |= sl.any(0)
        assert torch.equal(union, full)
    # token level, with documents: union over heads is the document (causal) mask
    tm = pat.token_mask(203, h, hkv, DOCS, causal)
    from distattn.kernels import document_mask
    assert torch.equal(tm.any(0), document_mask(203, DOCS, causal))


def test_pattern_rule_is_pinned():
    # S2 rule: key block j is on head p's stride iff (j + p*head_step + offset) % stride == 0
    pat = HeteroPattern(block=4, local_blocks=2, stride=4, head_step=1, offset=1)
    bm = pat.block_mask(12, 4, 4)
    i = 11
    for p in range(4):
        seen = {j for j in range(12) if bm[p, i, j]}
        want = {j for j in range(12) if (j + p + 1) % 4 == 0} | {10, 11}
        assert seen == want, (p, seen, want)
    assert pat.step(8, 8) == 1 and HeteroPattern(stride=8).step(2, 2) == 4  # auto step


def test_partial_coverage_is_refused_unless_allowed():
    s = Hetero(block=16, stride=8)
    with pytest.raises(ValueError, match=r"does not cover.*allow_partial_coverage=True"):
        s.validate(heads=8, kv_heads=4, world=2)
    with pytest.raises(ValueError, match="does not cover"):
        Hetero(block=16, stride=4, gqa_pattern="kv").validate(heads=8, kv_heads=2, world=1)
    Hetero(block=16, stride=4, gqa_pattern="q").validate(heads=8, kv_heads=2, world=1)  # q heads cover
    ok = Hetero(block=16, stride=8, allow_partial_coverage=True)
    ok.validate(heads=8, kv_heads=4, world=2)
    bm = ok.pattern.block_mask(40, 8, 4)
    assert not torch.equal(bm.any(0), torch.tril(torch.ones(40, 40, dtype=torch.bool)))
    with pytest.raises(ValueError, match="dense_heads=5 exceeds"):
        Hetero(dense_heads=5).validate(heads=8, kv_heads=4, world=1)
    with pytest.raises(ValueError, match="gqa_pattern"):
        Hetero(gqa_pattern="x")
    with pytest.raises(ValueError, match="block must be"):
        Hetero(block=0)


def test_masked_reference_matches_reference_attention():
    q, k, v, _ = full_inputs(203, 8, 2, 16, torch.float32)
    dense = HeteroPattern(block=8, dense_heads=2)  # every pattern (KV) head dense
    mask = dense.token_mask(203, 8, 2, DOCS)
    torch.testing.assert_close(masked_reference(q, k, v, mask), reference_attention(q, k, v, DOCS),
                               atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- exactness

def _run(scheme, n, h, hkv, d, dtype_name, cu, causal):
    """On each rank: shard, hetero fwd+bwd; local results, ledger and plan accounting."""
    import torch.distributed as dist
    dtype = DTYPES[dtype_name]
    q, k, v, dout = full_inputs(n, h, hkv, d, dtype)
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    lay = scheme.layout(n, world, cu)
    ql, kl, vl, dl = (distattn.shard(x, scheme=scheme, group=group, cu_seqlens=cu) for x in (q, k, v, dout))
    ql, kl, vl = (x.requires_grad_(True) for x in (ql, kl, vl))
    ledger = CommLedger()
    out = distattn.attention(ql, kl, vl, scheme=scheme, group=group, cu_seqlens=cu, causal=causal,
                             ledger=ledger, n_tokens=n)
    out.backward(dl)
    expect = scheme.comm_bytes(AttnShape(n, h, hkv, d, q.element_size(), tuple(cu) if cu else None),
                               world, rank, causal=causal)
    plan = scheme.plan(n, h, hkv, world, rank, cu, causal)
    got = {tag: {op: s.bytes_sent for op, s in ledger.summary(tag).items()} for tag in ("fwd", "bwd")}
    return dict(idx=lay.indices(rank), out=out.detach(), dq=ql.grad, dk=kl.grad, dv=vl.grad,
                ledger=got, expect={"fwd": expect.fwd, "bwd": expect.bwd}, pairs=plan.pairs,
                fetched=plan.fetched_rows(), sent=plan.sent_rows())


def _reference(scheme, n, h, hkv, d, dtype_name, cu, causal):
    q, k, v, dout = full_inputs(n, h, hkv, d, DTYPES[dtype_name])
    mask = scheme.pattern.token_mask(n, h, hkv, cu, causal)
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ref = masked_reference(qr, kr, vr, mask)
    ref.backward(dout.float())
    return ref.detach(), qr.grad, kr.grad, vr.grad, mask


def _check(res, ref, tol):
    out, dq, dk, dv, _ = ref
    for r in res:
        i = r["idx"]
        torch.testing.assert_close(r["out"].float(), out[i], **tol)
        torch.testing.assert_close(r["dq"].float(), dq[i].float(), **tol)
        torch.testing.assert_close(r["dk"].float(), dk[i].float(), **tol)
        torch.testing.assert_close(r["dv"].float(), dv[i].float(), **tol)
        assert r["ledger"] == r["expect"], (r["ledger"], r["expect"])  # every byte, both passes


EXACT = {
    # name: (scheme options, N, H, Hkv, cu_seqlens)
    "kv-docs": (dict(block=8, local_blocks=2, stride=4), 203, 8, 4, DOCS),
    "q-gqa": (dict(block=8, local_blocks=1, stride=3, offset=1, gqa_pattern="q"), 203, 8, 2, DOCS),
    "dense-head-contig": (dict(block=16, local_blocks=2, stride=4, dense_heads=1, head_step=1,
                               layout_name="contiguous"), 160, 4, 4, None),
}


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("case", EXACT)
def test_exact_fp32(ranks, case, world):
    opts, n, h, hkv, cu = EXACT[case]
    scheme = Hetero(**opts)
    res = ranks(world, _run, scheme, n, h, hkv, 16, "fp32", cu, True)
    _check(res, _reference(scheme, n, h, hkv, 16, "fp32", cu, True), FP32)


@pytest.mark.parametrize("dtype,causal", [("fp32", False), ("bf16", True)])
def test_exact_noncausal_and_bf16(ranks, dtype, causal):
    opts, n, h, hkv, cu = EXACT["kv-docs"]
    scheme = Hetero(**opts, layout_name="doc_zigzag")
    res = ranks(2, _run, scheme, n, h, hkv, 16, dtype, cu, causal)
    _check(res, _reference(scheme, n, h, hkv, 16, dtype, cu, causal), FP32 if dtype == "fp32" else BF16)


def test_exact_with_weighted_layout(ranks):
    opts, n, h, hkv, cu = EXACT["kv-docs"]
    scheme = Hetero(**opts, layout_name="weighted", layout_weights=(2, 1))
    res = ranks(2, _run, scheme, n, h, hkv, 16, "fp32", cu, True)
    _check(res, _reference(scheme, n, h, hkv, 16, "fp32", cu, True), FP32)


# ----------------------------------------------------------------------------- work

@pytest.mark.parametrize("gqa,world", [("kv", 2), ("kv", 4), ("q", 2)])
def test_flops_and_bytes_equal_mask_density(ranks, gqa, world):
    n, h, hkv, d = 1024, 8, 8 if gqa == "kv" else 2, 16
    scheme = Hetero(block=32, local_blocks=2, stride=4, gqa_pattern=gqa)
    res = ranks(world, _run, scheme, n, h, hkv, d, "fp32", None, True)
    mask = scheme.pattern.token_mask(n, h, hkv, None, True)  # [H, T, T]
    dense_pairs = h * n * (n + 1) // 2
    rep = h // hkv
    lay = scheme.layout(n, world)
    total = 0
    for r, rr in enumerate(res):
        mine = lay.indices(r)
        rows = mask[:, mine]                              # my queries
        assert rr["pairs"] == int(rows.sum())             # FLOPs: exactly the mask's pairs
        total += rr["pairs"]
        # bytes: K/V rows (per KV head) of other ranks that some query head of the group sees
        need = rows.any(1).unflatten(0, (hkv, rep)).any(1)  # [Hkv, T]
        other = torch.ones(n, dtype=torch.bool)
        other[mine] = False
        needed = int(need[:, other].sum())
        assert rr["fetched"] == needed
        row_bytes = 2 * d  # K and V elements of one token and one KV head
        assert sum(rr["ledger"]["bwd"].values()) == 4 * row_bytes * rr["fetched"]  # fp32 dK/dV home
        assert sum(rr["ledger"]["fwd"].values()) == 4 * row_bytes * rr["sent"]  # fp32 inputs
        # byte fraction vs fetching all remote K/V (all-gather) = density of the need mask
        frac = needed / (hkv * int(other.sum()))
        ledger_frac = sum(rr["ledger"]["bwd"].values()) / (4 * row_bytes * hkv * int(other.sum()))
        assert ledger_frac == pytest.approx(frac, abs=1e-12)
        if gqa == "kv":
            assert frac < 0.6
    assert sum(rr["sent"] for rr in res) == sum(rr["fetched"] for rr in res)
    density = total / dense_pairs
    assert density == pytest.approx(scheme.pattern.density(n, h, hkv), abs=1e-12)
    assert density < 0.45
    # fewer bytes than dense ring and all-gather, as the formulas state
    shape = AttnShape(n, h, hkv, d, 4)
    for r in range(world):
        mine = scheme.comm_bytes(shape, world, r).total
        assert mine < distattn.get_scheme("ring").comm_bytes(shape, world, r).total
        assert mine < distattn.get_scheme("allgather").comm_bytes(shape, world, r).total


# ----------------------------------------------------------------------------- uneven shards

WEIGHTED = [("ring", {"layout_name": "weighted", "layout_weights": (2.0, 1.0)}),
            ("allgather", {"layout_name": "weighted", "layout_weights": (2.0, 1.0)})]


@pytest.mark.parametrize("spec", WEIGHTED, ids=lambda s: s[0])
def test_weighted_layout_exact(ranks, spec):
    name, opts = spec
    scheme = distattn.get_scheme(name, **opts)
    lay = scheme.layout(203, 2, DOCS)
    costs = lay.costs()
    assert costs[0] / sum(costs) == pytest.approx(2 / 3, abs=0.03)  # rank 0 does ~2/3 of the work
    check(ranks, (scheme, {}), 2, "docs_gqa", "fp32", True)


def test_weighted_single_document_shares():
    for name in ("ring", "allgather", "hetero"):
        s = distattn.get_scheme(name, layout_name="weighted", layout_weights=(2, 1))
        lay = s.layout(4096, 2)
        assert lay.cost(0) / sum(lay.costs()) == pytest.approx(2 / 3, abs=1e-3)
    with pytest.raises(ValueError, match="weights only apply"):
        distattn.get_scheme("ring", layout_weights=(2, 1)).layout(64, 2)


# ----------------------------------------------------------------------------- config, model

def test_config_preset_and_build_schemes():
    from distattn.schemes.ring import Ring
    from distattn.train.trainer import build_schemes
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "presets" / "hetero.yaml")
    s, _ = build_schemes(cfg, None)
    a = cfg.attention
    assert isinstance(s, Hetero)
    assert (s.block, s.local_blocks, s.stride, s.dense_heads, s.dense_every) == (
        a.hetero_block, a.hetero_local_blocks, a.hetero_stride, a.hetero_dense_heads, a.hetero_dense_every)
    s.validate(heads=cfg.model.num_attention_heads, kv_heads=cfg.model.num_query_groups,
               world=cfg.parallel.cp)
    assert isinstance(s.for_layer(0), Ring) and s.for_layer(1) is s
    assert [layer_is_dense(i, 4) for i in range(6)] == [True, False, False, False, True, False]
    assert not any(layer_is_dense(i, 0) for i in range(4))
    w = load_config(None, ["attention.layout=weighted", "attention.layout_weights=[2, 1]"])
    ring, _ = build_schemes(w, None)
    assert ring.layout_weights == (2.0, 1.0)
    with pytest.raises(ConfigError, match="hetero.*does not cover"):
        load_config(None, ["attention.scheme=hetero", "attention.hetero_stride=8"])
    with pytest.raises(ConfigError, match="layout_weights"):
        load_config(None, ["attention.layout_weights=[2, 1]"])
    with pytest.raises(ConfigError, match="layout_weights"):
        load_config(None, ["attention.layout=weighted", "attention.layout_weights=[2, 1, 1]"])


def test_trainer_step_cp2_equals_cp1(ranks, tmp_path):
    """A model with a dense layer 0 (ring) and a hetero layer 1 trains identically at cp=1 and cp=2."""
    from train_util import one_step
    tiny = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
            "model.num_query_groups=4", "model.ffn_hidden_size=128", "data.seq_len=192",
            "train.steps=3", "train.warmup_steps=1", "train.tensorboard=false",
            "attention.scheme=hetero", "attention.hetero_block=16", "attention.hetero_local_blocks=1",
            "attention.hetero_stride=4", "attention.hetero_dense_every=2"]
    one = load_config(None, tiny + [f"run.output_dir={tmp_path / 'a'}", "parallel.world_size=1",
                                    "parallel.cp=1"])
    two = load_config(None, tiny + [f"run.output_dir={tmp_path / 'b'}"])
    (l1, p1), = [r for r in ranks(1, one_step, one.model_dump()) if r is not None]
    (l2, p2), = [r for r in ranks(2, one_step, two.model_dump()) if r is not None]
    assert l1[0] == pytest.approx(l2[0], rel=1e-5)
    torch.testing.assert_close(p2, p1, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- benchmark

def test_bench_runs_on_cpu_and_refuses_what_it_cannot_run(ranks):
    from distattn.bench.hetero import HeteroBenchSpec, format_table, run_hetero_bench
    spec = HeteroBenchSpec(lengths=[256], heads=4, kv_heads=4, head_dim=16, world_size=2, iters=1,
                           warmup=0, hetero=dict(block=16, stride=4))
    row, = run_hetero_bench(spec, pool=ranks.pool(2))
    assert row.kernel == "blocks" and 0 < row.density < 1 and row.hetero_bytes < row.ring_bytes
    assert row.vs_density == pytest.approx(row.hetero_compute_s / (row.density * row.ring_compute_s))
    assert "device=cpu hetero kernel=blocks" in format_table([row], spec)
    one = HeteroBenchSpec(lengths=[256], heads=4, kv_heads=4, head_dim=16, world_size=1, iters=1,
                          warmup=0, hetero=dict(block=16, stride=4))
    row, = run_hetero_bench(one, pool=ranks.pool(1))  # one device: nothing is sent
    assert row.ring_bytes == row.hetero_bytes == 0 and row.bytes_ratio == 1.0
    with pytest.raises(ValueError, match="device must be one of cpu, cuda, got 'tpu'"):
        HeteroBenchSpec(device="tpu")
    with pytest.raises(ValueError, match="kernel must be one of auto, blocks, flex"):
        HeteroBenchSpec(kernel="fused")
    with pytest.raises(ValueError, match="kernel 'flex' .* needs device='cuda'"):
        HeteroBenchSpec(kernel="flex").check_devices()
    if torch.cuda.device_count() < 64:
        with pytest.raises(ValueError, match="one GPU per rank: world_size=64"):
            HeteroBenchSpec(device="cuda", world_size=64).check_devices()
