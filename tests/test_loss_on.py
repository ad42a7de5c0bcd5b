"""data.loss_on=answers: the loss counts only a synthetic task's answer tokens; cp=2 equals one rank."""
from __future__ import annotations

import pytest
import torch

from distattn.config import ConfigError, load_config
from train_util import one_step

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "data.seq_len=256", "train.steps=3", "train.tensorboard=false",
        "data.source=synthetic", "data.synthetic_task=recall", "train.adam_eps=1e-6"]


def test_answers_only_step_equals_one_rank_and_differs_from_all(ranks, tmp_path):
    one = load_config(None, TINY + ["data.loss_on=answers", "parallel.cp=1", "attention.scheme=local",
                                    f"run.output_dir={tmp_path}/a"])
    two = load_config(None, TINY + ["data.loss_on=answers", "parallel.cp=2", "attention.scheme=ring",
                                    f"run.output_dir={tmp_path}/b"])
    every = load_config(None, TINY + ["parallel.cp=1", "attention.scheme=local", f"run.output_dir={tmp_path}/c"])
    (l1, p1), = [r for r in ranks(1, one_step, one.model_dump()) if r is not None]
    (l2, p2), = [r for r in ranks(2, one_step, two.model_dump()) if r is not None]
    (l0, _), = [r for r in ranks(1, one_step, every.model_dump()) if r is not None]
    assert l1[0] == pytest.approx(l2[0], rel=1e-5)
    torch.testing.assert_close(p2, p1, atol=1e-5, rtol=0)
    assert abs(l1[0] - l0[0]) > 1e-3  # 4 random answer characters, not every byte


def test_answers_need_a_synthetic_source():
    with pytest.raises(ConfigError, match="loss_on=answers needs answer tokens"):
        load_config(None, ["data.loss_on=answers"])
