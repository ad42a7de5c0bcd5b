"""The attention-server role of a training job (dedicated CAD, `parallel.attention_servers > 0`).

The last `attention_servers` ranks own no tokens and no parameters, split in
equal blocks over the dp groups: they join the process groups every rank
builds, then answer their dp group's cp trainers' core-attention
passes (each forward, each backward, and the repeated forwards of recomputed
layers) until the trainers release them at the end of training. Servers keep
no state between passes, so there is nothing of theirs to checkpoint.
"""
from __future__ import annotations

from distattn.comm import CommLedger
from distattn.config import Config
from distattn.mesh import MeshShape, ParallelMesh


def is_server_rank(cfg: Config, rank: int) -> bool:
    p = cfg.parallel
    return rank >= p.dp * p.cp and p.attention_servers > 0


def serve_attention(cfg: Config, ledger: CommLedger | None = None) -> int:
    """Serve the trainers' attention passes; returns how many passes this rank ran."""
    from distattn.cad.server import serve
    from distattn.train.trainer import build_schemes
    p = cfg.parallel
    mesh = ParallelMesh.build(MeshShape.from_cp(dp=p.dp, cp=p.cp, ulysses=p.ulysses,
                                                attention_servers=p.attention_servers))
    try:
        scheme, _ = build_schemes(cfg, mesh)
        return serve(scheme, mesh.attention_group, passes=None, ledger=ledger or CommLedger())
    finally:
        mesh.destroy()
