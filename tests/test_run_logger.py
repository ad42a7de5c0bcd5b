"""TensorBoard logs of a run resumed from an older checkpoint drop the abandoned steps after it."""
from __future__ import annotations

from distattn.comm import CommLedger
from distattn.config import load_config
from distattn.train.logging import RunLogger
from distattn.train.trainer import StepLog


def _log(logger, step, loss):
    logger.log(StepLog(step=step, loss=loss, lr=1e-3, grad_norm=1.0, tokens=10, step_s=1.0, comm_bytes=0,
                       exposed_s=0.0), CommLedger())


def test_resume_from_an_older_step_purges_the_later_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "train.log_every=1000"])
    first = RunLogger(cfg, enabled=True, quiet=True)
    for step in (1, 2, 3, 4):
        _log(first, step, 10.0 + step)
    first.close()
    resumed = RunLogger(cfg, enabled=True, quiet=True, start_step=2)  # --resume 2
    _log(resumed, 3, 99.0)
    resumed.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert losses == {1: 11.0, 2: 12.0, 3: 99.0}
