"""Kimi Delta Attention token mixer (Kimi Linear style), the self-attention of layer kind 'K'.

The same layer as Gated DeltaNet ('D', `gated_delta.py`: q/k/v projections, the short causal
convolution exact under cp, SiLU, L2-normalised q and k, beta = sigmoid(W_b x), per-head output
norm, W_o), with Kimi Linear's two differences:

    alpha = exp(-exp(A_log) * softplus(W_f2 W_f1 x + dt_bias))   one decay per key channel, [T, H, d]
    out   = W_o (RMSNorm_head(o) * sigmoid(W_g2 W_g1 x))           a low-rank sigmoid output gate

Both low-rank pairs go through the head dimension d, as in Kimi Linear. The delta rule runs with
`rule="kda"`: S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T, and its
context parallelism is the same affine-map all-gather (`schemes/delta.py`).
"""
from __future__ import annotations

import torch

from distattn.model.gated_delta import GatedDeltaNetAttention


class KimiDeltaAttention(GatedDeltaNetAttention):
    """Layer kind 'K': Kimi Delta Attention in place of megatron's SelfAttention."""

    rule = "kda"

    def _build_gates(self, h: int, H: int, d: int) -> None:
        self.linear_f1, self.linear_f2 = self._linear(h, d), self._linear(d, H * d)
        self.linear_g1, self.linear_g2 = self._linear(h, d), self._linear(d, H * d)
        self.dt_bias = torch.nn.Parameter(torch.zeros(H * d, dtype=self.config.params_dtype))

    def _gate_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_f2(self.linear_f1(x))

    def _output_gate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear_g2(self.linear_g1(x)))

    def _gate_projections(self) -> list[torch.nn.Linear]:
        return [self.linear_f1, self.linear_f2, self.linear_g1, self.linear_g2]


__all__ = ["KimiDeltaAttention"]
