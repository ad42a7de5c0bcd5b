"""Learning-rate schedules as multipliers of `train.lr`, for torch's LambdaLR.

All start with a linear warmup over `train.warmup_steps` and end at `train.min_lr`
on the last step (except `constant`, which stays at `train.lr`):
- cosine: half a cosine from lr down to min_lr (the default);
- linear: a straight line from lr down to min_lr;
- constant: lr after warmup;
- wsd (warmup-stable-decay): lr until the last `train.wsd_decay_fraction` of the
  steps, then a linear decay to min_lr; the schedule of choice for continued
  training, since a run can be extended from any checkpoint in the stable phase.
"""
from __future__ import annotations

import math
from typing import Callable

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def lr_lambda(train_cfg) -> Callable[[int], float]:
    """The multiplier of lr at each optimizer step (0-based), per `train.schedule`."""
    lr, min_lr, warm, steps = train_cfg.lr, train_cfg.min_lr, train_cfg.warmup_steps, train_cfg.steps
    kind = getattr(train_cfg, "schedule", "cosine")
    floor = min_lr / lr
    decay_from = warm
    if kind == "wsd":
        decay_from = max(warm, steps - max(1, round(train_cfg.wsd_decay_fraction * steps)))

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant" or step < decay_from:
            return 1.0
        t = min(1.0, (step - decay_from) / max(1, steps - decay_from))
        if kind == "cosine":
            return floor + 0.5 * (1.0 - floor) * (1 + math.cos(math.pi * t))
        return floor + (1.0 - floor) * (1.0 - t)  # linear, and wsd's decay phase
    return f


__all__ = ["SCHEDULES", "lr_lambda"]
