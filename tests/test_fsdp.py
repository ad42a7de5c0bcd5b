"""train.shard=fsdp: one step equals a single rank's at dp=2, cp=2 and dp2 x cp2; FSDP's traffic is in the
ledger (tag fsdp); checkpoints resume exactly, also on another cp."""
from __future__ import annotations

import pytest
import torch

from distattn.config import ConfigError, load_config
from train_util import fit, one_step, step_records

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=128", "data.seq_len=192",
        "train.steps=4", "train.tensorboard=false",
        # Adam divides by |g|: eps 1e-6 keeps weights with ~1e-9 gradients from moving on rounding alone
        "train.adam_eps=1e-6"]


def cfg_for(path, *extra):
    return load_config(None, TINY + [f"run.output_dir={path}", *extra])


@pytest.mark.parametrize("world,extra", [
    (2, ("parallel.cp=2", "attention.scheme=ring")),
    (2, ("parallel.dp=2", "parallel.cp=1", "attention.scheme=local")),
    (4, ("parallel.dp=2", "parallel.cp=2", "attention.scheme=ring", "model.loss_tile=32", "model.mlp_tile=48")),
])
def test_fsdp_step_equals_single_rank(ranks, tmp_path, world, extra):
    base = cfg_for(tmp_path / "ref", "parallel.cp=1", "attention.scheme=local",
                   *[e for e in extra if e.startswith("model.")],
                   *(["data.micro_batch_size=1", "train.grad_accum=2"] if "parallel.dp=2" in extra else []))
    sharded = cfg_for(tmp_path / "fsdp", "train.shard=fsdp", *extra)
    (l1, p1), = [r for r in ranks(1, one_step, base.model_dump(), 2) if r is not None]
    (l2, p2), = [r for r in ranks(world, one_step, sharded.model_dump(), 2) if r is not None]
    assert l1 == pytest.approx(l2, rel=1e-5)
    torch.testing.assert_close(p2, p1, atol=1e-5, rtol=0)


def test_fsdp_traffic_is_in_the_ledger(ranks, tmp_path):
    """Per step, rank 0 sends (W-1)/W of the parameters once per reduce-scatter (all of them) and the
    layers' parameters twice per all-gather (forward and backward), the root's once (padding aside)."""
    recs, P = ranks(2, step_records, cfg_for(tmp_path, "train.shard=fsdp", "parallel.cp=2").model_dump())[0]
    fsdp = [r for r in recs if r[2] == "fsdp"]
    scattered = sum(b for op, b, _ in fsdp if op == "reduce_scatter")
    gathered = sum(b for op, b, _ in fsdp if op == "all_gather")
    assert 4 * P / 2 <= scattered <= 4 * P / 2 + 4096, (scattered, P)
    assert 4 * P / 2 < gathered < 2 * 4 * P / 2 + 4096, (gathered, P)
    assert not [r for r in recs if r[2] != "fsdp" and r[0] == "all_reduce" and r[1] >= P]  # no gradient all-reduce


def test_fsdp_resumes_exactly_and_on_another_cp(ranks, tmp_path):
    common = ("train.shard=fsdp", "train.ckpt_every=2", "attention.scheme=ring")
    straight = ranks(2, fit, cfg_for(tmp_path / "a", "parallel.cp=2", *common).model_dump())[0]
    first = cfg_for(tmp_path / "b", "parallel.cp=2", *common)
    ranks(2, fit, first.model_dump(), False, 2)
    same = ranks(2, fit, first.model_dump(), True)[0]
    assert same == pytest.approx(straight[2:], rel=1e-5)
    other = cfg_for(tmp_path / "b", "parallel.cp=1", "train.shard=fsdp", "train.ckpt_every=0",
                    "attention.scheme=local")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step_00000002")
    resharded = ranks(1, fit, other.model_dump(), True)[0]
    assert resharded == pytest.approx(straight[2:], rel=1e-5)


def test_fsdp_refusals():
    with pytest.raises(ConfigError, match="train.shard=fsdp and train.zero_stage=2"):
        load_config(None, ["train.shard=fsdp", "train.zero_stage=2"])
    with pytest.raises(ConfigError, match="attention_servers"):
        load_config(None, ["train.shard=fsdp", "parallel.attention_servers=1", "parallel.world_size=3",
                           "attention.scheme=cad"])


def test_fsdp_resumes_on_another_dp(ranks, tmp_path):
    """The data stream is global (sample i goes to dp rank i mod dp), so dp=2 resumed at dp=1 with twice the
    gradient accumulation sees the same samples per step as the uninterrupted dp=2 run: the same losses."""
    common = ("train.shard=fsdp", "train.ckpt_every=2", "parallel.cp=1", "attention.scheme=local")
    straight = ranks(2, fit, cfg_for(tmp_path / "a", "parallel.dp=2", *common).model_dump())[0]
    ranks(2, fit, cfg_for(tmp_path / "b", "parallel.dp=2", *common).model_dump(), False, 2)
    one = cfg_for(tmp_path / "b", "parallel.dp=1", "train.grad_accum=2", *common)
    resumed = ranks(1, fit, one.model_dump(), True)[0]
    assert resumed == pytest.approx(straight[2:], rel=1e-5)
