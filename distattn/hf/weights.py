"""Tensor names and layouts: Hugging Face Llama/Qwen2/Mistral <-> megatron-core GPTModel.

The two differ in three places:
- megatron fuses q, k and v into one `linear_qkv` whose rows go query group by
  query group: the group's query heads, then its key head, then its value head;
- megatron fuses the gate and up projections into `linear_fc1` (gate first);
- names.
Both use the half-split rotary convention, so no head permutation is needed.
Every mapping is a pure re-indexing, so a round trip is bit-exact.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from distattn.config import ConfigError


def model_tensors(state: dict) -> dict[str, torch.Tensor]:
    """The tensors of a GPTModel state dict, without megatron's `_extra_state` entries (not weights)."""
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _layer_names(i: int) -> dict[str, str]:
    hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
    return {hf + "input_layernorm.weight": mg + "input_layernorm.weight",
            hf + "self_attn.o_proj.weight": mg + "self_attention.linear_proj.weight",
            hf + "post_attention_layernorm.weight": mg + "pre_mlp_layernorm.weight",
            hf + "mlp.down_proj.weight": mg + "mlp.linear_fc2.weight"}


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[H d, ...], [G d, ...], [G d, ...] -> megatron's [G (H/G + 2) d, ...]."""
    qg = q.reshape(groups, -1, *q.shape[1:])
    kg = k.reshape(groups, -1, *k.shape[1:])
    vg = v.reshape(groups, -1, *v.shape[1:])
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *q.shape[1:])


def _split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    per = heads // groups
    x = qkv.reshape(groups, (per + 2) * head_dim, *qkv.shape[1:])
    q, k, v = x.split([per * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(heads * head_dim, *qkv.shape[1:]), k.reshape(groups * head_dim, *qkv.shape[1:]),
            v.reshape(groups * head_dim, *qkv.shape[1:]))


def hf_to_megatron(sd: dict[str, torch.Tensor], model_cfg) -> dict[str, torch.Tensor]:
    """A HF state dict (model.* / lm_head.*) as our GPTModel's parameters; every tensor used once."""
    m = model_cfg
    left = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in left:
            raise ConfigError(f"the checkpoint has no tensor {name!r}, which a {m.num_layers}-layer model needs")
        return left.pop(name)
    out["embedding.word_embeddings.weight"] = take("model.embed_tokens.weight")
    out["decoder.final_layernorm.weight"] = take("model.norm.weight")
    if m.tie_embeddings:
        left.pop("lm_head.weight", None)  # some tied checkpoints store the shared weight twice
    else:
        out["output_layer.weight"] = take("lm_head.weight")
    for i in range(m.num_layers):
        for hf, mg in _layer_names(i).items():
            out[mg] = take(hf)
        a = f"model.layers.{i}.self_attn."
        mg = f"decoder.layers.{i}.self_attention.linear_qkv."
        out[mg + "weight"] = _interleave_qkv(take(a + "q_proj.weight"), take(a + "k_proj.weight"),
                                             take(a + "v_proj.weight"), m.num_query_groups)
        if m.qkv_bias:
            out[mg + "bias"] = _interleave_qkv(take(a + "q_proj.bias"), take(a + "k_proj.bias"),
                                               take(a + "v_proj.bias"), m.num_query_groups)
        p = f"model.layers.{i}.mlp."
        out[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = torch.cat(
            [take(p + "gate_proj.weight"), take(p + "up_proj.weight")], dim=0)
    unused = sorted(k for k in left if not k.endswith("rotary_emb.inv_freq"))
    if unused:
        shown = ", ".join(unused[:4]) + (f" and {len(unused) - 4} more" if len(unused) > 4 else "")
        raise ConfigError(f"the checkpoint has tensors this model does not use: {shown}; its config.json "
                          f"does not describe it (e.g. num_hidden_layers)")
    return out


def megatron_to_hf(sd: dict[str, torch.Tensor], model_cfg) -> dict[str, torch.Tensor]:
    """Our GPTModel's parameters as a HF state dict; the inverse of `hf_to_megatron`."""
    m = model_cfg
    d = m.hidden_size // m.num_attention_heads
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
           "model.norm.weight": sd["decoder.final_layernorm.weight"]}
    if not m.tie_embeddings:
        out["lm_head.weight"] = sd["output_layer.weight"]
    for i in range(m.num_layers):
        for hf, mg in _layer_names(i).items():
            out[hf] = sd[mg]
        a = f"model.layers.{i}.self_attn."
        mg = f"decoder.layers.{i}.self_attention.linear_qkv."
        q, k, v = _split_qkv(sd[mg + "weight"], m.num_attention_heads, m.num_query_groups, d)
        out.update({a + "q_proj.weight": q, a + "k_proj.weight": k, a + "v_proj.weight": v})
        if m.qkv_bias:
            q, k, v = _split_qkv(sd[mg + "bias"], m.num_attention_heads, m.num_query_groups, d)
            out.update({a + "q_proj.bias": q, a + "k_proj.bias": k, a + "v_proj.bias": v})
        gate, up = sd[f"decoder.layers.{i}.mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[f"model.layers.{i}.mlp.gate_proj.weight"] = gate
        out[f"model.layers.{i}.mlp.up_proj.weight"] = up
    return {k: v.contiguous() for k, v in out.items()}


def read_safetensors(directory: Path, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a HF directory: model.safetensors, or the shards its index lists (only the shards
    holding `names` when given, so a rank reads what it needs)."""
    from safetensors import safe_open
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            if names is None or name in names:
                files.setdefault(file, []).append(name)
    elif single.is_file():
        files = {single.name: None}  # type: ignore[dict-item]
    else:
        raise ConfigError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                          f"(only safetensors checkpoints are read)")
    out: dict[str, torch.Tensor] = {}
    for file, wanted in files.items():
        path = directory / file
        if not path.is_file():
            raise ConfigError(f"{directory}: the index lists {file}, which is missing")
        with safe_open(str(path), framework="pt") as f:
            for name in (wanted if wanted is not None else f.keys()):
                if names is None or name in names:
                    out[name] = f.get_tensor(name)
    return out


def write_safetensors(directory: Path, sd: dict[str, torch.Tensor], max_shard_bytes: int = 5 * 2**30) -> None:
    """model.safetensors, or shards of at most `max_shard_bytes` plus the index, as transformers writes."""
    from safetensors.torch import save_file
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(sd):
        t = sd[name]
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata=meta)
        weight_map.update({k: file for k in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


__all__ = ["hf_to_megatron", "megatron_to_hf", "model_tensors", "read_safetensors", "write_safetensors"]
