"""Hugging Face checkpoints: our model's logits equal transformers' (one rank and cp=2), the conversion
round trip is bit-exact, and bad inputs name what is wrong. Tiny random models, built here, no downloads."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cli_util import assert_refused, run_cli  # noqa: E402
from distattn.config import ConfigError  # noqa: E402
from distattn.hf import distattn_to_hf, forward_logits, hf_to_distattn  # noqa: E402

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=120)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500000.0, rms_norm_eps=1e-5)),
    "llama31": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rms_norm_eps=1e-6,
                                                      rope_theta=1e6)),
    "qwen2-yarn": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
        max_position_embeddings=64)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, rope_theta=1e6)),
}


def make_hf(tmp_path_factory, name: str, **kw):
    cfg_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(7)
    cfg = getattr(transformers, cfg_cls)(**SHAPE, **extra)
    model = getattr(transformers, model_cls)(cfg).eval()
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path, **kw)
    return path, model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    return {name: make_hf(tmp_path_factory, name) for name in FAMILIES}


IDS = torch.randint(0, SHAPE["vocab_size"], (41,), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_equal_transformers(hf_models, name):
    path, model = hf_models[name]
    with torch.no_grad():
        ref = model(IDS[None]).logits[0]
    torch.testing.assert_close(forward_logits(path, IDS), ref, rtol=0, atol=1e-4)


def _cp_logits(path: str, ids: torch.Tensor):
    """The logits of the whole sequence through the zigzag ring on this rank's group."""
    import torch.distributed as dist

    import distattn
    from distattn.hf.convert import load_hf
    from distattn.hf.forward import build_loaded_model
    from distattn.model.attention import AttentionContext
    model_cfg, weights = load_hf(path)
    scheme = distattn.get_scheme("ring")
    ctx = AttentionContext(group=dist.group.WORLD, softmax_scheme=scheme, rope_base=model_cfg.rope_base,
                           rope_scaling=model_cfg.rope_scaling.to_rope())
    model = build_loaded_model(model_cfg, weights, ctx, ids.numel()).eval()
    n, world, rank = ids.numel(), dist.get_world_size(), dist.get_rank()
    lay = scheme.layout(n, world, [0, n])
    idx, pos = lay.indices(rank), lay.positions(rank)
    ctx.set_batch([0, n], pos, n)
    with torch.no_grad():
        local = model(ids[idx][None], pos[None], None)[0]
    full = torch.zeros(n, local.shape[-1])
    full[idx] = local
    dist.all_reduce(full)
    return full


@pytest.mark.parametrize("name", ["llama31", "qwen2"])
def test_logits_at_cp2_through_the_ring_equal_transformers(hf_models, ranks, name):
    path, model = hf_models[name]
    with torch.no_grad():
        ref = model(IDS[None]).logits[0]
    out = ranks(2, _cp_logits, str(path), IDS)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_round_trip_is_bit_exact(hf_models, tmp_path, name):
    from safetensors.torch import load_file
    path, _ = hf_models[name]
    hf_to_distattn(path, tmp_path / "ours")
    distattn_to_hf(tmp_path / "ours", tmp_path / "back")
    a, b = load_file(path / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    before, after = json.loads((path / "config.json").read_text()), json.loads(
        (tmp_path / "back" / "config.json").read_text())
    for key in ("architectures", "hidden_size", "num_key_value_heads", "intermediate_size", "vocab_size",
                "rms_norm_eps", "tie_word_embeddings", "rope_parameters"):
        assert after[key] == before[key], key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS[None]).logits[0], forward_logits(path, IDS), rtol=0, atol=1e-4)


def test_sharded_checkpoint_with_an_index(tmp_path_factory, tmp_path):
    path, model = make_hf(tmp_path_factory, "llama", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        ref = model(IDS[None]).logits[0]
    torch.testing.assert_close(forward_logits(path, IDS), ref, rtol=0, atol=1e-4)
    hf_to_distattn(path, tmp_path / "ours")
    assert run_cli(["convert", "distattn-to-hf", str(tmp_path / "ours"), str(tmp_path / "back")]).code == 0


def test_bad_inputs_name_the_problem(hf_models, tmp_path):
    path, _ = hf_models["llama"]
    assert_refused(run_cli(["convert", "hf-to-distattn", str(tmp_path / "nope"), str(tmp_path / "o")]),
                   "nope", "no such Hugging Face model directory")
    cfg = json.loads((path / "config.json").read_text())
    for field, value, words in [("architectures", ["GPT2LMHeadModel"], ["GPT2LMHeadModel", "LlamaForCausalLM"]),
                                ("attention_bias", True, ["attention_bias"]),
                                ("hidden_act", "gelu", ["hidden_act", "gelu"]),
                                ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
                                 ["dynamic", "linear, yarn and llama3"])]:
        bad = tmp_path / f"bad_{field}"
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({**cfg, field: value}))
        (bad / "model.safetensors").symlink_to(path / "model.safetensors")
        assert_refused(run_cli(["convert", "hf-to-distattn", str(bad), str(tmp_path / f"o_{field}")]), *words)
    hf_to_distattn(path, tmp_path / "ours")
    assert_refused(run_cli(["convert", "hf-to-distattn", str(path), str(tmp_path / "ours")]), "--overwrite")
    with pytest.raises(ValueError, match="outside the model's vocab"):
        forward_logits(path, torch.tensor([1, 500]))
    with pytest.raises(ConfigError, match="neither a converted model"):
        distattn_to_hf(tmp_path, tmp_path / "x")


@pytest.mark.parametrize("pattern", ["LN", "DN"])
def test_linear_and_gated_delta_layers_have_no_hf_equivalent(pattern):
    from distattn.config import load_config
    from distattn.hf.config_map import hf_config
    cfg = load_config(None, ["model.num_layers=2", f"model.layer_pattern={pattern}"])
    with pytest.raises(ConfigError, match=f"layer_pattern='{pattern}' has linear-attention"):
        hf_config(cfg.model, "llama")
