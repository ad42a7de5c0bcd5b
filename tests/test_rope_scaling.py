"""RoPE scaling for context extension equals transformers' rotary embedding for the same config."""
from __future__ import annotations

import pytest
import torch

from distattn.model.rope import RopeScaling, apply_rope, rope_cos_sin

transformers = pytest.importorskip("transformers")

HEAD_DIM = 64
CASES = {
    "theta": ({"rope_type": "default", "rope_theta": 500000.0}, RopeScaling()),
    "linear": ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
               RopeScaling(type="linear", factor=4.0)),
    "yarn": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
              "original_max_position_embeddings": 2048},
             RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=2048)),
    "yarn-betas": ({"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0,
                    "original_max_position_embeddings": 4096},
                   RopeScaling(type="yarn", factor=8.0, beta_fast=16.0, beta_slow=2.0,
                               original_max_position_embeddings=4096)),
    "llama3": ({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
               RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)),
}


def _hf_cos_sin(params: dict, positions: torch.Tensor):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    cfg = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, max_position_embeddings=131072,
                      rope_parameters=dict(params))
    emb = LlamaRotaryEmbedding(cfg)
    x = torch.zeros(1, positions.numel(), HEAD_DIM)
    cos, sin = emb(x, positions[None])
    return cos[0], sin[0]


@pytest.mark.parametrize("name", list(CASES))
def test_cos_sin_equal_transformers(name):
    params, scaling = CASES[name]
    positions = torch.tensor([0, 1, 5, 77, 2047, 2048, 9000, 65535, 131071])
    hf_cos, hf_sin = _hf_cos_sin(params, positions)
    cos, sin = rope_cos_sin(positions, HEAD_DIM, base=params["rope_theta"], scaling=scaling)
    torch.testing.assert_close(cos[:, 0], hf_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, 0], hf_sin, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "llama3"])
def test_rotated_queries_equal_transformers(name):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    params, scaling = CASES[name]
    positions = torch.arange(0, 300, 7)
    q = torch.randn(positions.numel(), 3, HEAD_DIM)
    hf_cos, hf_sin = _hf_cos_sin(params, positions)
    hf_q, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], q.transpose(0, 1)[None], hf_cos[None], hf_sin[None])
    cos, sin = rope_cos_sin(positions, HEAD_DIM, base=params["rope_theta"], scaling=scaling)
    torch.testing.assert_close(apply_rope(q, cos, sin), hf_q[0].transpose(0, 1), rtol=0, atol=1e-5)


def test_bad_scalings_are_refused():
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        RopeScaling(type="yarn", factor=4.0)
    with pytest.raises(ValueError, match="not supported"):
        RopeScaling(type="longrope", factor=4.0)
    with pytest.raises(ValueError, match="factor must be > 0"):
        RopeScaling(type="linear", factor=0.0)


def test_scaled_rope_step_at_cp2_equals_one_rank(ranks, tmp_path):
    """Context extension keeps "one step at cp=2 equals one step on one rank" (yarn, zigzag ring)."""
    from distattn.config import load_config
    from train_util import one_step
    common = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
              "model.num_query_groups=2", "model.ffn_hidden_size=128", "data.seq_len=192",
              # adam_eps 1e-6: a weight whose gradient is ~1e-9 would otherwise move by a sizeable part of
              # lr on rounding alone (Adam divides by |g|), hiding the comparison in noise
              "train.steps=3", "train.tensorboard=false", "train.adam_eps=1e-6", "model.rope_scaling.type=yarn",
              "model.rope_scaling.factor=4", "model.rope_scaling.original_max_position_embeddings=48"]
    one = load_config(None, common + ["parallel.cp=1", "attention.scheme=local", f"run.output_dir={tmp_path}/a"])
    two = load_config(None, common + ["parallel.cp=2", "attention.scheme=ring", f"run.output_dir={tmp_path}/b"])
    plain = load_config(None, common[:-3] + ["parallel.cp=1", "attention.scheme=local",
                                             f"run.output_dir={tmp_path}/c"])
    (l1, p1), = [r for r in ranks(1, one_step, one.model_dump()) if r is not None]
    (l2, p2), = [r for r in ranks(2, one_step, two.model_dump()) if r is not None]
    (l0, _), = [r for r in ranks(1, one_step, plain.model_dump()) if r is not None]
    assert l1[0] == pytest.approx(l2[0], rel=1e-5)
    torch.testing.assert_close(p2, p1, atol=1e-5, rtol=0)
    assert abs(l0[0] - l1[0]) > 1e-7  # the scaling is applied (a random model barely depends on it)
