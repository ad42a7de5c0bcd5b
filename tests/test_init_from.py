"""model.init_from: training starts from a Hugging Face directory or a distattn checkpoint, exactly."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from distattn.config import load_config  # noqa: E402
from train_util import one_step  # noqa: E402

# Adam divides by |g|: eps 1e-6 keeps weights with ~1e-9 gradients from moving on rounding alone
COMMON = ["data.seq_len=128", "train.steps=3", "train.tensorboard=false", "train.ckpt_every=2",
          "train.adam_eps=1e-6"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import transformers
    torch.manual_seed(11)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                   rope_theta=500000.0)
    path = tmp_path_factory.mktemp("hf_llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _initial_params(cfg_dict):
    import torch.distributed as dist

    from distattn.config import Config
    from distattn.train.trainer import Trainer
    tr = Trainer(Config.model_validate(cfg_dict), quiet=True)
    flat = {k: v.detach().clone() for k, v in tr.model.state_dict().items() if isinstance(v, torch.Tensor)}
    tr.mesh.destroy()
    return flat if dist.get_rank() == 0 else None


def test_hf_weights_are_loaded_and_cp2_step_equals_one_rank(ranks, tmp_path, hf_dir):
    from distattn.hf import load_hf
    _, weights = load_hf(hf_dir)
    cfg = load_config(None, COMMON + [f"model.init_from={hf_dir}", f"run.output_dir={tmp_path / 'a'}",
                                      "parallel.cp=1", "attention.scheme=local"])
    assert cfg.model.hidden_size == 64 and cfg.model.vocab_size == 300 and cfg.model.rope_base == 500000.0
    got = ranks(1, _initial_params, cfg.model_dump())[0]
    for name, t in weights.items():
        assert torch.equal(got[name], t), name
    two = load_config(None, COMMON + [f"model.init_from={hf_dir}", f"run.output_dir={tmp_path / 'b'}",
                                      "parallel.cp=2", "attention.scheme=ring"])
    (l1, p1), = [r for r in ranks(1, one_step, cfg.model_dump()) if r is not None]
    (l2, p2), = [r for r in ranks(2, one_step, two.model_dump()) if r is not None]
    assert l1[0] == pytest.approx(l2[0], rel=1e-5)
    torch.testing.assert_close(p2, p1, atol=1e-5, rtol=0)


def test_converted_and_training_checkpoints_start_the_same_weights(ranks, tmp_path, hf_dir):
    from distattn.hf import hf_to_distattn
    from train_util import fit
    hf_to_distattn(hf_dir, tmp_path / "conv")
    base = COMMON + ["parallel.cp=2", "attention.scheme=ring"]
    from_hf = ranks(2, _initial_params, load_config(None, base + [f"model.init_from={hf_dir}",
                                                                  f"run.output_dir={tmp_path / 'a'}"]).model_dump())[0]
    from_conv = ranks(2, _initial_params, load_config(None, base + [f"model.init_from={tmp_path / 'conv'}",
                                                                    f"run.output_dir={tmp_path / 'b'}"]).model_dump())[0]
    assert from_hf.keys() == from_conv.keys()
    assert all(torch.equal(from_hf[k], from_conv[k]) for k in from_hf)
    # a training run's checkpoint (runs/<name>: its latest) as the start of another run
    run = load_config(None, base + [f"model.init_from={hf_dir}", f"run.output_dir={tmp_path / 'run'}"])
    ranks(2, fit, run.model_dump())
    after = ranks(2, _initial_params, load_config(None, base + [f"model.init_from={tmp_path / 'run'}",
                                                                f"run.output_dir={tmp_path / 'c'}"]).model_dump())[0]
    assert not torch.equal(after["output_layer.weight"], from_hf["output_layer.weight"])  # trained weights


def test_bad_init_from_is_refused_before_launch(tmp_path, hf_dir):
    from cli_util import assert_refused, run_cli
    out = f"run.output_dir={tmp_path / 'r'}"
    assert_refused(run_cli(["train", "--set", f"model.init_from={tmp_path / 'nope'}", "--set", out]),
                   "model.init_from", "no such directory")
    assert_refused(run_cli(["train", "--set", f"model.init_from={hf_dir}", "--set", "model.hidden_size=32",
                            "--set", out]), "model.hidden_size=32", "the checkpoint has 64")
    assert_refused(run_cli(["config", "--set", f"model.init_from={hf_dir}", "--set", "model.preset=tiny"]),
                   "model.preset=tiny", "drop model.preset")


def test_sharded_run_starts_from_the_same_weights(ranks, tmp_path, hf_dir):
    """train.shard=fsdp: each rank loads its shard (DCP reads shards; HF files are sliced), and the
    whole parameters equal the unsharded start."""
    from distattn.hf import hf_to_distattn
    from train_util import one_step
    hf_to_distattn(hf_dir, tmp_path / "conv")
    base = COMMON + ["parallel.cp=2", "attention.scheme=ring", "train.adam_eps=1e-6"]
    plain = load_config(None, base + [f"model.init_from={hf_dir}", f"run.output_dir={tmp_path / 'a'}"])
    (l0, p0), = [r for r in ranks(2, one_step, plain.model_dump()) if r is not None]
    for src in (hf_dir, tmp_path / "conv"):
        sharded = load_config(None, base + [f"model.init_from={src}", "train.shard=fsdp",
                                            f"run.output_dir={tmp_path / src.name}"])
        (l1, p1), = [r for r in ranks(2, one_step, sharded.model_dump()) if r is not None]
        assert l1[0] == pytest.approx(l0[0], rel=1e-6)
        torch.testing.assert_close(p1, p0, atol=1e-5, rtol=0)


def test_the_checkpoints_rope_scaling_is_kept_and_refined(tmp_path):
    """The embedded default file's rope_scaling (none) must not replace a checkpoint's scaling."""
    import json
    d = tmp_path / "hf31"
    d.mkdir()
    d.joinpath("config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
    rs = load_config(None, [f"model.init_from={d}"]).model.rope_scaling
    assert (rs.type, rs.factor, rs.original_max_position_embeddings) == ("llama3", 8.0, 8192)
    rs = load_config(None, [f"model.init_from={d}", "model.rope_scaling.factor=16"]).model.rope_scaling
    assert (rs.type, rs.factor, rs.original_max_position_embeddings) == ("llama3", 16.0, 8192)


def test_hf_weights_split_over_tp_step_equals_one_rank(ranks, tmp_path, hf_dir):
    """model.init_from with parallel.tp=2: each rank keeps its tp part of every Hugging Face weight."""
    one = load_config(None, COMMON + [f"model.init_from={hf_dir}", f"run.output_dir={tmp_path / 'a'}",
                                      "parallel.cp=1", "attention.scheme=local"])
    tp = load_config(None, COMMON + [f"model.init_from={hf_dir}", f"run.output_dir={tmp_path / 'b'}",
                                     "parallel.cp=1", "parallel.tp=2", "attention.scheme=local"])
    (l1, p1), = [r for r in ranks(1, one_step, one.model_dump()) if r is not None]
    (l2, p2), = [r for r in ranks(2, one_step, tp.model_dump()) if r is not None]
    assert l1[0] == pytest.approx(l2[0], rel=1e-5)
    torch.testing.assert_close(p2, p1, atol=1e-5, rtol=0)
