"""The Trainer as the launchers run it: step and checkpoint callbacks, and a fault hook.

The fault hook (`DISTATTN_FAULT_INJECT="rank=R,step=S,marker=PATH[,kind=exit|raise]"`)
lets tests reproduce what only happens on a rank: a process that dies (`exit`,
which the Ray launcher restarts from the latest checkpoint) or a rank that
raises (`raise`, reported by the driver in one line).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from distattn.train.launch_errors import LaunchError

FAULT_ENV = "DISTATTN_FAULT_INJECT"


@dataclass(frozen=True)
class Fault:
    """Make `rank` exit hard (os._exit(1)), or raise, right before training step `step`, once.

    The marker file is created first, so a restarted group passes by.
    """

    rank: int
    step: int
    marker: str
    kind: str = "exit"

    @classmethod
    def from_env(cls) -> "Fault | None":
        spec = os.environ.get(FAULT_ENV)
        if not spec:
            return None
        try:
            kv = dict(item.split("=", 1) for item in spec.split(","))
            fault = cls(rank=int(kv["rank"]), step=int(kv["step"]), marker=kv["marker"],
                        kind=kv.get("kind", "exit"))
        except (KeyError, ValueError):
            fault = None
        if fault is None or fault.kind not in ("exit", "raise"):
            raise LaunchError(f"{FAULT_ENV}={spec!r}: expected rank=R,step=S,marker=PATH"
                              f"[,kind=exit|raise]")
        return fault

    def maybe_fire(self, rank: int, next_step: int) -> None:
        if rank != self.rank or next_step != self.step or os.path.exists(self.marker):
            return
        with open(self.marker, "w") as f:
            f.write(f"rank {rank} stopped before step {next_step} ({self.kind})\n")
        if self.kind == "raise":
            raise RuntimeError(f"injected failure on rank {rank} before step {next_step} ({FAULT_ENV})")
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(0.2)  # the output tee forwards what is written
        os._exit(1)


def hooked_trainer(cfg, resume, quiet: bool, fault: Fault | None = None,
                   on_step: Callable | None = None, on_checkpoint: Callable | None = None):
    """A Trainer that fires `fault` and calls on_step(log) / on_checkpoint(step, path)."""
    from distattn.train.trainer import Trainer

    class HookedTrainer(Trainer):
        def train_step(self):
            if fault is not None:
                fault.maybe_fire(self.rank, self.step + 1)
            log = super().train_step()
            if on_step is not None:
                on_step(log)
            return log

        def save_checkpoint(self):
            path = super().save_checkpoint()
            if on_checkpoint is not None:
                on_checkpoint(self.step, path)
            return path

    return HookedTrainer(cfg, resume=resume, quiet=quiet)
