"""Gated DeltaNet token mixer (Qwen3-Next style), the self-attention of layer kind 'D'.

It replaces megatron's SelfAttention in a TransformerLayer (the layer's norms and MLP stay
megatron's): from the normed hidden states x [s, 1, h] of this rank's tokens,

    q, k, v   = SiLU(causal depthwise conv_4([W_q x, W_k x, W_v x]))   (restarts at documents)
    q, k      = L2-normalised per head, q scaled by d^-1/2
    alpha     = exp(-exp(A_log) * softplus(W_a x + dt_bias)),  beta = sigmoid(W_b x)
    o         = gated delta rule over the whole sequence (distattn.linear_attention: lasp2, lasp1, local)
    out       = W_o (RMSNorm_head(o) * SiLU(W_g x))

with H = num_attention_heads heads of d = h / H for q, k and v. Context parallelism is exact:
the convolution reads the 3 tokens before each of this rank's runs through one halo all-gather
(`distattn.model.conv_halo`), the delta rule exchanges affine state maps (`schemes/delta.py`).
No tensor parallelism: the config refuses parallel.tp > 1 with a 'D' layer. Kimi Delta
Attention (kind 'K', `kimi_delta.py`) is this layer with other gates, through the hooks
`_build_gates`, `_gate_input` and `_output_gate`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from distattn.comm import Comm
from distattn.model.attention import AttentionContext
from distattn.model.conv_halo import KERNEL, causal_conv_with_halo

MIN_LOG_GATE = -60.0  # the kernel takes log(alpha): keep alpha a normal fp32 number


class GatedDeltaCore(MegatronModule):
    """The delta rule itself, called like megatron's core attention (query, key, value).

    `value` carries the gate alpha (1 channel for `rule="gated_delta"`, d_k for `"kda"`) and beta as
    its last channels, so selective recomputation, which replays core attention from its three
    inputs, keeps their gradients.
    """

    def __init__(self, config, *, context: AttentionContext, rule: str = "gated_delta"):
        super().__init__(config=config)
        self.context = context
        self.rule = rule

    def forward(self, query, key, value, attention_mask=None, **kwargs):
        import distattn
        ctx = self.context
        width = 1 if self.rule == "gated_delta" else query.shape[-1]  # channels of alpha
        v, alpha, beta = value[..., :-width - 1], value[..., -width - 1:-1], value[..., -1]
        if self.rule == "gated_delta":
            alpha = alpha[..., 0]
        return distattn.linear_attention(query, key, v.contiguous(), scheme=ctx.linear_scheme,
                                         group=ctx.group, cu_seqlens=ctx.cu_seqlens, rule=self.rule,
                                         gate=alpha.contiguous(), beta=beta.contiguous(), ledger=ctx.ledger,
                                         n_tokens=ctx.n_tokens)


class GatedDeltaNetAttention(MegatronModule):
    """Layer kind 'D': Gated DeltaNet in place of megatron's SelfAttention; returns (output, None)."""

    def __init__(self, config, layer_number: int = 1, pg_collection=None, cp_comm_type=None, *,
                 context: AttentionContext, **kwargs):
        super().__init__(config=config)
        self.context = context
        self.layer_number = layer_number
        tp = getattr(getattr(pg_collection, "tp", None), "size", lambda: 1)()
        if tp > 1:
            raise ValueError(f"delta-rule layers ('D', 'K') run without tensor parallelism, got tp={tp}; "
                             f"set parallel.tp=1")
        h, H = config.hidden_size, config.num_attention_heads
        if h % H:
            raise ValueError(f"hidden_size={h} must be divisible by num_attention_heads={H}")
        self.heads, self.head_dim = H, h // H
        hd, dt = H * self.head_dim, config.params_dtype
        self.linear_q, self.linear_k, self.linear_v = (self._linear(h, hd) for _ in range(3))
        self.linear_b, self.linear_o = self._linear(h, H), self._linear(hd, h)
        self.conv_weight = torch.nn.Parameter(torch.empty(3 * hd, KERNEL, dtype=dt))
        self.A_log = torch.nn.Parameter(torch.empty(H, dtype=dt))
        self.norm_weight = torch.nn.Parameter(torch.ones(self.head_dim, dtype=dt))
        self._build_gates(h, H, self.head_dim)
        self.core_attention = GatedDeltaCore(config, context=context, rule=self.rule)
        self.reset_parameters()

    rule = "gated_delta"

    def _linear(self, i: int, o: int) -> torch.nn.Linear:
        return torch.nn.Linear(i, o, bias=False, dtype=self.config.params_dtype)

    def _build_gates(self, h: int, H: int, d: int) -> None:
        """Gated DeltaNet: one decay per head and token (W_a), a full-rank output gate (W_g)."""
        self.linear_a, self.linear_g = self._linear(h, H), self._linear(h, H * d)
        self.dt_bias = torch.nn.Parameter(torch.zeros(H, dtype=self.config.params_dtype))

    def _gate_input(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-activation of the decay: [T, H] (a scalar per head)."""
        return self.linear_a(x)

    def _output_gate(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(W_g x), [T, H * d]."""
        return F.silu(self.linear_g(x))

    def _gate_projections(self) -> list[torch.nn.Linear]:
        return [self.linear_a, self.linear_g]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Megatron's normal(0, init_method_std) for the projections; A_log = log U(1, 16) as in Mamba2."""
        std = self.config.init_method_std
        for lin in (self.linear_q, self.linear_k, self.linear_v, self.linear_b, *self._gate_projections()):
            torch.nn.init.normal_(lin.weight, mean=0.0, std=std)
        # the output projection feeds the residual stream: megatron's std / sqrt(2 * num_layers)
        torch.nn.init.normal_(self.linear_o.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_layers))
        # a 4-tap depthwise kernel: fan-in 4, torch's conv default bound
        torch.nn.init.uniform_(self.conv_weight, -1.0 / math.sqrt(KERNEL), 1.0 / math.sqrt(KERNEL))
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1.0, 16.0).log())
        # (one dt_bias per head for Gated DeltaNet, per head and channel for KDA)
        # dt = softplus(dt_bias) log-uniform in [1e-3, 0.1] (Mamba2, Gated DeltaNet): per-token decays
        # exp(-A dt) from ~0.2 to ~1, so every head keeps some memory and its gate gets a gradient
        dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp().clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.norm_weight.fill_(1.0)

    def _conv(self, qkv: torch.Tensor) -> torch.Tensor:
        """The short convolution over this rank's tokens, exact across the cp group."""
        ctx = self.context
        if ctx.linear_scheme is None:
            raise ValueError("delta-rule layers ('D', 'K') need AttentionContext.linear_scheme (lasp2, lasp1, "
                             "or local without context parallelism)")
        comm = Comm(ctx.group, ctx.ledger)
        n = ctx.n_tokens if ctx.n_tokens is not None else qkv.shape[0] * comm.size
        lay = ctx.linear_scheme.layout(n, comm.size, ctx.cu_seqlens)
        return causal_conv_with_halo(qkv, self.conv_weight, [lay.runs(r) for r in range(comm.size)],
                                     comm.rank, comm)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if hidden_states.shape[1] != 1:
            raise ValueError(f"distattn runs packed sequences with micro-batch dimension 1, "
                             f"got {hidden_states.shape[1]}")
        x = hidden_states[:, 0]
        T, H, d = x.shape[0], self.heads, self.head_dim
        qkv = torch.cat([self.linear_q(x), self.linear_k(x), self.linear_v(x)], dim=-1)
        q, k, v = F.silu(self._conv(qkv)).view(T, 3, H, d).unbind(1)
        q = F.normalize(q, dim=-1, eps=1e-6) * d ** -0.5
        k = F.normalize(k, dim=-1, eps=1e-6)
        pre = (self._gate_input(x).float() + self.dt_bias.float()).view(T, H, -1)  # [T, H, 1 or d]
        log_alpha = -self.A_log.float().exp().view(H, 1) * F.softplus(pre)
        alpha = log_alpha.clamp(min=MIN_LOG_GATE).exp()
        beta = torch.sigmoid(self.linear_b(x).float())
        # fp32 like the kernel's internals: a bf16 gate near 1 would round to exactly 1
        value = torch.cat([v.float(), alpha, beta.unsqueeze(-1)], dim=-1)
        o = self.core_attention(q.contiguous(), k.contiguous(), value, None)
        of = o.float()
        o = (of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + 1e-6)).to(o.dtype) * self.norm_weight
        o = o * self._output_gate(x).view(T, H, d)
        return self.linear_o(o.reshape(T, H * d)).unsqueeze(1), None


__all__ = ["GatedDeltaCore", "GatedDeltaNetAttention"]
