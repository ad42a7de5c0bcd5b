"""Reading a job: YAML files, `section.key=value` overrides, validation, saving what ran."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel

from distattn.config.errors import ConfigError, _did_you_mean, _type_name
from distattn.config.sections import DEFAULT_CONFIG_PATH, Config

def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError("no such config file", source=str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {err}", source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of sections ({', '.join(Config.model_fields)}), "
                          f"got {_type_name(data)}", source=str(path))
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"section names must be strings, got {bad!r}; valid sections are "
                          f"{', '.join(Config.model_fields)}", source=str(path))
    # An empty section (`model:` with nothing under it) means "all defaults".
    return {k: ({} if v is None else v) for k, v in data.items()}


_SECTIONS: dict[str, type[BaseModel]] = {
    name: f.annotation for name, f in Config.model_fields.items()  # type: ignore[misc]
}


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to raw config data (values parsed as YAML)."""
    if isinstance(overrides, str):
        overrides = [overrides]
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    sections = list(Config.model_fields)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. parallel.cp=4")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        section = parts[0]
        if section not in sections:
            raise ConfigError(f"override {item!r}: unknown section {section!r}"
                              f"{_did_you_mean(section, sections)}; "
                              f"valid sections are {', '.join(sections)}")
        fields = list(_SECTIONS[section].model_fields)
        if len(parts) != 2 or not parts[1]:
            raise ConfigError(f"override {item!r}: name one key, as {section}.KEY=VALUE; "
                              f"valid keys of {section} are {', '.join(fields)}")
        name = parts[1]
        if name not in fields:
            raise ConfigError(f"override {item!r}: {section}.{name} is an unknown key"
                              f"{_did_you_mean(name, fields)}; "
                              f"valid keys of {section} are {', '.join(fields)}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from None
        target = out.get(section)
        if not isinstance(target, dict):
            target = out[section] = {}
        target[name] = value
    return out


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML job (None: the shipped default job), apply overrides, validate.

    The defaults live in the models; `configs/default.yaml` mirrors them, so an
    install without the file still yields the same default job.
    """
    source: str | None = None
    data: dict[str, Any] = {}
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        source = str(path)
        data = _read_yaml(Path(path))
    data = apply_overrides(data, overrides)
    try:
        return Config.model_validate(data)
    except ConfigError as err:
        raise ConfigError(err.problems, source=source) from None


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config, so a run directory records exactly what ran."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cfg.to_yaml())
    return path

