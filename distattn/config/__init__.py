"""Typed job configuration: pydantic models, YAML load/save, `a.b=c` overrides.

`sections` holds the models and the cross-section checks, `errors` turns
validation failures into lines that name the key, the value and the fix, and
`load` reads files and overrides.
"""
from distattn.config.errors import ConfigError
from distattn.config.load import apply_overrides, load_config, save_config
from distattn.config.sections import (
    BENCH_PEERS, DATA_SOURCES, DEFAULT_CONFIG_PATH, ENGINES, LAYER_KINDS, LAYOUTS, LINEAR_SCHEMES,
    PLACEMENTS, SCHEMES, WEIGHTED_SCHEMES, AttentionConfig, BenchConfig, Config, DataConfig,
    LaunchConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig,
)

__all__ = [
    "AttentionConfig", "BenchConfig", "Config", "ConfigError", "DataConfig", "LaunchConfig", "ModelConfig",
    "ParallelConfig", "RunConfig", "TrainConfig", "DEFAULT_CONFIG_PATH", "SCHEMES", "LAYOUTS",
    "LINEAR_SCHEMES", "BENCH_PEERS", "DATA_SOURCES", "LAYER_KINDS", "PLACEMENTS", "ENGINES",
    "WEIGHTED_SCHEMES", "apply_overrides", "load_config", "save_config",
]
