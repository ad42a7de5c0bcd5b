"""Public API: shard/unshard round trips through the ledger, clear errors, CLI and benchmark smoke."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import distattn
from distattn.bench.attention import BenchSpec, format_table, run_attention_bench
from distattn.cli import main as cli_main
from distattn.comm import CommLedger


def _round_trip(name, opts, n, cu):
    scheme = distattn.get_scheme(name, **opts)
    x = torch.arange(n * 3, dtype=torch.float32).view(n, 3)
    ledger = CommLedger()
    local = distattn.shard(x, scheme=scheme, group=dist.group.WORLD, cu_seqlens=cu)
    full = distattn.unshard(local, scheme=scheme, group=dist.group.WORLD, cu_seqlens=cu, ledger=ledger)
    return torch.equal(full, x), ledger.summary().get("all_gather_uneven").calls


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name,opts", [("ring", {}), ("ring", {"layout_name": "doc_zigzag"}),
                                       ("allgather", {"layout_name": "contiguous"})])
def test_shard_unshard_round_trip(ranks, world, name, opts):
    out = ranks(world, _round_trip, name, opts, 37, [0, 5, 6, 30, 37])
    assert all(ok and calls == 1 for ok, calls in out)


def test_single_process_needs_no_group():
    q = torch.randn(10, 2, 8)
    out = distattn.attention(q, q[:, :1], q[:, :1], scheme="ring", cu_seqlens=[0, 4, 10])
    ref = distattn.kernels.reference_attention(q, q[:, :1], q[:, :1], [0, 4, 10])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)
    assert torch.equal(distattn.unshard(distattn.shard(q, scheme="ring"), scheme="ring"), q)


def test_errors_speak():
    with pytest.raises(ValueError, match="unknown scheme 'rign'; choose one of"):
        distattn.get_scheme("rign")
    with pytest.raises(ValueError, match="has no option"):
        distattn.get_scheme("ring", ulysses=2)
    with pytest.raises(ValueError, match="GQA needs q heads % kv heads == 0: 6 q heads, 4 kv heads"):
        distattn.attention(torch.randn(4, 6, 8), torch.randn(4, 4, 8), torch.randn(4, 4, 8), scheme="ring")
    with pytest.raises(ValueError, match=r"packed \[tokens, heads, head_dim\]"):
        distattn.attention(torch.randn(1, 4, 6, 8), torch.randn(4, 4, 8), torch.randn(4, 4, 8), scheme="ring")


def test_bench_smoke(ranks):
    spec = BenchSpec(seq_len=256, heads=4, kv_heads=2, head_dim=16, schemes=["ring", "allgather"],
                     iters=1, warmup=0, world_size=2, doc_lens=[100, 156])
    rows, single = run_attention_bench(spec, pool=ranks.pool(2))
    assert [r.scheme for r in rows] == ["ring", "allgather"]
    # ring: forward one K/V hop (128 tokens x 2 x 2 heads x 16 x 4 bytes); backward one K/V hop + two fp32 dK/dV hops
    block = 128 * 2 * 2 * 16 * 4
    assert rows[0].bytes_per_rank == block + block + 2 * block
    assert all(r.critical_compute_s > 0 and r.efficiency > 0 for r in rows) and single > 0
    assert "ring" in format_table(rows, single, spec)


def test_bench_deepspeed_ulysses_peer_is_ledgered(ranks):
    """The DeepSpeed-Ulysses peer's all-to-alls, counted through its backend, equal its formula,
    and its transfers are timed with compute removed like ours."""
    from distattn.bench.attention import ds_ulysses_bytes
    spec = BenchSpec(seq_len=256, heads=4, kv_heads=4, head_dim=16, schemes=["deepspeed-ulysses"],
                     iters=1, warmup=0, world_size=2)
    rows, _ = run_attention_bench(spec, pool=ranks.pool(2))
    assert rows[0].bytes_per_rank == ds_ulysses_bytes(spec, 2) > 0
    assert rows[0].comm_alone_s == rows[0].comm_alone_s and rows[0].comm_alone_s > 0


def test_cli_config_prints_resolved_yaml(capsys):
    assert cli_main(["config", "--set", "bench.seq_len=8192"]) == 0
    assert "seq_len: 8192" in capsys.readouterr().out
    assert cli_main(["config", "--set", "attention.scheme=rign"]) == 2
    assert "attention.scheme" in capsys.readouterr().err


def test_bench_table_explains_negative_overlap():
    """A negative overlap is printed with the reason it is negative; a positive one only with the legend."""
    from distattn.bench.attention import Row
    spec = BenchSpec(world_size=2)
    rows = [Row("ring", 2, 0.01, 1.0, 0.02, 1 << 20, 0.005, 0.004, -0.25, 0.9),
            Row("allgather", 2, 0.01, 1.0, 0.02, 1 << 20, 0.002, 0.004, 0.5, 0.9)]
    text = format_table(rows, 0.02, spec)
    assert "overlap = 1 - crit exposed / comm alone" in text
    assert "overlap < 0 (ring)" in text and "compete with the ranks' compute" in text
    assert "overlap < 0" not in format_table(rows[1:], 0.02, spec)
