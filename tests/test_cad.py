"""CAD: the planner's invariants (property tests), and the cad scheme's exactness and traffic.

Exactness tolerances are the scheme suite's (tests/test_schemes.py): fp32 agrees
with the fp32 reference to accumulated rounding, bf16 to 2e-2. Every shard has
its whole KV prefix on one server, so outputs are computed in one pass with no
merge; only dK/dV of KV tokens shared by several servers are sums (fp32).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distattn
from cad_util import run_cad
from distattn.cad.dispatch import RankPlan, Roles
from distattn.kernels import reference_attention
from distattn.layout import get_layout
from distattn.sched.cad import plan, split_halves
from distattn.sched.cost import doc_pairs, head_len_for, pairs, tail_len_for
from schemes_util import DTYPES, full_inputs
from test_schemes import CASES, TOL, check

# --------------------------------------------------------------------------- cost model


def test_pairs_formula_matches_brute_force():
    for L in (1, 2, 7, 40):
        for a in range(L):
            for b in range(a + 1, L + 1):
                brute = sum(p + 1 for p in range(a, b))
                assert pairs(a, b) == brute
                assert pairs(a, b, L, causal=False) == (b - a) * L
        assert doc_pairs(L) == L * (L + 1) // 2


def test_cut_lengths_hit_their_targets():
    a, b = 100, 5000
    for target in (1, 10_000, 1_000_000, pairs(a, b) - 1):
        n = head_len_for(a, b, target)
        m = tail_len_for(a, b, target)
        # the nearest integer length: one token more or less is no closer
        for length, cost in ((n, lambda x: pairs(a, a + x)), (m, lambda x: pairs(b - x, b))):
            err = abs(cost(length) - target)
            assert all(err <= abs(cost(x) - target) for x in (length - 1, length + 1) if 0 <= x <= b - a)


# --------------------------------------------------------------------------- planner properties


def _long_tailed(seed: int, n_docs: int, sigma: float, median: float, cap: int) -> list[int]:
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.lognormal(np.log(median), sigma, size=n_docs), 1, cap).astype(int)
    return [int(x) for x in lens]


def _check_invariants(p, L, min_shard):
    # every document's query shards tile it exactly once
    by_doc: dict[int, list[tuple[int, int]]] = {}
    for sh in p.shards:
        assert 0 <= sh.server < p.n_servers
        assert sh.q_end - sh.q_start >= min(min_shard, L[sh.doc]), sh
        by_doc.setdefault(sh.doc, []).append((sh.q_start, sh.q_end))
    assert sorted(by_doc) == list(range(len(L)))
    for d, ranges in by_doc.items():
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == L[d]
        assert all(x[1] == y[0] for x, y in zip(ranges, ranges[1:]))
    # FLOPs are conserved: the servers compute exactly the causal pairs of the batch
    assert sum(p.server_flops) == sum(doc_pairs(x) for x in L)
    per = [0] * p.n_servers
    for sh in p.shards:
        per[sh.server] += pairs(sh.q_start, sh.q_end)
    assert tuple(per) == p.server_flops
    # every task's KV is a prefix: a server receives [0, max q_end) of each of its documents,
    # and the token matrices count exactly those prefixes
    for s in range(p.n_servers):
        prefix = p.kv_prefix(s)
        for d, e in prefix.items():
            assert e == max(sh.q_end for sh in p.shards if sh.server == s and sh.doc == d)
        assert sum(p.kv_tokens[r][s] for r in range(p.n_sources)) == sum(prefix.values())
        assert sum(p.q_tokens[r][s] for r in range(p.n_sources)) == \
            sum(sh.q_end - sh.q_start for sh in p.shards if sh.server == s)
    assert sum(p.send_bytes) == sum(p.recv_bytes)


def _unit(L, min_shard, token_cost=0.0):
    """The planner's indivisible unit of work (see distattn.sched.cad): its guarantee's slack."""
    return (2 * min_shard + 1) * (max(L) + token_cost)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), n_docs=st.integers(1, 120), sigma=st.floats(0.3, 2.5),
       median=st.floats(20, 3000), servers=st.integers(1, 12),
       min_shard=st.sampled_from([1, 8, 32, 128]), tol=st.sampled_from([0.0, 0.02, 0.05, 0.2]),
       colocated=st.booleans(), token_cost=st.sampled_from([0.0, 0.0, 50.0, 1000.0]))
def test_planner_properties(seed, n_docs, sigma, median, servers, min_shard, tol, colocated, token_cost):
    L = _long_tailed(seed, n_docs, sigma, median, 50_000)
    if sum(L) < servers:
        L[0] += servers
    p = plan(L, servers, tol, min_shard, colocated=colocated, q_bytes=2, kv_bytes=1,
             token_cost=token_cost)
    _check_invariants(p, L, min_shard)
    cost = p.server_cost
    assert sum(cost) == pytest.approx(sum(doc_pairs(x) + token_cost * x for x in L), rel=1e-12)
    mean = sum(cost) / servers
    unit = _unit(L, min_shard, token_cost)
    # the documented guarantee: at most target + max(tolerance * mean, one indivisible unit)
    assert max(cost) <= mean + max(tol * mean, unit) + 1e-6 * mean
    if unit <= tol * mean:  # feasible: balance within the tolerance
        assert p.cost_imbalance <= 1 + tol + 1e-9
        if token_cost == 0:
            assert p.imbalance <= 1 + tol + 1e-9


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n_docs=st.integers(1, 60), servers=st.integers(2, 6),
       sources=st.integers(1, 5), layout=st.sampled_from(["contiguous", "zigzag", "doc_zigzag"]))
def test_planner_any_owner_layout(seed, n_docs, servers, sources, layout):
    L = _long_tailed(seed, n_docs, 1.5, 300, 5000)
    if sum(L) < 2 * max(servers, sources):
        L[0] += 2 * max(servers, sources)
    cu = np.concatenate([[0], np.cumsum(L)]).tolist()
    for colocated, n_src in ((True, servers), (False, sources)):
        lay = get_layout(layout, sum(L), n_src, cu)
        p = plan(L, servers, 0.05, 16, owner=lay, colocated=colocated)
        _check_invariants(p, L, 16)
        assert p.source_tokens == tuple(lay.sizes())
        # what every source sends matches what the servers expect, token for token
        roles = Roles.colocated(servers) if colocated else \
            Roles(tuple(range(n_src)), tuple(range(n_src, n_src + servers)))
        rps = [RankPlan(p, roles, g) for g in range(len(set(roles.sources) | set(roles.servers)))]
        for s, g in enumerate(roles.servers):
            srv = rps[g].server
            for r, gs in enumerate(roles.sources):
                src = rps[gs].source
                assert src.q_counts[s] == srv.q_counts[r] == p.q_tokens[r][s]
                assert src.kv_counts[s] == srv.kv_counts[r] == p.kv_tokens[r][s]
            assert srv.pairs == p.server_flops[s]
        for r, g in enumerate(roles.sources):  # every local query row goes to exactly one server
            q_all = rps[g].source.q_all
            assert sorted(q_all.tolist()) == list(range(lay.size(r)))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n_docs=st.integers(1, 80), servers=st.integers(2, 8),
       linear_cost=st.sampled_from([0.0, 100.0, 2000.0]))
def test_planner_balances_the_whole_step(seed, n_docs, servers, linear_cost):
    """With a linear-layer cost and uneven token counts, attention + linear work is balanced."""
    L = _long_tailed(seed, n_docs, 1.5, 400, 8000)
    n = sum(L)
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.5, 1.5, size=servers)
    sizes = np.maximum(1, np.floor(w / w.sum() * n)).astype(int)
    sizes[-1] = n - sizes[:-1].sum()
    if sizes[-1] < 1:
        return
    p = plan(L, servers, 0.05, 16, owner=sizes.tolist(), linear_cost=linear_cost)
    _check_invariants(p, L, 16)
    loads = p.step_loads
    mean_attn = sum(p.server_flops) / servers
    level = sum(loads) / servers
    base = [linear_cost * t for t in p.source_tokens]
    if all(b <= level for b in base):  # every server gets attention work: loads are level
        assert max(loads) <= level + max(0.05 * mean_attn, _unit(L, 16)) + 1e-6 * level


def test_planner_moves_nothing_when_already_balanced():
    L = [300, 100, 100] * 4  # every rank holds the same documents
    p = plan(L, 4, 0.05, 16)
    assert p.imbalance == pytest.approx(1.0)
    assert sum(p.send_bytes) == 0
    assert all(p.q_tokens[r][s] == 0 for r in range(4) for s in range(4) if r != s)


def test_planner_one_document_spans_all_servers():
    p = plan([100_000], 8, 0.01, 128)
    assert p.imbalance <= 1.01
    assert {sh.server for sh in p.shards} == set(range(8))
    d = plan([100_000], 8, 0.01, 128, colocated=False)
    assert d.imbalance <= 1.01 and len(d.shards) == 8


def test_planner_short_documents_stay_whole():
    L = [5, 3, 120, 7, 1, 64]
    p = plan(L, 4, 0.05, 128)
    assert len(p.shards) == len(L)  # each shorter than min_shard: one shard each


def test_colocated_moves_fewer_bytes_than_a_dedicated_pool():
    L = _long_tailed(1, 300, 1.5, 2000, 200_000)
    co = plan(L, 8, 0.05, 128, q_bytes=2, kv_bytes=1)
    de = plan(L, 8, 0.05, 128, colocated=False, q_bytes=2, kv_bytes=1)
    assert co.packing_imbalance >= 1.3
    assert co.imbalance <= 1.05 and de.imbalance <= 1.05
    assert sum(co.send_bytes) < 0.5 * sum(de.send_bytes)


def test_planning_a_million_tokens_is_fast():
    L = _long_tailed(7, 2000, 1.4, 250, 200_000)
    scale = 1_000_000 / sum(L)
    L = [max(1, int(x * scale)) for x in L]
    for servers in (8, 64):
        plan(L, servers)  # warm
        t0 = time.perf_counter()
        p = plan(L, servers)
        dt = time.perf_counter() - t0
        print(f"plan {len(L)} docs / {sum(L)} tokens on {servers} servers: {dt * 1e3:.1f} ms, "
              f"imbalance {p.imbalance:.4f} (packing {p.packing_imbalance:.3f})")
        assert dt < 0.5
        assert p.imbalance <= 1.05


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n_docs=st.integers(1, 50), min_shard=st.sampled_from([1, 16, 128]),
       grouped=st.booleans())
def test_pingpong_halves_tile_the_batch(seed, n_docs, min_shard, grouped):
    L = _long_tailed(seed, n_docs, 1.5, 500, 20_000)
    groups = [d % 3 for d in range(len(L))] if grouped else None
    h0, h1 = split_halves(L, min_shard, groups=groups)
    cover: dict[int, list[tuple[int, int]]] = {}
    for d, a, b in h0 + h1:
        cover.setdefault(d, []).append((a, b))
    for d, x in enumerate(L):
        r = sorted(cover[d])
        assert r[0][0] == 0 and r[-1][1] == x and all(u[1] == v[0] for u, v in zip(r, r[1:]))
    c0 = sum(pairs(a, b) for _, a, b in h0)
    c1 = sum(pairs(a, b) for _, a, b in h1)
    if len(L) == 1 and L[0] * (1 - 2 ** -0.5) >= min_shard + 1:  # the even cut keeps min_shard
        assert abs(c0 - c1) <= 0.01 * (c0 + c1) + 2 * max(L)
    # each half plans on its own and the two plans together cover every document once
    for items in (h0, h1):
        if items:
            p = plan(L, 3, 0.05, min_shard, items=items)
            assert sum(p.server_flops) == sum(pairs(a, b) for _, a, b in items)


def test_planner_rejects_bad_inputs():
    with pytest.raises(ValueError, match="owner sizes sum"):
        plan([10, 10], 2, owner=[5, 5])
    with pytest.raises(ValueError, match="colocated"):
        plan([10, 10], 2, owner=[5, 5, 10])
    with pytest.raises(ValueError, match="doc_lens"):
        plan([], 2)
    with pytest.raises(ValueError, match="min_shard"):
        plan([10], 1, min_shard=0)


# --------------------------------------------------------------------------- the scheme, colocated

SMALL = {"min_shard": 8}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_colocated_exact_fp32(ranks, world):
    # docs_gqa: a 3-token and a 1-token document (shorter than a shard), GQA 8:2, odd lengths
    check(ranks, ("cad", SMALL), world, "docs_gqa", "fp32", True)


def test_colocated_one_document_spans_all_servers(ranks):
    check(ranks, ("cad", SMALL), 4, "one_doc", "fp32", True)


@pytest.mark.parametrize("opts", [{**SMALL, "pingpong": True}, {**SMALL, "layout_name": "zigzag"},
                                  {"min_shard": 128}], ids=["pingpong", "zigzag-owner", "min128"])
def test_colocated_options_exact(ranks, opts):
    check(ranks, ("cad", opts), 3, "docs_gqa", "fp32", True)


def test_colocated_bf16(ranks):
    check(ranks, ("cad", {**SMALL, "pingpong": True}), 2, "docs_gqa", "bf16", True)


def _compare(results, n, h, hkv, d, dtype, cu, causal, ledger=True):
    q, k, v, dout = full_inputs(n, h, hkv, d, DTYPES[dtype])
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ref = reference_attention(qr, kr, vr, cu, causal)
    ref.backward(dout.float())
    tol = TOL[dtype]
    seen = []
    for r in results:
        if ledger:
            for tag in ("fwd", "bwd"):
                got = {op: b for op, b in r["ledger"][tag].items() if b or op in r["expect"][tag]}
                want = {op: b for op, b in r["expect"][tag].items() if b or op in got}
                assert got == want, (r["role"], tag, got, want)
        if r["role"] == "server":
            assert r["passes"] == 2
            continue
        idx = r["idx"]
        seen.append(idx)
        assert r["dtype_out"] == str(DTYPES[dtype])
        torch.testing.assert_close(r["out"].float(), ref[idx].detach(), **tol)
        torch.testing.assert_close(r["dq"].float(), qr.grad[idx].float(), **tol)
        torch.testing.assert_close(r["dk"].float(), kr.grad[idx].float(), **tol)
        torch.testing.assert_close(r["dv"].float(), vr.grad[idx].float(), **tol)
    assert sorted(torch.cat(seen).tolist()) == list(range(n))


def test_colocated_non_causal(ranks):
    n, h, hkv, d, cu = CASES["docs_gqa"]
    _compare(ranks(3, run_cad, SMALL, n, h, hkv, d, "fp32", cu, False), n, h, hkv, d, "fp32", cu,
             False, ledger=False)


# --------------------------------------------------------------------------- the scheme, dedicated


@pytest.mark.parametrize("world,servers,opts", [
    (3, [2], SMALL),
    (4, [2, 3], {**SMALL, "pingpong": True}),
    (4, [0, 3], SMALL),
], ids=["2+1", "2+2-pingpong", "servers-first-and-last"])
def test_dedicated_exact_and_ledger(ranks, world, servers, opts):
    n, h, hkv, d, cu = CASES["docs_gqa"]
    res = ranks(world, run_cad, {**opts, "server_ranks": servers}, n, h, hkv, d, "fp32", cu)
    _compare(res, n, h, hkv, d, "fp32", cu, True)


def test_dedicated_serve_until_stopped(ranks):
    n, h, hkv, d, cu = CASES["docs_gqa"]
    res = ranks(4, run_cad, {**SMALL, "server_ranks": [3]}, n, h, hkv, d, "fp32", cu, True, 0, True)
    _compare(res, n, h, hkv, d, "fp32", cu, True)


def test_dedicated_one_document_bf16(ranks):
    n, h, hkv, d, cu = CASES["one_doc"]
    res = ranks(3, run_cad, {**SMALL, "server_ranks": [2]}, n, h, hkv, d, "bf16", cu)
    _compare(res, n, h, hkv, d, "bf16", cu, True)


def test_scheme_options_are_checked():
    with pytest.raises(ValueError, match="min_shard"):
        distattn.get_scheme("cad", min_shard=0)
    with pytest.raises(ValueError, match="layout_name"):
        distattn.get_scheme("cad", layout_name="weighted")
    with pytest.raises(ValueError, match="server_ranks"):
        distattn.get_scheme("cad", server_ranks=[]).roles(2)
    with pytest.raises(ValueError, match="server_ranks"):
        distattn.get_scheme("cad", server_ranks=[0, 1]).validate(heads=4, kv_heads=2, world=2)


# --------------------------------------------------------------------------- trainer


def test_trainer_cad_step_equals_single_rank(ranks, tmp_path):
    from distattn.config import load_config
    from train_util import one_step
    tiny = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
            "model.num_query_groups=2", "model.ffn_hidden_size=128", "data.seq_len=192",
            "train.steps=3", "train.warmup_steps=1", "train.tensorboard=false"]
    base = load_config(None, tiny + [f"run.output_dir={tmp_path / 'ref'}", "parallel.world_size=1",
                                     "parallel.cp=1", "attention.scheme=local"])
    par = load_config(None, tiny + [f"run.output_dir={tmp_path / 'cad'}", "parallel.world_size=2",
                                    "parallel.cp=2", "attention.scheme=cad",
                                    "attention.layout=contiguous", "attention.cad_min_shard=16",
                                    "attention.cad_pingpong=true"])
    (l1, p1), = [r for r in ranks(1, one_step, base.model_dump()) if r is not None]
    (l2, p2), = [r for r in ranks(2, one_step, par.model_dump()) if r is not None]
    assert l1[0] == pytest.approx(l2[0], rel=1e-5)
    torch.testing.assert_close(p2, p1, atol=1e-5, rtol=0)
