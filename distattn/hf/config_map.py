"""Hugging Face `config.json` <-> distattn's model section, for Llama, Qwen2 and Mistral.

Every field that changes the function the model computes is mapped or refused
by name: a checkpoint either converts into a model that computes what
transformers computes, or the user learns which field stands in the way.
"""
from __future__ import annotations

from typing import Any

from distattn.config import ConfigError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp32", None: "fp32"}
_ROPE_KEYS = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
              "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")


def family(hf: dict[str, Any]) -> str:
    """llama | qwen2 | mistral, from `architectures` (or `model_type`), or a ConfigError naming the field."""
    archs = hf.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    if not archs and hf.get("model_type") in MODEL_TYPES:
        return hf["model_type"]
    shown = archs or hf.get("model_type")
    raise ConfigError(f"config.json: architectures={shown!r} is not supported; distattn converts "
                      f"{', '.join(ARCHITECTURES)}")


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(theta, rope_scaling section) from rope_theta + rope_scaling (v4) or rope_parameters (v5)."""
    params = hf.get("rope_parameters") or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ConfigError("config.json: per-layer rope_parameters are not supported")
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = hf.get("rope_scaling") or params or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("config.json: partial_rotary_factor != 1 is not supported (RoPE on the whole head)")
    if kind == "default":
        return theta, {"type": "none"}
    if kind not in ("linear", "yarn", "llama3"):
        raise ConfigError(f"config.json: rope_scaling type {kind!r} is not supported; distattn applies "
                          f"linear, yarn and llama3 scaling (or a theta change)")
    out = {"type": kind, **{k: scaling[k] for k in _ROPE_KEYS if scaling.get(k) is not None}}
    if kind == "yarn" and "original_max_position_embeddings" not in out:
        out["original_max_position_embeddings"] = hf.get("original_max_position_embeddings") or \
            hf.get("max_position_embeddings")
    return theta, out


def model_section(hf: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The distattn model section for a HF config, and notes on what is not applied."""
    fam = family(hf)
    notes: list[str] = []
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act={act!r} is not supported; distattn's MLP is SwiGLU (silu)")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != hidden:
        raise ConfigError(f"config.json: head_dim={head_dim} with num_attention_heads={heads} does not give "
                          f"hidden_size={hidden}; distattn needs head_dim = hidden_size / heads")
    if fam == "llama" and hf.get("attention_bias"):
        raise ConfigError("config.json: attention_bias=true (biases on q/k/v and o) is not supported; "
                          "distattn supports q/k/v biases only (Qwen2)")
    if hf.get("mlp_bias"):
        raise ConfigError("config.json: mlp_bias=true is not supported")
    if fam == "qwen2" and hf.get("use_sliding_window"):
        raise ConfigError("config.json: use_sliding_window=true is not supported; attention is full causal")
    window = hf.get("sliding_window")
    if fam == "mistral" and window is not None:
        notes.append(f"config.json: sliding_window={window} is not applied: attention is full causal, which "
                     f"equals the sliding-window model on sequences of at most {window} tokens")
    theta, scaling = _rope(hf)
    dtype = hf.get("torch_dtype", hf.get("dtype"))
    if dtype not in _DTYPES:
        raise ConfigError(f"config.json: dtype={dtype!r} is not supported; use float32 or bfloat16 weights")
    if dtype == "float16":
        notes.append("config.json: float16 weights are trained in fp32 (distattn runs fp32 or bf16)")
    section = {
        "num_layers": int(hf["num_hidden_layers"]),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": int(hf.get("num_key_value_heads") or heads),
        "ffn_hidden_size": int(hf["intermediate_size"]),
        "vocab_size": int(hf["vocab_size"]),
        "rope_base": theta,
        "rope_scaling": scaling,
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "qkv_bias": fam == "qwen2",
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "dtype": _DTYPES[dtype],
    }
    return section, notes


def hf_config(model_cfg, fam: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A transformers config.json for a distattn model section of family `fam`."""
    if fam not in MODEL_TYPES:
        raise ConfigError(f"family {fam!r} is not one of {', '.join(MODEL_TYPES)}")
    if fam != "qwen2" and model_cfg.qkv_bias:
        raise ConfigError(f"model.qkv_bias=true has no {fam} equivalent; convert it as qwen2")
    if fam == "qwen2" and not model_cfg.qkv_bias:
        raise ConfigError("model.qkv_bias=false: Qwen2 always has q/k/v biases; convert it as llama")
    if set(model_cfg.layer_kinds()) & {"L", "D", "K"}:
        raise ConfigError(f"model.layer_pattern={model_cfg.layer_pattern!r} has linear-attention (L), "
                          f"Gated DeltaNet (D) or Kimi Delta Attention (K) layers, which {fam} does not have")
    rs = model_cfg.rope_scaling
    rope: dict[str, Any] = {"rope_type": "default" if rs.type == "none" else rs.type,
                            "rope_theta": model_cfg.rope_base}
    if rs.type != "none":
        rope.update({k: getattr(rs, k) for k in _ROPE_KEYS if getattr(rs, k) is not None})
    out = {
        "architectures": [MODEL_TYPES[fam]],
        "model_type": fam,
        "hidden_size": model_cfg.hidden_size,
        "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": model_cfg.num_attention_heads,
        "num_key_value_heads": model_cfg.num_query_groups,
        "intermediate_size": model_cfg.ffn_hidden_size,
        "vocab_size": model_cfg.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": model_cfg.norm_eps,
        "rope_theta": model_cfg.rope_base,
        "rope_scaling": None if rs.type == "none" else {k: v for k, v in rope.items() if k != "rope_theta"},
        "rope_parameters": rope,
        "tie_word_embeddings": model_cfg.tie_embeddings,
        "torch_dtype": {"fp32": "float32", "bf16": "bfloat16"}[model_cfg.dtype],
        "max_position_embeddings": max(rs.original_max_position_embeddings or 0, 131072),
    }
    if fam == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if fam == "mistral":
        out["sliding_window"] = None
    if fam == "qwen2":
        out["use_sliding_window"] = False
    out.update(extra or {})
    return out


__all__ = ["ARCHITECTURES", "MODEL_TYPES", "family", "hf_config", "model_section"]
