"""Reading a job: YAML files, `section.key=value` overrides, validation, saving what ran."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel

from distattn.config.errors import ConfigError, _did_you_mean, _type_name
from distattn.config.sections import DEFAULT_CONFIG_PATH, MODEL_PRESETS_DIR, Config


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


def _parse_override(item: str, hint: str = "") -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value parsed as YAML), or a ConfigError naming the override.

    A key that is itself a mapping (model.rope_scaling) takes `section.key.field=value` too;
    the key comes back as `key.field`.
    """
    sections = list(Config.model_fields)
    if "=" not in item:
        example = hint or ("4" if item.strip() == "parallel.cp" else "VALUE")
        raise ConfigError(f"--set {item}: expected KEY=VALUE joined by '=' with no spaces, e.g. "
                          f"--set {item.strip() or 'parallel.cp'}={example}")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    section = parts[0]
    if section not in sections:
        raise ConfigError(f"--set {item}: unknown section {section!r}"
                          f"{_did_you_mean(section, sections)}; "
                          f"valid sections are {', '.join(sections)}")
    fields = list(_SECTIONS[section].model_fields)
    if len(parts) not in (2, 3) or not all(parts[1:]):
        raise ConfigError(f"--set {item}: name one key, as {section}.KEY=VALUE; "
                          f"valid keys of {section} are {', '.join(fields)}")
    name = parts[1]
    if name not in fields:
        raise ConfigError(f"--set {item}: {section}.{name} is an unknown key"
                          f"{_did_you_mean(name, fields)}; "
                          f"valid keys of {section} are {', '.join(fields)}")
    if len(parts) == 3:
        sub = _SECTIONS[section].model_fields[name].annotation
        subfields = list(sub.model_fields) if isinstance(sub, type) and issubclass(sub, BaseModel) else []
        if not subfields:
            raise ConfigError(f"--set {item}: {section}.{name} has no fields of its own; "
                              f"set it as {section}.{name}=VALUE")
        if parts[2] not in subfields:
            raise ConfigError(f"--set {item}: {section}.{name}.{parts[2]} is an unknown key"
                              f"{_did_you_mean(parts[2], subfields)}; valid keys of {section}.{name} are "
                              f"{', '.join(subfields)}")
        name = f"{name}.{parts[2]}"
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item}: the value is not valid YAML: {err}") from None
    return section, name, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to raw config data (values parsed as YAML)."""
    if isinstance(overrides, str):
        overrides = [overrides]
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        section, name, value = _parse_override(item)
        target = out.get(section)
        if not isinstance(target, dict):
            target = out[section] = {}
        if "." in name:  # a field of a nested mapping
            name, field = name.split(".", 1)
            nested = target.get(name)
            target[name] = {**(nested if isinstance(nested, dict) else {}), field: value}
        else:
            target[name] = value
    return out


def _drop_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Keys of the embedded default file that equal the built-in defaults are not choices.

    configs/default.yaml mirrors the defaults so users can read them; counting its
    keys as set would turn derived values (world size, warmup, a scheme's own
    layout) into conflicts with the user's --set.
    """
    out: dict[str, Any] = {}
    for section, values in data.items():
        model = _SECTIONS.get(section)
        if model is None or not isinstance(values, dict):
            out[section] = values
            continue
        fields = model.model_fields
        out[section] = {k: v for k, v in values.items() if not (k in fields and _is_default(fields[k], v))}
    return out


def _is_default(field, value: Any) -> bool:
    """Whether a YAML value equals a field's default (a nested section compares as its mapping)."""
    if field.is_required():
        return False
    default = field.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        default = default.model_dump()
    return value == default


def _attribute(problems: list[str], overrides: list[str], source: str | None) -> list[str]:
    """Prefix each problem with where it came from: the --set that set a key it names, else the file."""
    parsed = []
    for item in overrides:
        dotted = item.split("=", 1)[0].strip()
        section, _, name = dotted.partition(".")
        parsed.append((item, section, name))
    out = []
    for line in problems:
        head = line.split(":", 1)[0]
        origin = None
        for item, section, name in reversed(parsed):  # the last --set of a key wins
            dotted = f"{section}.{name}"
            if (head == dotted or dotted in line or dotted.startswith(head + ".") and "." in head
                    or (head == section and re.search(rf"\b{re.escape(name)}\b", line))):
                origin = f"--set {item}"
                break
        if origin is None:
            origin = source
        out.append(f"{origin}: {line}" if origin else line)
    return out


def model_presets() -> list[str]:
    """The names of the model shapes in configs/models/."""
    return sorted(p.stem for p in MODEL_PRESETS_DIR.glob("*.yaml"))


def _expand_preset(data: dict[str, Any]) -> dict[str, Any]:
    """`model.preset: NAME|PATH` -> that file's model section, under the keys given beside it."""
    model = data.get("model")
    if not isinstance(model, dict) or model.get("preset") is None:
        return data
    name = model["preset"]
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"model.preset: expected a preset name or a YAML path, got {name!r}; "
                          f"presets: {', '.join(model_presets())}")
    path = MODEL_PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        path = Path(name)
        if not (path.suffix in (".yaml", ".yml") and path.is_file()):
            raise ConfigError(f"model.preset: {name!r} is neither a preset nor a YAML file"
                              f"{_did_you_mean(name, model_presets())}; presets: {', '.join(model_presets())}")
    shape = _read_yaml(path).get("model")
    if not isinstance(shape, dict):
        raise ConfigError(f"model.preset={name}: {path} has no model section")
    if "preset" in shape:
        raise ConfigError(f"model.preset={name}: {path} names another preset; presets do not chain")
    return {**data, "model": {**shape, **model}}


# keys that must match the weights of model.init_from; the others (RoPE, dtype, recompute, tiles) may change
INIT_SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                   "vocab_size", "qkv_bias", "tie_embeddings", "layer_pattern")


def _init_from_section(where: str) -> dict[str, Any]:
    """The model section of the checkpoint model.init_from names (HF config.json or a distattn config)."""
    path = Path(where).expanduser()
    if not path.exists():
        raise ConfigError(f"model.init_from={where}: no such directory; give a Hugging Face model directory "
                          f"(config.json + safetensors) or a distattn checkpoint (from `distattn convert`, "
                          f"runs/<name>/checkpoints/step_N, or runs/<name>)")
    if (path / "config.json").is_file():
        import importlib.util

        from distattn.hf.config_map import model_section
        from distattn.hf.convert import read_hf_config
        if importlib.util.find_spec("safetensors") is None:
            raise ConfigError(f"model.init_from={where} is a Hugging Face directory, which needs safetensors: "
                              f"pip install 'distattn[hf]'")
        section, _ = model_section(read_hf_config(path))
        return section
    from distattn.hf.convert import locate_distattn
    _, config_file, _ = locate_distattn(path)
    return load_config(config_file).model.model_dump(exclude={"init_from", "preset"})


def _expand_init_from(data: dict[str, Any]) -> dict[str, Any]:
    """model.init_from: the checkpoint's shape under the keys given beside it (shape keys must agree)."""
    model = data.get("model")
    if not isinstance(model, dict) or not model.get("init_from"):
        return data
    if model.get("preset"):
        raise ConfigError(f"model.init_from and model.preset={model['preset']} both give the model's shape; "
                          f"drop model.preset (the shape comes from model.init_from)")
    where = str(model["init_from"])
    ckpt = _init_from_section(where)
    clashes = [f"model.{k}={model[k]!r} (the checkpoint has {ckpt.get(k)!r})" for k in INIT_SHAPE_KEYS
               if k in model and model[k] != ckpt.get(k)]
    if clashes:
        raise ConfigError(f"model.init_from={where}: the weights fix the model's shape, but "
                          f"{', '.join(clashes)}; drop those keys")
    merged = {**ckpt, **model}
    for k, v in model.items():  # a nested mapping given beside init_from refines the checkpoint's
        if isinstance(v, dict) and isinstance(ckpt.get(k), dict):
            merged[k] = {**ckpt[k], **v}
    return {**data, "model": merged}


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML job (None: the shipped default job), apply overrides, validate.

    The defaults live in the models; `configs/default.yaml` mirrors them, so an
    install without the file still yields the same default job. Overrides are
    checked before the file is read, so `--set key value` (a space, not '=')
    is named as such rather than reported as a missing config file.
    """
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    for item in overrides:
        hint = str(path) if path is not None and not Path(path).is_file() else ""
        _parse_override(item, hint)
    source: str | None = None
    data: dict[str, Any] = {}
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        source = str(path)
        data = _read_yaml(Path(path))
        if Path(path).resolve() == DEFAULT_CONFIG_PATH:
            data = _drop_defaults(data)
            source = "configs/default.yaml"
    data = apply_overrides(data, overrides)
    try:
        data = _expand_init_from(_expand_preset(data))
    except ConfigError as err:
        raise ConfigError(_attribute(err.problems, overrides, source)) from None
    try:
        return Config.model_validate(data)
    except ConfigError as err:
        raise ConfigError(_attribute(err.problems, overrides, source)) from None


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config, so a run directory records exactly what ran."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cfg.to_yaml())
    return path
