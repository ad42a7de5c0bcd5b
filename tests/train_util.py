"""Rank-side helpers for trainer tests (module level so spawned ranks can import them)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from distattn.config import Config


def one_step(cfg_dict: dict, steps: int = 1):
    """Train `steps` steps; rank 0 returns losses and the flattened parameters."""
    from distattn.train.serve import is_server_rank, serve_attention
    from distattn.train.trainer import Trainer
    cfg = Config.model_validate(cfg_dict)
    if is_server_rank(cfg, dist.get_rank()):  # dedicated CAD: this rank only serves attention
        serve_attention(cfg)
        return None
    tr = Trainer(cfg, quiet=True)
    losses = [tr.train_step().loss for _ in range(steps)]
    flat = whole_parameters(tr)
    tr.release_servers()
    tr.mesh.destroy()
    return (losses, flat) if dist.get_rank() == 0 else None


def whole_parameters(tr) -> torch.Tensor:
    """Every parameter whole (FSDP shards gathered, tp parts joined), flattened in model order."""
    from distattn.model.tp_weights import gather_full
    from distattn.train.fsdp import full_tensor
    return torch.cat([gather_full(n, full_tensor(p.detach()), tr.tp_comm).reshape(-1).float()
                      for n, p in tr.model.named_parameters()])


def fit(cfg_dict: dict, resume: bool = False, stop_at: int | None = None):
    from distattn.train.trainer import Trainer
    cfg = Config.model_validate(cfg_dict)
    tr = Trainer(cfg, resume=resume, quiet=True)
    hist = tr.fit(stop_at=stop_at)
    tr.mesh.destroy()
    return [h.loss for h in hist]


def step_records(cfg_dict: dict):
    """Rank 0: the ledger records of a second training step (op, bytes sent, tag) and the parameter count."""
    from distattn.plan.memory import param_count
    from distattn.train.trainer import Trainer
    cfg = Config.model_validate(cfg_dict)
    tr = Trainer(cfg, quiet=True)
    tr.train_step()
    tr.train_step()  # the ledger is reset at each step: this one is the steady state
    recs = [(r.op, r.bytes_sent, r.tag) for r in tr.ledger.records]
    tr.mesh.destroy()
    return (recs, param_count(cfg.model)) if tr.rank == 0 else None


def validation(cfg_dict: dict) -> float:
    """The validation loss of the initial weights (eval.val_sequences held-out sequences)."""
    from distattn.eval.run import validation_loss
    from distattn.train.trainer import Trainer
    tr = Trainer(Config.model_validate(cfg_dict), quiet=True)
    loss = validation_loss(tr)
    tr.mesh.destroy()
    return loss
