"""Rotary position embedding from explicit positions, with the scalings used for context extension.

Context parallelism scatters a sequence across ranks in layouts (zigzag,
per-document) where a local row's position is not its row index, and packed
documents restart at position 0. So RoPE is applied from each token's position
inside its document, computed by the layout, never from a local arange.

Extending a pretrained model's context changes the rotary frequencies
(`RopeScaling`): a new theta (`model.rope_base`), `linear` position
interpolation (every frequency divided by `factor`), `yarn` (interpolate the
low frequencies, keep the high ones, blend between, and scale cos/sin by an
attention factor) and `llama3` (Llama-3.1's piecewise rule). The frequencies are
computed as Hugging Face transformers computes them for the same config, so a
converted checkpoint sees exactly the rotations it was trained with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_TYPES = ("none", "linear", "yarn", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """One rotary scaling; the fields of Hugging Face's `rope_scaling` / `rope_parameters`."""

    type: str = "none"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0       # llama3
    high_freq_factor: float = 4.0      # llama3
    beta_fast: float = 32.0            # yarn
    beta_slow: float = 1.0             # yarn
    mscale: float | None = None        # yarn (DeepSeek-style attention factor)
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True              # yarn: round the correction range outwards

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ValueError(f"rope scaling type {self.type!r} is not supported; choose one of "
                             f"{', '.join(ROPE_TYPES)}")
        if self.type != "none":
            if not self.factor > 0:
                raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
            if self.type in ("yarn", "llama3") and not self.original_max_position_embeddings:
                raise ValueError(f"rope scaling {self.type} needs original_max_position_embeddings "
                                 f"(the pretraining context length)")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                             f"{self.high_freq_factor} and {self.low_freq_factor}")


NO_SCALING = RopeScaling()


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(head_dim: int, base: float = 10000.0, scaling: RopeScaling = NO_SCALING,
                     device=None) -> tuple[torch.Tensor, float]:
    """The inverse frequencies [head_dim / 2] (fp32) and the factor cos/sin are multiplied by."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exps = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    inv = 1.0 / (base ** exps)
    kind = scaling.type
    if kind == "none":
        return inv, 1.0
    if kind == "linear":
        return inv / scaling.factor, 1.0
    if kind == "llama3":
        f, lo, hi = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
        old = scaling.original_max_position_embeddings
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / f + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    f = scaling.factor
    attn = scaling.attention_factor
    if attn is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attn = float(_yarn_mscale(f, scaling.mscale) / _yarn_mscale(f, scaling.mscale_all_dim))
        else:
            attn = _yarn_mscale(f)
    old = scaling.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low),
                       0, 1)
    extrapolation, interpolation = inv, 1.0 / (f * (base ** exps))
    keep = 1 - ramp  # 1: keep the original (high) frequency, 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep, float(attn)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0,
                 dtype: torch.dtype = torch.float32,
                 scaling: RopeScaling = NO_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, 1, head_dim] for the given positions (computed in fp32)."""
    inv, attn = rope_frequencies(head_dim, base, scaling, device=positions.device)
    ang = positions.to(torch.float32)[:, None] * inv[None, :]
    ang = torch.cat((ang, ang), dim=-1)
    cos, sin = ang.cos(), ang.sin()
    if attn != 1.0:
        cos, sin = cos * attn, sin * attn
    return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by the half-split convention (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    rot = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


__all__ = ["NO_SCALING", "ROPE_TYPES", "RopeScaling", "apply_rope", "rope_cos_sin", "rope_frequencies"]
