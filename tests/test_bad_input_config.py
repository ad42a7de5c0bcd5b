"""Bad configs through the real CLI: refused at load time, naming the key, the value and a fix.

Each row runs `distattn config ...` (and some `distattn train ...`, which loads
the same way before any process starts) and checks the exit code, that no
traceback shows, that the message names what the user typed, and that the
refusal is fast.
"""
from __future__ import annotations

import importlib.util

import pytest

from cli_util import assert_refused, run_cli

S = "--set"
CASES = [
    # (id, argv after the command, names that must appear)
    ("space-not-equals", [S, "parallel.cp", "4"], ["--set parallel.cp", "KEY=VALUE", "parallel.cp=4"]),
    ("unknown-section", [S, "nosuch.key=1"], ["nosuch", "valid sections"]),
    ("unknown-key", [S, "model.hiden_size=64"], ["model.hiden_size", "hidden_size"]),
    ("section-only", [S, "model=1"], ["model=1", "model.KEY=VALUE"]),
    ("bad-yaml-value", [S, "model.layer_pattern=[N"], ["model.layer_pattern", "YAML"]),
    ("zero-vocab", [S, "model.vocab_size=0"], ["model.vocab_size", "0"]),
    ("float-steps", [S, "train.steps=2.5"], ["train.steps", "2.5"]),
    ("bool-steps", [S, "train.steps=true"], ["train.steps", "True"]),
    ("text-lr", [S, "train.lr=abc"], ["train.lr", "abc"]),
    ("scheme-typo", [S, "attention.scheme=rng"], ["attention.scheme", "rng", "ring"]),
    ("layout-typo", [S, "attention.layout=zigzg"], ["attention.layout", "zigzg", "zigzag"]),
    ("dtype", [S, "model.dtype=fp16"], ["model.dtype", "fp16", "bf16"]),
    ("zero-stage-3", [S, "train.zero_stage=3"], ["train.zero_stage", "3"]),
    ("world-mismatch", [S, "parallel.world_size=3"], ["--set parallel.world_size=3", "world_size=3",
                                                      "parallel.world_size=2"]),
    ("cp-zero", [S, "parallel.cp=0"], ["parallel.cp", "0"]),
    ("ulysses-not-dividing", [S, "parallel.ulysses=3"], ["ulysses=3", "parallel.ulysses"]),
    ("heads-not-dividing", [S, "model.hidden_size=100", S, "model.num_attention_heads=3"],
     ["--set model.num_attention_heads=3", "num_query_groups", "model.hidden_size=99"]),
    ("ulysses-heads", [S, "attention.scheme=ulysses", S, "parallel.cp=4", S, "model.num_attention_heads=6",
                       S, "model.hidden_size=96", S, "model.num_query_groups=1"],
     ["ulysses", "6 heads", "usp"]),
    ("layer-pattern", [S, "model.layer_pattern=NX"], ["model.layer_pattern", "'X'"]),
    ("layer-pattern-length", [S, "model.layer_pattern=NNN"], ["NNN", "model.num_layers=3"]),
    ("weighted-without-weights", [S, "attention.layout=weighted"],
     ["attention.layout=weighted", "attention.layout_weights"]),
    ("weights-wrong-count", [S, "attention.layout=weighted", S, "attention.layout_weights=[1.0]"],
     ["layout_weights", "parallel.cp=2"]),
    ("cad-zigzag", [S, "attention.scheme=cad", S, "attention.layout=zigzag"],
     ["attention.layout=zigzag", "cad", "contiguous"]),
    ("servers-without-cad", [S, "parallel.attention_servers=1", S, "parallel.world_size=3"],
     ["attention_servers=1", "attention.scheme=cad"]),
    ("warmup-too-long", [S, "train.steps=5", S, "train.warmup_steps=8"],
     ["warmup_steps=8", "steps=5", "train.warmup_steps <= 5"]),
    ("min-lr-above-lr", [S, "train.lr=1e-5", S, "train.min_lr=1e-4"], ["lr=1e-05", "min_lr"]),
    ("schedule-typo", [S, "train.schedule=step"], ["train.schedule", "step", "cosine"]),
    ("beta-above-one", [S, "train.adam_beta1=1.5"], ["train.adam_beta1", "1.5"]),
    ("run-name-slash", [S, "run.name=a/b"], ["run.name", "a/b"]),
    ("jsonl-without-path", [S, "data.source=jsonl"], ["data.path", "jsonl"]),
    ("launch-nodes", [S, "launch.nodes=3"], ["launch.nodes=3", "world_size=2"]),
    ("strict-pack-nodes", [S, "launch.nodes=2", S, "launch.placement=STRICT_PACK"],
     ["STRICT_PACK", "launch.nodes"]),
    ("bench-scheme", [S, "bench.schemes=[ring,foo]"], ["bench.schemes[1]", "foo"]),
    ("no-such-file", ["nosuch.yaml"], ["nosuch.yaml", "no such config file"]),
    ("rope-yarn-without-original", [S, "model.rope_scaling.type=yarn", S, "model.rope_scaling.factor=4"],
     ["--set model.rope_scaling", "original_max_position_embeddings"]),
    ("rope-field-typo", [S, "model.rope_scaling.fctor=4"], ["model.rope_scaling.fctor", "factor"]),
    ("rope-type", [S, "model.rope_scaling.type=ntk"], ["model.rope_scaling.type", "ntk", "yarn"]),
    ("model-preset-typo", [S, "model.preset=llama8b"], ["model.preset", "llama8b", "llama3_8b"]),
]
if importlib.util.find_spec("wandb") is None:
    CASES.append(("logger-not-installed", [S, "train.logger=wandb"], ["train.logger", "wandb", "pip install wandb"]))


@pytest.mark.parametrize("argv,names", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_config_refuses(argv, names):
    assert_refused(run_cli(["config", *argv]), *names, max_s=5)


@pytest.mark.parametrize("argv,names", [(c[1], c[2]) for c in CASES[:12]], ids=[c[0] for c in CASES[:12]])
def test_train_refuses_before_any_rank_starts(argv, names, tmp_path):
    res = run_cli(["train", *argv, S, f"run.output_dir={tmp_path / 'run'}"])
    assert_refused(res, *names, max_s=5)
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_bad_files(tmp_path):
    (tmp_path / "broken.yaml").write_text("model: [\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "keys.yaml").write_text("model:\n  hidden: 64\n")
    assert_refused(run_cli(["config", str(tmp_path / "broken.yaml")]), "broken.yaml", "not valid YAML")
    assert_refused(run_cli(["config", str(tmp_path / "list.yaml")]), "list.yaml", "a mapping of sections")
    assert_refused(run_cli(["config", str(tmp_path / "keys.yaml")]), "keys.yaml", "model.hidden",
                   "hidden_size")


def test_errors_name_the_override_not_the_file():
    res = run_cli(["config", "configs/presets/usp.yaml", S, "parallel.cp=2"])
    assert_refused(res, "--set parallel.cp=2")
    assert "usp.yaml" not in res.err


def test_derived_values_follow_the_overrides():
    res = run_cli(["config", S, "parallel.cp=4", S, "run.name=exp1", S, "train.steps=3"])
    assert res.code == 0, res.err
    assert "world_size: 4" in res.out and "output_dir: runs/exp1" in res.out
    assert "warmup_steps: 1" in res.out


def test_model_presets_name_a_shape_and_keys_beside_them_win():
    from distattn.config import load_config
    cfg = load_config(None, ["model.preset=llama3_8b", "model.num_layers=4"])
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_query_groups, m.ffn_hidden_size, m.vocab_size) == \
        (4, 4096, 8, 14336, 128256)
    as_file = load_config("configs/models/llama3_70b.yaml", ["parallel.cp=8"])
    assert as_file.model.num_layers == 80 and as_file.parallel.world_size == 8
    assert load_config(None, ["model.preset=tiny"]).model == load_config(None).model.model_copy(
        update={"preset": "tiny"})
