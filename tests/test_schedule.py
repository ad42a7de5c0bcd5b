"""Learning-rate schedules and AdamW settings from the train section."""
import math

import pytest

from distattn.config import load_config
from distattn.train.schedule import lr_lambda


def _train(*sets):
    return load_config(None, [f"train.{s}" for s in sets]).train


def test_default_is_the_cosine_schedule_of_before():
    t = _train("steps=100", "warmup_steps=10", "lr=1e-3", "min_lr=1e-4")
    f = lr_lambda(t)
    assert t.schedule == "cosine"
    for step in (0, 5, 9):
        assert f(step) == pytest.approx((step + 1) / 10)
    for step in (10, 40, 77, 100):
        tt = min(1.0, (step - 10) / 90)
        old = (1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * tt))) / 1e-3
        assert f(step) == pytest.approx(old)


@pytest.mark.parametrize("kind,mid,end", [("linear", 0.55, 0.1), ("constant", 1.0, 1.0), ("cosine", 0.55, 0.1)])
def test_schedules_from_lr_to_min_lr(kind, mid, end):
    f = lr_lambda(_train("steps=101", "warmup_steps=1", "lr=1.0", "min_lr=0.1", f"schedule={kind}"))
    assert f(1) == pytest.approx(1.0)
    assert f(51) == pytest.approx(mid)
    assert f(101) == pytest.approx(end)


def test_wsd_is_stable_then_decays_over_the_last_fraction():
    f = lr_lambda(_train("steps=100", "warmup_steps=10", "lr=1.0", "min_lr=0.0", "schedule=wsd",
                         "wsd_decay_fraction=0.2"))
    assert f(4) == pytest.approx(0.5)
    assert [f(s) for s in (10, 50, 80)] == [1.0, 1.0, 1.0]
    assert f(90) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0)


def _optimizer_settings(cfg_dict):
    from distattn.config import Config
    from distattn.train.trainer import Trainer
    tr = Trainer(Config.model_validate(cfg_dict), quiet=True)
    g = tr.optimizer.param_groups[0]
    tr.mesh.destroy()
    return tuple(g["betas"]), g["eps"]


def test_adam_settings_reach_the_optimizer(ranks, tmp_path):
    cfg = load_config(None, ["parallel.cp=1", "data.seq_len=128", "train.adam_beta1=0.8",
                             "train.adam_beta2=0.99", "train.adam_eps=1e-6", "train.steps=2",
                             "train.tensorboard=false", f"run.output_dir={tmp_path}"])
    assert ranks(1, _optimizer_settings, cfg.model_dump())[0] == ((0.8, 0.99), 1e-6)
