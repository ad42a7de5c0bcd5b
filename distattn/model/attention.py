"""The core-attention module megatron-core's layers call: a distattn scheme.

Megatron's SelfAttention projects q/k/v; this module receives them for this
rank's shard and computes exact attention over the whole sequence through a
context-parallel scheme. Per-batch facts (document boundaries, each local
token's position, the global length) live in an `AttentionContext` that the
trainer fills before every forward and hands to every layer explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.transformer.module import MegatronModule

from distattn.comm import CommLedger
from distattn.model.rope import NO_SCALING, RopeScaling, apply_rope, rope_cos_sin


@dataclass
class AttentionContext:
    """What every attention layer of a model needs for the current micro-batch."""

    group: object = None                  # the CP process group (None: single process)
    softmax_scheme: object = None         # a configured distattn softmax scheme
    linear_scheme: object = None          # a configured distattn linear scheme
    ledger: CommLedger | None = None
    rope_base: float = 10000.0
    rope_scaling: RopeScaling = NO_SCALING  # context extension (linear, yarn, llama3)
    cu_seqlens: list[int] | None = None   # documents of the whole packed sequence
    positions: torch.Tensor | None = None  # position in its document of every local token
    n_tokens: int | None = None           # global sequence length
    softmax_group: object = None          # the softmax scheme's group when not `group` (CAD servers)
    _rope: dict = field(default_factory=dict, repr=False)

    def set_batch(self, cu_seqlens, positions: torch.Tensor, n_tokens: int) -> None:
        self.cu_seqlens, self.positions, self.n_tokens = list(cu_seqlens), positions, int(n_tokens)
        self._rope.clear()

    def rope(self, head_dim: int, device, dtype=torch.float32):
        key = (head_dim, str(device))
        if key not in self._rope:
            if self.positions is None:
                raise RuntimeError("AttentionContext.set_batch() must be called before the forward")
            self._rope[key] = rope_cos_sin(self.positions.to(device), head_dim, self.rope_base,
                                           scaling=self.rope_scaling)
        return self._rope[key]


def linear_decay(num_heads: int) -> torch.Tensor:
    """Per-head decay 1 - 2^-(5 + 8h/H): a spread of memory lengths (RetNet-style)."""
    h = torch.arange(num_heads, dtype=torch.float32)
    return 1.0 - torch.pow(2.0, -(5.0 + 8.0 * h / max(num_heads, 1)))


class DistAttnCore(MegatronModule):
    """Softmax attention through a distattn scheme, RoPE from global positions."""

    kind = "softmax"

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, *, context: AttentionContext):
        super().__init__(config=config)
        self.context = context
        self.softmax_scale = softmax_scale
        self.layer_number = layer_number

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if query.shape[1] != 1:
            raise ValueError(f"distattn runs packed sequences with micro-batch dimension 1, got {query.shape[1]}")
        ctx = self.context
        q, k, v = query[:, 0], key[:, 0], value[:, 0]
        cos, sin = ctx.rope(q.shape[-1], q.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self._attend(q, k, v.contiguous())
        return out.reshape(out.shape[0], 1, -1)

    def _attend(self, q, k, v):
        import distattn
        ctx = self.context
        scheme = ctx.softmax_scheme
        if hasattr(scheme, "for_layer"):  # per-layer choice, e.g. hetero's dense every k-th layer
            scheme = scheme.for_layer(self.layer_number - 1)  # megatron numbers layers from 1
        return distattn.attention(q.contiguous(), k.contiguous(), v, scheme=scheme,
                                  group=ctx.group if ctx.softmax_group is None else ctx.softmax_group,
                                  cu_seqlens=ctx.cu_seqlens, causal=True,
                                  softmax_scale=self.softmax_scale, ledger=ctx.ledger,
                                  n_tokens=ctx.n_tokens)


class DistAttnLinearCore(DistAttnCore):
    """Causal linear attention (elu+1 features, per-head decay) through lasp2/lasp1.

    The output is RMS-normalised per head (no parameters): linear attention sums
    grow with context length, and the norm keeps layers on one scale at any N.
    """

    kind = "linear"

    def __init__(self, *args, context: AttentionContext, **kwargs):
        super().__init__(*args, context=context, **kwargs)
        heads = self.config.num_attention_heads
        decay = linear_decay(heads)
        pgs = kwargs.get("pg_collection")
        tp_group = getattr(pgs, "tp", None) if pgs is not None else None
        if tp_group is not None and tp_group.size() > 1:  # this tp rank's heads keep their decays
            per = heads // tp_group.size()
            decay = decay[tp_group.rank() * per:(tp_group.rank() + 1) * per]
        self.register_buffer("decay", decay, persistent=False)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if query.shape[1] != 1:
            raise ValueError(f"distattn runs packed sequences with micro-batch dimension 1, got {query.shape[1]}")
        import distattn
        ctx = self.context
        q, k, v = (x[:, 0].contiguous() for x in (query, key, value))
        out = distattn.linear_attention(q, k, v, scheme=ctx.linear_scheme, group=ctx.group,
                                        cu_seqlens=ctx.cu_seqlens, decay=self.decay.to(q.device),
                                        feature_map="elu1", ledger=ctx.ledger, n_tokens=ctx.n_tokens)
        out = out * torch.rsqrt(out.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(out.dtype)
        return out.reshape(out.shape[0], 1, -1)
