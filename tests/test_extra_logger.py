"""train.logger: the step scalars also go to Weights & Biases or MLflow through their public calls."""
from __future__ import annotations

import sys
import types

import pytest

from distattn.config import load_config
from distattn.train.logging import RunLogger
from distattn.train.trainer import StepLog


def _fake_wandb(calls):
    mod = types.ModuleType("wandb")

    class Run:
        def log(self, scalars, step):
            calls.append(("log", dict(scalars), step))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()
    mod.init = init
    return mod


def _fake_mlflow(calls):
    mod = types.ModuleType("mlflow")
    mod.start_run = lambda **kw: calls.append(("start", kw))
    mod.log_params = lambda params: calls.append(("params", dict(params)))
    mod.log_metrics = lambda metrics, step: calls.append(("log", dict(metrics), step))
    mod.end_run = lambda: calls.append(("end",))
    return mod


@pytest.mark.parametrize("kind,fake", [("wandb", _fake_wandb), ("mlflow", _fake_mlflow)])
def test_step_scalars_reach_the_extra_logger(kind, fake, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, kind, fake(calls))
    cfg = load_config(None, ["run.name=exp1", f"run.output_dir={tmp_path}", "train.tensorboard=false"])
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"logger": kind})})
    from distattn.comm import CommLedger
    logger = RunLogger(cfg, enabled=True, quiet=True)
    logger.log(StepLog(step=1, loss=2.5, lr=1e-3, grad_norm=0.5, tokens=1024, step_s=0.5, comm_bytes=4096,
                       exposed_s=0.01), CommLedger())
    logger.close()
    logged = [c for c in calls if c[0] == "log"]
    assert len(logged) == 1 and logged[0][2] == 1
    scalars = logged[0][1]
    sep = "/" if kind == "wandb" else "_"
    assert scalars[f"train{sep}loss"] == 2.5
    assert scalars[f"perf{sep}tokens_per_s"] == 2048.0  # 1024 tokens in 0.5 s
    assert scalars[f"comm{sep}bytes_sent"] == 4096.0
    assert calls[-1][0] in ("finish", "end")
    first = calls[0]
    assert (first[1]["name"] if kind == "wandb" else first[1]["run_name"]) == "exp1"


def test_disabled_ranks_open_no_logger(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "train.tensorboard=false"])
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"logger": "wandb"})})
    RunLogger(cfg, enabled=False, quiet=True).close()
    assert calls == []
