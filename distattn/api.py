"""The public functional API: shard, unshard, attention, linear_attention (see DESIGN.md).

Inputs are this rank's shard in the scheme's layout; `cu_seqlens` are the
document boundaries of the whole packed sequence, identical on every rank.
"""
from __future__ import annotations

import torch

from distattn.comm import Comm, CommLedger, default_ledger
from distattn.schemes.base import Scheme, get_scheme, group_rank_size


def _layout(scheme, n_tokens: int, group, cu_seqlens):
    _, world = group_rank_size(group)
    return get_scheme(scheme).layout(n_tokens, world, cu_seqlens)


def shard(x_full: torch.Tensor, *, scheme, group=None, cu_seqlens=None, dim: int = 0) -> torch.Tensor:
    """This rank's rows of a full [T, ...] tensor, in the scheme's layout."""
    rank, _ = group_rank_size(group)
    return _layout(scheme, x_full.shape[dim], group, cu_seqlens).shard(x_full, rank, dim=dim)


def unshard(x_local: torch.Tensor, *, scheme, group=None, cu_seqlens=None, n_tokens: int | None = None,
            ledger: CommLedger | None = None) -> torch.Tensor:
    """The full tensor on every rank, from every rank's shard (one uneven all-gather)."""
    comm = Comm(group, ledger if ledger is not None else default_ledger())
    if n_tokens is None:
        t = torch.tensor([x_local.shape[0]], dtype=torch.long)
        comm.all_reduce(t, op="sum")
        n_tokens = int(t.item())
    lay = _layout(scheme, n_tokens, group, cu_seqlens)
    sizes = lay.sizes()
    if x_local.shape[0] != sizes[comm.rank]:
        raise ValueError(f"rank {comm.rank} holds {x_local.shape[0]} rows but the {lay.name} layout "
                         f"of {n_tokens} tokens gives it {sizes[comm.rank]}")
    parts = comm.all_gather_uneven(x_local.contiguous(), sizes)
    return lay.unshard(list(parts))


def attention(q, k, v, *, scheme, group=None, cu_seqlens=None, causal: bool = True,
              softmax_scale: float | None = None, ledger: CommLedger | None = None,
              n_tokens: int | None = None) -> torch.Tensor:
    """Exact softmax attention of this rank's shard over the whole sequence.

    q [T_local, H, D]; k, v [T_local, Hkv, D]. Returns [T_local, H, D], differentiable.
    Pass `n_tokens` (the global length) to save one small all-reduce per call.
    """
    s = get_scheme(scheme)
    if s.kind != "softmax":
        raise ValueError(f"scheme {s.name!r} is for linear attention; call distattn.linear_attention")
    return s.attention(q, k, v, group=group, cu_seqlens=cu_seqlens, causal=causal,
                       softmax_scale=softmax_scale, ledger=ledger, n_tokens=n_tokens)


def _linear_scheme(scheme):
    """A linear-attention scheme object from a name ("lasp2", "lasp1", "local") or an object."""
    from distattn.schemes.lasp2 import LinearLocal
    from distattn.schemes.local import Local
    if isinstance(scheme, Local):  # the softmax "local" object: same role, no CP
        return LinearLocal(layout_name=scheme.layout_name)
    if scheme == "local":
        return LinearLocal()
    s = get_scheme(scheme)
    if s.kind != "linear":
        raise ValueError(f"scheme {s.name!r} is for softmax attention; linear_attention takes "
                         f"'lasp2', 'lasp1' or 'local'")
    return s


def linear_attention(q, k, v, *, scheme, group=None, cu_seqlens=None, decay=None,
                     feature_map: str | None = None, ledger: CommLedger | None = None,
                     n_tokens: int | None = None, rule: str = "decay", gate=None, beta=None) -> torch.Tensor:
    """Exact causal linear attention of this rank's shard over the whole sequence.

    o_t = sum_{s <= t, same document} lam^(t-s) (phi(q_t) . phi(k_s)) v_s, with no
    normalisation. q [T_local, H, dk]; k [T_local, Hkv, dk]; v [T_local, Hkv, dv].
    `scheme`: "lasp2" | "lasp1" | "local" or a configured linear scheme object.
    `decay`: None (lam = 1), a float, or a per-query-head [H] tensor in (0, 1].
    `feature_map`: None / "identity" or "elu1" (elu(x) + 1). Returns [T_local, H, dv].

    `rule="gated_delta"` (Gated DeltaNet) or `"kda"` (Kimi Delta Attention) runs the delta rule
    instead, S_t = M_t S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t, with `gate` (alpha, [T_local, H]
    for gated_delta, [T_local, H, dk] for kda) and `beta` [T_local, H]; q, k, v share their heads and
    feature maps and normalisation are the caller's. Schemes "lasp2", "lasp1" and "local".
    """
    s = _linear_scheme(scheme)
    if rule != "decay":
        if not hasattr(s, "linear_attention") or s.name not in ("lasp2", "lasp1", "local"):
            raise ValueError(f"rule={rule!r} runs on schemes 'lasp2', 'lasp1' and 'local', got {s.name!r}")
        return s.linear_attention(q, k, v, group=group, cu_seqlens=cu_seqlens, ledger=ledger,
                                  n_tokens=n_tokens, rule=rule, gate=gate, beta=beta)
    return s.linear_attention(q, k, v, group=group, cu_seqlens=cu_seqlens, decay=decay,
                              feature_map=feature_map, ledger=ledger, n_tokens=n_tokens)
