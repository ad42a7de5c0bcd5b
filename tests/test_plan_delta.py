"""The memory planner and the simulator know the delta-rule layer kinds ('D' Gated DeltaNet, 'K' Kimi
Delta Attention): parameters as the built modules hold them, saved activations linear in the tokens with
the census's slope, the planned peak against a measured step, and the delta schemes' traffic."""
from __future__ import annotations

import pytest

from distattn.config import load_config
from distattn.plan.memory import layer_params, param_count, predict_memory

TINY = ["model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "train.tensorboard=false"]


def tiny(pattern: str, *extra: str):
    return load_config(None, TINY + [f"model.num_layers={len(pattern)}", f"model.layer_pattern={pattern}",
                                     *extra])


def _mixer_params(kind: str, cfg) -> int:
    from distattn.model.gated_delta import GatedDeltaNetAttention
    from distattn.model.gpt import transformer_config
    from distattn.model.kimi_delta import KimiDeltaAttention
    cls = GatedDeltaNetAttention if kind == "D" else KimiDeltaAttention
    return sum(p.numel() for p in cls(transformer_config(cfg.model), context=None).parameters())


@pytest.mark.parametrize("kind", ["D", "K"])
def test_delta_layer_parameters_are_the_built_modules(kind):
    """A layer is its mixer (as built), two RMSNorms (h each) and the SwiGLU MLP (3 h f)."""
    cfg = tiny(kind + "N")
    m = cfg.model
    h, H, d, f = 64, 4, 16, 128
    norms_mlp = 2 * h + 3 * h * f
    assert layer_params(m, kind) == _mixer_params(kind, cfg) + norms_mlp
    # by hand: q/k/v, beta, out, conv, A_log, head norm; D: W_a, W_g, dt_bias per head; K: two
    # low-rank pairs through d, dt_bias per channel
    own = 3 * h * h + h * H + h * h + 3 * h * 4 + H + d
    own += h * H + h * h + H if kind == "D" else 2 * (h * d + d * h) + h
    assert layer_params(m, kind) == own + norms_mlp
    assert param_count(m) == 2 * 256 * h + layer_params(m, kind) + layer_params(m, "N") + h


def test_whole_model_parameters_match_the_built_model(ranks, tmp_path):
    cfg = tiny("DKLN", "data.seq_len=128", "parallel.cp=1", "attention.scheme=local",
               f"run.output_dir={tmp_path}")
    got = ranks(1, count_model_parameters, cfg.model_dump())[0]
    assert got == param_count(cfg.model)


def count_model_parameters(cfg_dict: dict) -> int:
    from distattn.config import Config
    from distattn.train.trainer import Trainer
    tr = Trainer(Config.model_validate(cfg_dict), quiet=True)
    n = sum(p.numel() for p in tr.model.parameters())
    tr.mesh.destroy()
    return n
