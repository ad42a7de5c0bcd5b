"""Step logs: a console line with an ETA, and TensorBoard scalars (rank 0 only)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def step_scalars(log, tok_s: float) -> dict[str, float]:
    """The scalars of one step, named as in TensorBoard, for the other loggers."""
    out = {"train/loss": log.loss, "train/lr": log.lr, "train/grad_norm": log.grad_norm,
           "perf/tokens_per_s": tok_s, "perf/step_s": log.step_s, "comm/bytes_sent": float(log.comm_bytes),
           "comm/exposed_s": log.exposed_s}
    out.update({k: float(v) for k, v in log.extra.items()})
    return out


class _Wandb:
    """Weights & Biases: one run per distattn run, named after run.name, offline if WANDB_MODE says so."""

    def __init__(self, cfg):
        import wandb
        self._wandb = wandb
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "distattn"), name=cfg.run.name,
                               dir=str(Path(cfg.run.output_dir)), config=cfg.model_dump(mode="json"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


class _Mlflow:
    """MLflow: one run named after run.name, the config as parameters (tracking URI from MLFLOW_TRACKING_URI)."""

    def __init__(self, cfg):
        import mlflow
        self._mlflow = mlflow
        mlflow.start_run(run_name=cfg.run.name)
        flat = {f"{sec}.{k}": v for sec, vals in cfg.model_dump(mode="json").items() for k, v in vals.items()}
        mlflow.log_params({k: str(v)[:250] for k, v in flat.items()})

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


def open_extra_logger(cfg):
    """The logger named by train.logger beside TensorBoard, or None."""
    kind = cfg.train.logger
    if kind == "none":
        return None
    return {"wandb": _Wandb, "mlflow": _Mlflow}[kind](cfg)


class RunLogger:
    """Writes what a person watching a run wants: loss, speed, traffic, time left."""

    def __init__(self, cfg, enabled: bool, start_step: int = 0, quiet: bool = False):
        self.cfg = cfg
        self.enabled = enabled
        self.quiet = quiet
        self.start = time.perf_counter()
        self.start_step = start_step
        self.writer = None
        self.tb_dir = Path(cfg.run.output_dir) / "tensorboard"
        if enabled and cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # a resumed run continues the event files; purge_step drops what an abandoned
            # continuation of an older checkpoint wrote past it
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=start_step + 1 if start_step else None)
        self.extra = open_extra_logger(cfg) if enabled else None
        if enabled and not quiet:
            p, a = cfg.parallel, cfg.attention
            print(f"distattn train: {cfg.model.num_layers} layers ({cfg.model.layer_kinds()}), "
                  f"hidden {cfg.model.hidden_size}, seq_len {cfg.data.seq_len}, dp={p.dp} cp={p.cp} "
                  + (f"tp={p.tp}{' (sequence parallel)' if p.sequence_parallel else ''} " if p.tp > 1 else "")
                  + f"scheme={a.scheme} layout={a.layout}, {cfg.train.steps} steps", flush=True)
            if self.writer is not None:
                print(f"TensorBoard logs: {self.tb_dir}  (tensorboard --logdir {self.tb_dir})", flush=True)

    def log(self, log, ledger) -> None:
        if not self.enabled:
            return
        t = self.cfg.train
        done = log.step - self.start_step
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(done, 1) * (t.steps - log.step)
        tok_s = log.tokens / log.step_s if log.step_s > 0 else 0.0
        if self.extra is not None:
            self.extra.log(step_scalars(log, tok_s), log.step)
        if self.writer is not None:
            w = self.writer
            w.add_scalar("train/loss", log.loss, log.step)
            w.add_scalar("train/lr", log.lr, log.step)
            w.add_scalar("train/grad_norm", log.grad_norm, log.step)
            w.add_scalar("perf/tokens_per_s", tok_s, log.step)
            w.add_scalar("perf/step_s", log.step_s, log.step)
            w.add_scalar("comm/bytes_sent", log.comm_bytes, log.step)
            w.add_scalar("comm/exposed_s", log.exposed_s, log.step)
            for op, s in ledger.summary().items():
                w.add_scalar(f"comm_bytes/{op}", s.bytes_sent, log.step)
            for key, value in log.extra.items():
                w.add_scalar(key, value, log.step)
            w.flush()
        if not self.quiet and (log.step % t.log_every == 0 or log.step == t.steps):
            print(f"step {log.step:>5}/{t.steps}  loss {log.loss:.4f}  lr {log.lr:.2e}  "
                  f"gnorm {log.grad_norm:.2f}  {tok_s:,.0f} tok/s  comm {log.comm_bytes / 2**20:.1f} MiB "
                  f"exposed {log.exposed_s * 1e3:.0f} ms  eta {_fmt_eta(eta)}", flush=True)

    def log_validation(self, step: int, loss: float) -> None:
        """train.eval_every: the held-out loss (console, TensorBoard val/loss, the extra logger)."""
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.add_scalar("val/loss", loss, step)
            self.writer.flush()
        if self.extra is not None:
            self.extra.log({"val/loss": loss}, step)
        if not self.quiet:
            print(f"step {step:>5}/{self.cfg.train.steps}  validation loss {loss:.4f} "
                  f"({self.cfg.eval.val_sequences} held-out sequences)", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.extra is not None:
            self.extra.close()
        if self.enabled:
            sys.stdout.flush()
