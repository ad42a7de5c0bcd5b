"""parallel.tp: megatron's tensor parallelism inside each cp rank.

One step at tp=2 (with and without sequence parallelism), tp=2 x cp=2 and fsdp x tp x cp equals one
step on a single rank; megatron's collectives are in the ledger (tag tp); weights split and join as
megatron lays them out; checkpoints resume exactly; bad combinations are refused by the config.
"""
from __future__ import annotations

import pytest
import torch

from distattn.config import ConfigError, load_config
from train_util import fit, one_step, step_records

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=128", "data.seq_len=192",
        "train.steps=4", "train.tensorboard=false", "train.adam_eps=1e-6"]


def cfg_for(path, *extra):
    return load_config(None, TINY + [f"run.output_dir={path}", *extra])


@pytest.mark.parametrize("world,extra", [
    (2, ("parallel.cp=1", "parallel.tp=2", "attention.scheme=local")),
    (2, ("parallel.cp=1", "parallel.tp=2", "parallel.sequence_parallel=false", "attention.scheme=local",
         "model.loss_tile=40")),
    (4, ("parallel.cp=2", "parallel.tp=2", "attention.scheme=ring", "model.mlp_tile=48")),
    (4, ("parallel.cp=2", "parallel.tp=2", "attention.scheme=ring", "train.shard=fsdp", "model.loss_tile=32")),
])
def test_tp_step_equals_single_rank(ranks, tmp_path, world, extra):
    base = cfg_for(tmp_path / "ref", "parallel.cp=1", "attention.scheme=local",
                   *[e for e in extra if e.startswith("model.")])
    split = cfg_for(tmp_path / "tp", *extra)
    (l1, p1), = [r for r in ranks(1, one_step, base.model_dump(), 2) if r is not None]
    (l2, p2), = [r for r in ranks(world, one_step, split.model_dump(), 2) if r is not None]
    assert l1 == pytest.approx(l2, rel=1e-5)
    torch.testing.assert_close(p2, p1, atol=1e-5, rtol=0)
