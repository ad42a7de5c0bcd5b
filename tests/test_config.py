"""Config: defaults, round trip, overrides, and that every bad input says how to fix it."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distattn.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    ParallelConfig,
    apply_overrides,
    load_config,
    save_config,
)


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    return str(exc.value)


def test_default_file_matches_builtin_defaults():
    assert DEFAULT_CONFIG_PATH.is_file()
    cfg = load_config()
    assert cfg == Config()
    assert cfg.parallel.ring == 2 and cfg.parallel.world_size == 2
    assert cfg.attention.scheme == "ring" and cfg.attention.layout == "zigzag"
    # The YAML lists every key, so it documents the whole surface.
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    assert {s: set(v) for s, v in raw.items()} == {
        s: set(v) for s, v in Config().model_dump().items()}


def test_round_trip(tmp_path):
    cfg = load_config(None, ["attention.scheme=usp", "parallel.world_size=8", "parallel.cp=4",
                             "parallel.dp=2", "parallel.ulysses=2", "model.layer_pattern=LN",
                             "train.lr=1e-3", "bench.doc_lens=[1000, 3096]", "data.source=synthetic"])
    path = save_config(cfg, tmp_path / "sub" / "job.yaml")
    again = load_config(path)
    assert again == cfg
    assert again.parallel.ring == 2 and again.train.lr == pytest.approx(1e-3)
    assert again.to_yaml() == cfg.to_yaml()


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.steps=3", "train.warmup_steps=1", "train.tensorboard=false",
                             "bench.schemes=[ring, usp]", "run.name=exp 1", "parallel.ring=",
                             "train.min_lr=0"])
    assert cfg.train.steps == 3 and cfg.train.tensorboard is False
    assert cfg.bench.schemes == ["ring", "usp"] and cfg.run.name == "exp 1"
    assert cfg.parallel.ring == 2  # empty value = null = derived


def test_ulysses_scheme_fills_in_ulysses():
    cfg = load_config(None, ["attention.scheme=ulysses", "parallel.cp=4", "parallel.world_size=4"])
    assert (cfg.parallel.ulysses, cfg.parallel.ring) == (4, 1)


def test_apply_overrides_does_not_mutate_input():
    data = {"train": {"steps": 1}}
    out = apply_overrides(data, ["train.steps=2"])
    assert data == {"train": {"steps": 1}} and out == {"train": {"steps": 2}}


def test_missing_default_file_falls_back(monkeypatch, tmp_path):
    import distattn.config as config
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "nope.yaml")
    assert config.load_config() == Config()


@pytest.mark.parametrize("overrides, expected", [
    (["attention.scheme=rign"],
     ["attention.scheme: 'rign' is not a scheme; choose one of ring, allgather, ulysses, usp, "
      "lasp2, lasp1, local, cad, hetero"]),
    (["parallel.world_size=4"],
     ["parallel: world_size=4 but dp*cp + attention_servers = 1*2 + 0 = 2; "
      "set parallel.dp=2 or parallel.world_size=2"]),
    (["attention.scheme=ulysses", "parallel.cp=8", "parallel.world_size=8",
      "model.num_attention_heads=12", "model.hidden_size=192"],
     ["ulysses needs heads % ulysses == 0: 12 heads, ulysses=8; use scheme usp with ulysses=4"]),
    (["attention.scheme=usp", "parallel.cp=8", "parallel.world_size=8", "parallel.ulysses=8",
      "model.num_attention_heads=12", "model.hidden_size=192"],
     ["usp needs heads % ulysses == 0", "parallel.ulysses=4, parallel.ring=2"]),
    (["parallel.cp=6", "parallel.world_size=6", "parallel.ulysses=4"],
     ["parallel: cp=6 is not a multiple of ulysses=4", "parallel.ulysses", "1, 2, 3, 6"]),
    (["parallel.cp=4", "parallel.world_size=4", "parallel.ulysses=2", "parallel.ring=3",
      "attention.scheme=usp"],
     ["cp=4 but ulysses*ring = 2*3 = 6", "parallel.ring=2"]),
    (["parallel.cp=4", "parallel.world_size=4", "parallel.ulysses=2"],
     ["attention.scheme: ring does not split heads", "use scheme usp (ulysses=2, ring=2)"]),
    (["attention.scheme=ulysses", "parallel.cp=4", "parallel.world_size=4", "parallel.ulysses=2"],
     ["ulysses needs parallel.ulysses == parallel.cp", "set parallel.ulysses=4"]),
    (["model.num_query_groups=3"],
     ["model: num_attention_heads=8 is not divisible by num_query_groups=3",
      "model.num_query_groups to one of 1, 2, 4, 8"]),
    (["model.hidden_size=100"],
     ["hidden_size=100 is not divisible by num_attention_heads=8",
      "model.hidden_size=96 or model.hidden_size=104"]),
    (["model.layer_pattern=NX"], ["model: layer_pattern='NX' has 'X'", "'N'", "'L'"]),
    (["model.layer_pattern=NLL"], ["has 3 layers but num_layers=2", "model.num_layers=3"]),
    (["data.source=jsonl"], ["data: source='jsonl' reads files", "set data.path"]),
    (["parallel.attention_servers=2", "parallel.world_size=4"],
     ["parallel.attention_servers=2 needs attention.scheme cad", "attention.scheme=cad"]),
    (["train.min_lr=0.01"], ["train: lr=0.002 is below min_lr=0.01", "train.min_lr <= 0.002"]),
    (["train.warmup_steps=300"], ["warmup_steps=300 exceeds steps=150", "train.warmup_steps <= 150"]),
    (["bench.kv_heads=3"], ["bench: heads=8 is not divisible by kv_heads=3", "bench.kv_heads"]),
    (["bench.doc_lens=[100, 200]"], ["doc_lens sum to 300 but seq_len=4096", "bench.seq_len=300"]),
    (["bench.schemes=[ring, ulyses]"],
     ["bench.schemes[1]: 'ulyses' is not a scheme", "did you mean 'ulysses'"]),
    (["train.zero_stage=3"], ["train.zero_stage: 3 is not a ZeRO stage; choose one of 0, 1, 2"]),
    (["parallel.cp=0"], ["parallel.cp: must be >= 1, got 0"]),
    (["parallel.cp=true"], ["parallel.cp: expected an integer", "True"]),
    (["parallel.dp=1.5"], ["parallel.dp: expected an integer", "1.5"]),
    (["train.lr=fast"], ["train.lr: expected a number", "'fast'"]),
    (["attention.layout=zig"], ["attention.layout: 'zig' is not a layout", "zigzag, contiguous"]),
])
def test_bad_values_name_key_and_fix(overrides, expected):
    message = _error(overrides)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_several_problems_are_reported_together():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["model.num_query_groups=3", "train.steps=0", "attention.scheme=x"])
    keys = " ".join(exc.value.problems)
    assert "model.num_query_groups" in keys and "train.steps" in keys and "attention.scheme" in keys


@pytest.mark.parametrize("override, expected", [
    ("attention.schem=ring", ["attention.schem is an unknown key", "did you mean 'scheme'",
                              "valid keys of attention are scheme, layout"]),
    ("atention.scheme=ring", ["unknown section 'atention'", "valid sections are run, model"]),
    ("parallel.cp", ["expected KEY=VALUE"]),
    ("parallel=4", ["name one key", "valid keys of parallel are world_size, dp, cp"]),
    ("parallel.cp.x=4", ["parallel.cp has no fields of its own", "parallel.cp=VALUE"]),
    ("bench.schemes=[ring", ["not valid YAML"]),
])
def test_bad_overrides(override, expected):
    message = _error([override])
    assert override in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_yaml_file_errors_name_the_file(tmp_path):
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping of sections \(run, model"):
        load_config(not_mapping)

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("parallel:\n  cp: 2\nmodle:\n  num_layers: 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(unknown)
    msg = str(exc.value)
    assert str(unknown) in msg and "modle: unknown section" in msg and "did you mean 'model'" in msg

    bad_key = tmp_path / "badkey.yaml"
    bad_key.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"badkey\.yaml: train\.stpes: unknown key.*valid keys of train"):
        load_config(bad_key)

    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")

    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(broken)


def test_empty_file_and_empty_sections_mean_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()
    sparse = tmp_path / "sparse.yaml"
    sparse.write_text("model:\ntrain:\n  steps: 17\n")
    cfg = load_config(sparse)
    assert cfg.train.steps == 17 and cfg.model == Config().model


def test_direct_construction_raises_config_error():
    with pytest.raises(ConfigError, match=r"parallel: cp=3 is not a multiple of ulysses=2"):
        ParallelConfig(cp=3, ulysses=2, world_size=3)
    with pytest.raises(ConfigError, match=r"^attention\.scheme: 'x' is not a scheme"):
        Config(attention={"scheme": "x"})
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("preset", sorted((Path(__file__).resolve().parent.parent / "configs" / "presets")
                                          .glob("*.yaml")), ids=lambda p: p.stem)
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.run.name == preset.stem
