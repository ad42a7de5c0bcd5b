"""Linear attention's inputs: checks, how query heads, KV heads and states line up (`HeadPlan`),
feature maps, and the grouped fp32 layout the kernels in `linear.py` compute in."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_BLOCK = 64
FEATURE_MAPS = ("identity", "elu1")
F32 = torch.float32


# ----------------------------------------------------------------------------- checks


def check_linear_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Clear errors for packed [tokens, heads, head_dim] inputs (v may have its own head_dim)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"linear attention expects packed [tokens, heads, head_dim] tensors; got "
                         f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k, v must hold the same tokens, got q{tuple(q.shape)} k{tuple(k.shape)} "
                         f"v{tuple(v.shape)}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same heads, got k{tuple(k.shape)} v{tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k head_dim differ: {q.shape[2]} vs {k.shape[2]}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"GQA needs q heads % kv heads == 0: {q.shape[1]} q heads, "
                         f"{k.shape[1]} kv heads")


def check_block(block: int) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"linear attention block must be a positive integer (tokens per block, "
                         f"e.g. {DEFAULT_BLOCK}), got {block!r}")
    return block


def check_feature_map(name: str | None) -> str:
    name = "identity" if name is None else name
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS} (or None for identity), got {name!r}")
    return name


def normalize_decay(decay, heads: int) -> torch.Tensor | None:
    """None (no decay), a float, or a per-head [heads] tensor in (0, 1] -> fp64 [heads] or None.

    Returns None when every lam is exactly 1, so the undecayed path skips the
    decay multiplications. The decay is a constant: no gradient flows into it.
    """
    if decay is None:
        return None
    if isinstance(decay, bool):
        raise ValueError(f"decay must be None, a float or a [heads] tensor in (0, 1], got {decay!r}")
    if isinstance(decay, torch.Tensor):
        if decay.dim() == 0:
            lam = decay.detach().to("cpu", torch.float64).expand(heads).clone()
        elif decay.dim() == 1 and decay.shape[0] == heads:
            lam = decay.detach().to("cpu", torch.float64)
        else:
            raise ValueError(f"a decay tensor must be a scalar or hold one value per query head "
                             f"([{heads}]), got shape {tuple(decay.shape)}")
    else:
        try:
            lam = torch.full((heads,), float(decay), dtype=torch.float64)
        except (TypeError, ValueError):
            raise ValueError(f"decay must be None, a float or a [heads] tensor in (0, 1], "
                             f"got {decay!r}") from None
    bad = [(i, float(x)) for i, x in enumerate(lam.tolist()) if not (0.0 < x <= 1.0)]
    if bad:
        raise ValueError("decay values must lie in (0, 1] (1 = no decay), got "
                         + ", ".join(f"head {i}: {x}" for i, x in bad[:4]))
    if bool((lam == 1.0).all()):
        return None
    return lam


# ----------------------------------------------------------------------------- heads


@dataclass(frozen=True)
class HeadPlan:
    """How query heads, KV heads and states line up (see the module docstring)."""

    heads: int  # query heads H
    kv_heads: int  # KV heads Hkv
    groups: int  # A: state heads
    rep: int  # R: query heads per state head
    repeat_kv: bool  # K/V repeated to H heads (decay differs inside a GQA group)
    log_decay: tuple[float, ...] | None  # log lam per state head, None = no decay

    def loglam(self, device) -> torch.Tensor | None:
        if self.log_decay is None:
            return None
        return torch.tensor(self.log_decay, dtype=F32, device=device)


def plan_heads(heads: int, kv_heads: int, decay=None) -> HeadPlan:
    """Per-KV-head states when the decay allows it, per-query-head states otherwise."""
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"GQA needs q heads % kv heads == 0: {heads} q heads, {kv_heads} kv heads")
    lam = normalize_decay(decay, heads)
    rep = heads // kv_heads
    if lam is None:
        return HeadPlan(heads, kv_heads, kv_heads, rep, False, None)
    grouped = lam.view(kv_heads, rep)
    if bool((grouped == grouped[:, :1]).all()):
        return HeadPlan(heads, kv_heads, kv_heads, rep, False,
                        tuple(math.log(x) for x in grouped[:, 0].tolist()))
    return HeadPlan(heads, kv_heads, heads, 1, True, tuple(math.log(x) for x in lam.tolist()))


# ----------------------------------------------------------------------------- feature maps


def feature_map(x: torch.Tensor, name: str | None) -> torch.Tensor:
    """phi(x) in fp32."""
    name = check_feature_map(name)
    x = x.to(F32)
    if name == "elu1":
        return F.elu(x) + 1.0
    return x


def feature_map_backward(x: torch.Tensor, grad: torch.Tensor, name: str | None) -> torch.Tensor:
    """d loss / d x from d loss / d phi(x) (fp32)."""
    name = check_feature_map(name)
    if name == "elu1":
        xf = x.to(F32)
        return grad * torch.where(xf > 0, torch.ones_like(xf), torch.exp(torch.clamp(xf, max=0.0)))
    return grad


# ----------------------------------------------------------------------------- layout changes


def group_q(x: torch.Tensor, plan: HeadPlan) -> torch.Tensor:
    """[T, H, d] -> [A, R, T, d] fp32 contiguous."""
    t, _, d = x.shape
    return x.to(F32).permute(1, 0, 2).reshape(plan.groups, plan.rep, t, d).contiguous()


def group_kv(x: torch.Tensor, plan: HeadPlan) -> torch.Tensor:
    """[T, Hkv, d] -> [A, 1, T, d] fp32 contiguous (repeated per query head if the plan says so)."""
    x = x.to(F32)
    if plan.repeat_kv:
        x = x.repeat_interleave(plan.heads // plan.kv_heads, dim=1)
    return x.permute(1, 0, 2).unsqueeze(1).contiguous()


def ungroup_q(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[A, R, T, d] -> [T, H, d] in `dtype`."""
    a, r, t, d = g.shape
    return g.reshape(a * r, t, d).permute(1, 0, 2).to(dtype).contiguous()


def ungroup_kv(g: torch.Tensor, plan: HeadPlan) -> torch.Tensor:
    """[A, 1, T, d] -> [T, Hkv, d] fp32 (summing the gradients of repeated K/V heads)."""
    _, _, t, d = g.shape
    g = g[:, 0]
    if plan.repeat_kv:
        g = g.view(plan.kv_heads, plan.heads // plan.kv_heads, t, d).sum(1)
    return g.permute(1, 0, 2).contiguous()


def group_inputs(q, k, v, plan: HeadPlan, fmap: str | None):
    """phi(q), phi(k), v in the grouped fp32 layout."""
    return (group_q(feature_map(q, fmap), plan), group_kv(feature_map(k, fmap), plan),
            group_kv(v, plan))
