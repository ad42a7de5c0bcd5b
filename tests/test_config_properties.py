"""Property: any config input yields a valid Config or a ConfigError, never another exception."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distattn.config import Config, ConfigError, load_config

_FIELDS = [(sec, name) for sec, f in Config.model_fields.items() for name in f.annotation.model_fields]
_WORDS = ["ring", "allgather", "ulysses", "usp", "cad", "lasp2", "zigzag", "contiguous", "weighted",
          "doc_zigzag", "fp32", "bf16", "none", "full", "stdlib", "jsonl", "synthetic", "NL", "LLLN",
          "wandb", "cosine", "wsd", "PACK", "x", ""]
_VALUES = st.one_of(
    st.integers(-5, 70000), st.sampled_from([0, 1, 2, 3, 4, 8, 16]), st.floats(allow_nan=True),
    st.booleans(), st.none(), st.sampled_from(_WORDS), st.lists(st.integers(-2, 9), max_size=4),
    st.lists(st.floats(-1, 4), max_size=4), st.text(max_size=6))


def _yaml_value(v) -> str:
    import yaml
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_FIELDS), _VALUES), max_size=6))
def test_any_override_set_loads_or_raises_config_error(pairs):
    overrides = [f"{sec}.{name}={_yaml_value(v)}" for (sec, name), v in pairs]
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        assert str(e).strip(), "an empty error message"
        return
    # a config that loads is consistent
    p = cfg.parallel
    assert p.world_size == p.dp * p.cp + p.attention_servers
    assert p.cp == p.ulysses * p.ring
    assert 0 <= cfg.train.warmup_steps <= cfg.train.steps
    assert cfg.run.output_dir
    assert Config.model_validate(cfg.model_dump()) == cfg  # what ranks re-validate is the same job


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=4))
def test_any_override_text_loads_or_raises_config_error(items):
    try:
        load_config(None, items)
    except ConfigError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_any_yaml_file_loads_or_raises_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "job.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError:
        pass


@pytest.mark.timeout(60)
def test_properties_run_quickly():
    """The loader itself is fast: 200 loads of the default job well under the test's time-out."""
    for _ in range(200):
        load_config(None, ["parallel.cp=4"])
