"""megatron-core GPTModel whose core attention is a distattn scheme.

Layer kinds come from a pattern string: 'N' = softmax attention through the
configured CP scheme, 'L' = linear attention through lasp2/lasp1 (LASP-2H
hybrids such as 'LLLN'), 'D' = Gated DeltaNet (`gated_delta.py`, Qwen3-Next
hybrids such as 'DDDN'), 'K' = Kimi Delta Attention (`kimi_delta.py`, Kimi Linear
hybrids such as 'KKKN'). Megatron builds everything else (embeddings, RMSNorm,
SwiGLU MLPs, the output layer and the cross-entropy). Megatron's own RoPE and
attention kernels call CUDA, so the model is built with
`position_embedding_type="none"` and RoPE is applied inside our attention from
global positions; `use_cpu_initialization=True` makes the same weights on any
device for a given seed.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from distattn.model.attention import AttentionContext, DistAttnCore, DistAttnLinearCore

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def transformer_config(model_cfg, tp: int = 1, sequence_parallel: bool = False) -> TransformerConfig:
    """Megatron's config for our model section: RMSNorm, SwiGLU, no biases, no dropout."""
    return TransformerConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel and tp > 1,
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        normalization="RMSNorm",
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=DTYPES[model_cfg.dtype],
        bf16=model_cfg.dtype == "bf16",
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        init_method_std=0.02,
        layernorm_epsilon=getattr(model_cfg, "norm_eps", 1e-5),
        add_qkv_bias=getattr(model_cfg, "qkv_bias", False),
    )


def _layer_spec(kind: str, context: AttentionContext, sequence_parallel: bool = False) -> ModuleSpec:
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    if kind in "DK":  # the delta rule replaces the whole self-attention; norms and MLP stay megatron's
        from distattn.model.gated_delta import GatedDeltaNetAttention
        from distattn.model.kimi_delta import KimiDeltaAttention
        mixer = GatedDeltaNetAttention if kind == "D" else KimiDeltaAttention
        spec.submodules.self_attention = ModuleSpec(module=mixer, params={"context": context})
    else:
        spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
            module=DistAttnLinearCore if kind == "L" else DistAttnCore, params={"context": context})
    if sequence_parallel:  # megatron's torch norm refuses sequence parallelism: ours, the same RMSNorm
        from distattn.model.tensor_parallel import SequenceParallelRMSNorm
        spec.submodules.input_layernorm = SequenceParallelRMSNorm
        spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    return spec


def single_rank_groups() -> ProcessGroupCollection:
    """Megatron's tensor/pipeline groups of size one, made explicitly.

    distattn parallelises the sequence itself, so megatron sees no tensor,
    pipeline or context parallelism; handing it explicit groups keeps its
    global parallel state untouched.
    """
    pgs = ProcessGroupCollection()
    if dist.is_available() and dist.is_initialized():
        mine = None
        for r in range(dist.get_world_size()):  # collective: every rank makes every group
            g = dist.new_group([r])
            if r == dist.get_rank():
                mine = g
    else:
        raise RuntimeError("torch.distributed must be initialised before building the model "
                           "(a world of one gloo rank is enough)")
    for name in ("tp", "pp", "cp", "embd", "pos_embd", "tp_cp", "mp", "dp", "dp_cp"):
        setattr(pgs, name, mine)
    return pgs


def build_gpt(model_cfg, context: AttentionContext, max_sequence_length: int,
              pg_collection: ProcessGroupCollection | None = None, seed: int = 1234,
              tp_group=None, sequence_parallel: bool = False) -> GPTModel:
    """The GPT model for `model_cfg` with distattn attention in every layer.

    `tp_group` (with more than one rank): megatron's tensor parallelism over it,
    with sequence parallelism if asked (`distattn.model.tensor_parallel`). The
    same seed gives every tp size the same weights: megatron initialises each
    whole weight on the CPU and keeps this rank's part.
    """
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    sp = sequence_parallel and tp > 1
    cfg = transformer_config(model_cfg, tp=tp, sequence_parallel=sp)
    if tp > 1:
        from distattn.model.tensor_parallel import install_megatron_tp, megatron_groups
        install_megatron_tp(seed, dist.get_rank(tp_group))
        if pg_collection is None:
            pg_collection = megatron_groups(tp_group)
    kinds = model_cfg.layer_kinds()
    specs = [_layer_spec(kind, context, sp) for kind in kinds]
    # the final RMSNorm before the output layer (Llama, Qwen2, Mistral), built like the layers' norms
    block = TransformerBlockSubmodules(layer_specs=specs,
                                       layer_norm=specs[0].submodules.input_layernorm)
    torch.manual_seed(seed)
    model = GPTModel(cfg, block, vocab_size=model_cfg.vocab_size,
                     max_sequence_length=max_sequence_length, position_embedding_type="none",
                     share_embeddings_and_output_weights=getattr(model_cfg, "tie_embeddings", False),
                     pg_collection=pg_collection or single_rank_groups())
    if sp:
        from distattn.model.tensor_parallel import sequence_parallel_embedding
        sequence_parallel_embedding(model.embedding)
    from distattn.model.recompute import apply_recompute
    from distattn.model.tiled_mlp import apply_tiled_mlp
    apply_tiled_mlp(model, getattr(model_cfg, "mlp_tile", 0))
    offload = None
    if getattr(model_cfg, "offload_activations", False):  # each layer's input in host memory until its
        from distattn.model.offload import LayerInputOffload  # recompute; tensors already there stay put
        offload = LayerInputOffload()
    return apply_recompute(model, getattr(model_cfg, "recompute", "none"), offload)
