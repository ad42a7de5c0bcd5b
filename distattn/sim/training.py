"""A whole training step of a transformer on a context-parallel group: tokens/s and memory per GPU.

`step_time` is the planner's step model (`distattn.plan.step_model.estimate_step`) on the model
spec made a config (`model_config`), with the simulator's own scheme names and options per layer
kind (ring-basic, ring-linear, lasp1 synchronised every layer): dense work at 6 FLOPs per parameter
and token (8 with recomputation), each layer's attention from `sim.model.layer_time` (the delta
rule for 'D' and 'K' layers, `sim.delta`), the gradient all-reduce, and ``step_overhead_s`` for
everything else a framework spends per step, which a measurement calibrates. Memory is the memory
planner's (`plan.memory.predict_memory`). So `simulate`, `plan memory` and `plan parallel` give one
answer.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from distattn.sim.cluster import Cluster
from distattn.sim.model import AttnWorkload

__all__ = ["ModelSpec", "MODELS", "StepTime", "model_config", "step_time", "step_memory", "max_context"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    pattern: str = ""  # per layer: N softmax, L linear, D Gated DeltaNet, K Kimi Delta Attention; "" = all N
    dtype_bytes: int = 2
    grad_bytes: int = 4  # gradients are reduced in fp32
    tied_embeddings: bool = False

    @property
    def kinds(self) -> str:
        return self.pattern or "N" * self.layers

    @property
    def layer_params(self) -> int:
        """A softmax (or linear) layer's projections and MLP (norms left out)."""
        return self.kind_params("N")

    def kind_params(self, kind: str) -> int:
        """One layer's projections and MLP: 'N'/'L' q/k/v/o; 'D'/'K' the delta-rule mixer's q/k/v/o over
        heads x head_dim, beta, its convolution and gates (as `distattn.plan.memory.layer_params`)."""
        h, H, d = self.hidden, self.heads, self.head_dim
        q, kv = H * d, self.kv_heads * d
        if kind in ("D", "K"):
            mixer = 3 * h * q + h * H + q * h + 3 * q * 4 + H + d
            gates = h * H + h * q + H if kind == "D" else 2 * (h * d + d * q) + q
            return mixer + gates + 3 * h * self.ffn
        return h * q + 2 * h * kv + q * h + 3 * h * self.ffn

    @property
    def params(self) -> int:
        embeddings = (1 if self.tied_embeddings else 2) * self.vocab * self.hidden
        return sum(self.kind_params(k) for k in self.kinds) + embeddings

    def attn(self, seq: int) -> AttnWorkload:
        return AttnWorkload(seq=seq, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
                            dtype_bytes=self.dtype_bytes)


MODELS: dict[str, ModelSpec] = {
    # the LASP-2 paper's Linear-Llama3-1B: 16 layers, hidden 2048, 16 heads of 128, pure basic linear attention
    "linear-llama3-1b": ModelSpec("linear-llama3-1b", 16, 2048, 16, 16, 128, 8192, 128256, "L" * 16,
                                  tied_embeddings=True),
    "llama3-1b": ModelSpec("llama3-1b", 16, 2048, 32, 8, 64, 8192, 128256, tied_embeddings=True),
    "llama3-8b": ModelSpec("llama3-8b", 32, 4096, 32, 8, 128, 14336, 128256),
    "llama3-8b-hybrid": ModelSpec("llama3-8b-hybrid", 32, 4096, 32, 8, 128, 14336, 128256, "LLLN" * 8),
    # Qwen3-Next-style: Llama-3-8B's shape with three Gated DeltaNet layers to every softmax layer
    "gdn-hybrid-8b": ModelSpec("gdn-hybrid-8b", 32, 4096, 32, 8, 128, 14336, 128256, "DDDN" * 8),
    # Kimi-Linear-style: the same with Kimi Delta Attention
    "kda-hybrid-8b": ModelSpec("kda-hybrid-8b", 32, 4096, 32, 8, 128, 14336, 128256, "KKKN" * 8),
}

LAYER_NAMES = {"N": "softmax", "L": "linear", "D": "gated_delta", "K": "kda"}



@dataclass
class StepTime:
    model: str
    softmax_scheme: str
    linear_scheme: str
    world: int
    seq: int
    step_s: float
    tokens_per_s: float
    dense_s: float
    attention_s: float
    grad_sync_s: float
    overhead_s: float
    mem_bytes: float
    fits: bool
    layers: dict[str, dict] = field(default_factory=dict)  # kind -> LayerTime dict

    def as_dict(self) -> dict:
        return asdict(self)


def _check(seq, world, zero_stage) -> None:
    from distattn.config import ConfigError
    for key, v in (("seq", seq), ("world", world)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key}={v!r}: expected an integer >= 1")
    if seq < world:
        raise ConfigError(f"seq={seq} is smaller than world={world}: every device needs a token")
    if zero_stage not in (0, 1, 2):
        raise ConfigError(f"zero_stage={zero_stage!r}: expected 0, 1 or 2")


def step_time(model: ModelSpec, seq: int, world: int, cluster: Cluster, softmax_scheme: str = "ring",
              linear_scheme: str = "lasp2", step_overhead_s: float = 0.0,
              lasp1_sync_every_layer: bool = True, zero_stage: int = 0, recompute: bool = False,
              loss_tile: int = 0) -> StepTime:
    """One training step of ``model`` on a sequence of ``seq`` tokens split over ``world`` devices."""
    _check(seq, world, zero_stage)
    if isinstance(step_overhead_s, bool) or not isinstance(step_overhead_s, (int, float)) \
            or not 0 <= step_overhead_s < float("inf"):
        from distattn.config import ConfigError
        raise ConfigError(f"step_overhead_s={step_overhead_s!r}: expected a finite number >= 0")
    from distattn.plan.step_model import estimate_step  # (plan imports sim: here, not at the top)
    kinds = model.kinds
    cfg = model_config(model, world, softmax_scheme, linear_scheme, zero_stage, recompute, loss_tile, seq=seq)
    layers = {k: (softmax_scheme if k == "N" else linear_scheme,
                  _layer_opts(k, kinds, linear_scheme, lasp1_sync_every_layer)) for k in set(kinds)}
    est = estimate_step(cfg, cluster, step_overhead_s=step_overhead_s, layers=layers)
    return StepTime(model=model.name, softmax_scheme=softmax_scheme if "N" in kinds else "-",
                    linear_scheme=linear_scheme if set("LDK") & set(kinds) else "-", world=world, seq=seq,
                    step_s=est.step_s, tokens_per_s=seq / est.step_s, dense_s=est.dense_s,
                    attention_s=est.attention_s, grad_sync_s=est.grad_sync_s, overhead_s=step_overhead_s,
                    mem_bytes=est.mem_bytes, fits=est.fits,
                    layers={LAYER_NAMES[k]: lt for k, lt in est.layer_times.items()})


def _layer_opts(kind: str, kinds: str, linear_scheme: str, sync_every_layer: bool) -> dict:
    """layer_time's options for a layer of `kind`: the delta rule of 'D' and 'K'; for lasp1, whether
    its chain waits every layer, and over how many layers it pipelines otherwise (linear layers: all
    of them; delta layers: the longest run of them, as a softmax layer's exchange ends the pipeline)."""
    from distattn.sim.delta import RULE_OF_KIND
    opts = {"rule": RULE_OF_KIND[kind]} if kind in RULE_OF_KIND else {}
    if kind != "N" and linear_scheme == "lasp1":
        if kind == "L":
            layers = kinds.count("L")
        else:
            layers = max(len(r) for r in "".join(c if c in "DK" else " " for c in kinds).split())
        opts.update(sync_every_layer=sync_every_layer, layers=layers)
    return opts


def model_config(model: ModelSpec, world: int, softmax_scheme: str = "ring", linear_scheme: str = "lasp2",
                 zero_stage: int = 0, recompute: bool = False, loss_tile: int = 0, seq: int | None = None):
    """`model` as a distattn config (bf16, cp = world, ZeRO stage, full recomputation or none, the
    loss over tiles of `loss_tile` tokens or whole), so
    that the memory planner (`distattn.plan.memory`) prices the simulator's steps: `simulate`,
    `plan memory` and `plan parallel` give one answer."""
    from distattn.config import load_config
    _check(2 * world, world, zero_stage)
    sets = [f"model.num_layers={model.layers}", f"model.hidden_size={model.hidden}",
            f"model.num_attention_heads={model.heads}", f"model.num_query_groups={model.kv_heads}",
            f"model.ffn_hidden_size={model.ffn}", f"model.vocab_size={model.vocab}",
            f"model.layer_pattern={model.kinds}", f"model.tie_embeddings={str(model.tied_embeddings).lower()}",
            f"model.dtype={'bf16' if model.dtype_bytes == 2 else 'fp32'}",
            f"model.recompute={'full' if recompute else 'none'}", f"train.zero_stage={zero_stage}",
            f"model.loss_tile={loss_tile}", f"parallel.cp={world}", f"data.seq_len={seq or 2 * world * 64}",
            *_scheme_sets(softmax_scheme),
            f"attention.linear_scheme={linear_scheme if linear_scheme in ('lasp2', 'lasp1') else 'lasp2'}"]
    return load_config(None, sets)


def _scheme_sets(name: str) -> list[str]:
    """The config keys of a simulator scheme (usp:U its ulysses degree, ring-basic the contiguous
    layout); schemes without a config of their own keep the default."""
    base, _, u = name.partition(":")
    if base == "usp":
        return ["attention.scheme=usp", f"parallel.ulysses={u or 1}"]
    if name == "ring-basic":
        return ["attention.scheme=ring", "attention.layout=contiguous"]
    if name in ("ring", "allgather", "ulysses"):
        return [f"attention.scheme={name}"]
    return []


def _planner_scheme(name: str) -> str:
    """The memory planner's name for a simulator scheme: variants share their buffers."""
    if name.startswith("usp"):
        return "usp"
    return {"ring-basic": "ring", "ring-linear": "ring"}.get(name, name)


def step_memory(model: ModelSpec, seq: int, world: int, softmax_scheme: str = "ring",
                linear_scheme: str = "lasp2", zero_stage: int = 0, recompute: bool = False,
                loss_tile: int = 0, cfg=None) -> float:
    """Peak bytes per GPU of a training step, by the memory planner (`plan.memory.predict_memory`):
    parameters, gradients and AdamW state (ZeRO-sharded over the world), saved activations, the
    loss's logits and the backward's transients, the scheme's buffers. `cfg`: `model_config`'s."""
    from distattn.plan.memory import predict_memory
    _check(seq, world, zero_stage)
    cfg = cfg or model_config(model, world, softmax_scheme, linear_scheme, zero_stage, recompute, loss_tile)
    return float(predict_memory(cfg, seq, cp=world, scheme=_planner_scheme(softmax_scheme),
                                recompute="full" if recompute else "none").total)


def max_context(model: ModelSpec, world: int, cluster: Cluster, granularity: int = 1024, **kw) -> int:
    """Largest sequence (multiple of ``granularity`` and of 2W) whose step fits device memory; 0 if none."""
    _check(2 * world if isinstance(world, int) else world, world, kw.get("zero_stage", 0))
    if isinstance(granularity, bool) or not isinstance(granularity, int) or granularity < 1:
        from distattn.config import ConfigError
        raise ConfigError(f"granularity={granularity!r}: expected an integer >= 1")
    g = max(granularity, 2 * world)
    g = math.lcm(g, 2 * world)

    schemes = {k: kw[k] for k in ("softmax_scheme", "linear_scheme", "zero_stage", "recompute", "loss_tile")
               if k in kw}

    cfg = model_config(model, world, **schemes)

    def fits(n: int) -> bool:
        return step_memory(model, n, world, **schemes, cfg=cfg) <= cluster.device.memory_bytes

    lo, hi = 0, g
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 34:
            return lo
    while hi - lo > g:
        mid = (lo + hi) // 2 // g * g
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
