"""Checkpoint conversion: a Hugging Face model directory <-> a distattn model checkpoint.

A distattn model checkpoint is a directory with
- `config.yaml`: a distattn config whose model section describes the weights;
- `dcp/`: the weights as a torch.distributed.checkpoint under the key "model", with
  the GPTModel's parameter names, so a training run loads it with any dp x cp
  split and every rank reads only the tensors it holds;
- `meta.json`: format, family and where it came from;
- `hf/`: the source's config.json and tokenizer files, so converting back
  gives the same Hugging Face directory.
A training checkpoint (`runs/<name>/checkpoints/step_N`, or the run directory for
its latest) converts to Hugging Face the same way.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from distattn.config import Config, ConfigError, ModelConfig
from distattn.hf.config_map import family, hf_config, model_section
from distattn.hf.weights import hf_to_megatron, megatron_to_hf, model_tensors, read_safetensors, write_safetensors

FORMAT = "distattn-model"
HF_EXTRA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")


def read_hf_config(path: str | Path) -> dict[str, Any]:
    d = Path(path)
    if not d.is_dir():
        raise ConfigError(f"{d}: no such Hugging Face model directory")
    cfg = d / "config.json"
    if not cfg.is_file():
        raise ConfigError(f"{d}: no config.json; a Hugging Face model directory holds config.json and "
                          f"model.safetensors (or shards with an index)")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg}: not valid JSON ({e})") from None


def hf_model_config(path: str | Path) -> tuple[ModelConfig, str, list[str]]:
    """The distattn model section of a HF directory, its family, and notes on what is not applied."""
    hf = read_hf_config(path)
    section, notes = model_section(hf)
    return ModelConfig.model_validate(section), family(hf), notes


def load_hf(path: str | Path, names: set[str] | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A HF directory's model section and its weights under our parameter names."""
    model_cfg, _, _ = hf_model_config(path)
    return model_cfg, hf_to_megatron(read_safetensors(Path(path), names), model_cfg)


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty; choose a new output directory, or pass "
                              f"--overwrite to replace it")
        shutil.rmtree(out)


def hf_to_distattn(src: str | Path, out: str | Path, overwrite: bool = False) -> list[str]:
    """Convert a HF directory into a distattn model checkpoint; returns notes for the user."""
    import torch.distributed.checkpoint as dcp
    src, out = Path(src), Path(out)
    model_cfg, fam, notes = hf_model_config(src)
    weights = hf_to_megatron(read_safetensors(src), model_cfg)
    _refuse_existing(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save({"model": weights}, checkpoint_id=str(out / "dcp"), no_dist=True)
    cfg = Config.model_validate({"model": model_cfg.model_dump()})
    (out / "config.yaml").write_text(cfg.to_yaml())
    (out / "hf").mkdir()
    for name in HF_EXTRA_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / "hf" / name)
    (out / "meta.json").write_text(json.dumps({"format": FORMAT, "family": fam, "source": str(src)}, indent=2))
    return notes


def _read_dcp_model(dcp_dir: Path) -> dict[str, torch.Tensor]:
    """The "model" tensors of a DCP checkpoint, in one process (no process group needed)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner, _load_state_dict
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(dcp_dir)),
                     planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    model = state.get("model")
    if not isinstance(model, dict):
        raise ConfigError(f"{dcp_dir}: this checkpoint holds no model weights")
    return model_tensors(model)


def locate_distattn(src: str | Path) -> tuple[Path, Path, dict[str, Any]]:
    """(dcp directory, config.yaml, meta) of a converted checkpoint, a training step, or a run directory."""
    src = Path(src)
    if not src.exists():
        raise ConfigError(f"{src}: no such distattn checkpoint or run directory")
    if (src / "checkpoints" / "latest").is_file():  # a run directory: its latest checkpoint
        src = src / "checkpoints" / (src / "checkpoints" / "latest").read_text().strip()
    meta_file = src / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("format") == FORMAT:
        return src / "dcp", src / "config.yaml", meta
    if (src / "dcp").is_dir() and (src / "config.yaml").is_file():  # a step that saved its own config
        return src / "dcp", src / "config.yaml", meta
    if (src / "dcp").is_dir() and (src.parent.parent / "config.yaml").is_file():
        return src / "dcp", src.parent.parent / "config.yaml", meta
    if (src / "deepspeed").is_dir():
        raise ConfigError(f"{src} is a DeepSpeed ZeRO checkpoint; resume it with train.zero_stage, or "
                          f"train with train.zero_stage=0 to write a convertible checkpoint")
    raise ConfigError(f"{src} is neither a converted model (meta.json format {FORMAT!r}), a training "
                      f"checkpoint (step_N with dcp/) nor a run directory with checkpoints")


def load_distattn(src: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """A distattn checkpoint's model section, weights and meta."""
    dcp_dir, config_file, meta = locate_distattn(src)
    from distattn.config import load_config
    model_cfg = load_config(config_file).model
    return model_cfg, _read_dcp_model(dcp_dir), meta


def distattn_to_hf(src: str | Path, out: str | Path, fam: str | None = None,
                   overwrite: bool = False) -> str:
    """Convert a distattn checkpoint into a HF directory; returns the family written."""
    dcp_dir, config_file, meta = locate_distattn(src)
    from distattn.config import load_config
    model_cfg, weights = load_config(config_file).model, _read_dcp_model(dcp_dir)
    fam = fam or meta.get("family") or ("qwen2" if model_cfg.qkv_bias else "llama")
    original = dcp_dir.parent / "hf" / "config.json"
    base = json.loads(original.read_text()) if original.is_file() else {}
    config = {**base, **hf_config(model_cfg, fam)}
    if base and "rope_parameters" not in base:  # keep the source's own (transformers 4) layout
        config.pop("rope_parameters", None)
    tensors = megatron_to_hf(weights, model_cfg)
    out = Path(out)
    _refuse_existing(out, overwrite)
    write_safetensors(out, tensors)
    for name in HF_EXTRA_FILES:
        extra = dcp_dir.parent / "hf" / name
        if name != "config.json" and extra.is_file():
            shutil.copy2(extra, out / name)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return fam


__all__ = ["FORMAT", "distattn_to_hf", "hf_model_config", "hf_to_distattn", "load_distattn", "load_hf",
           "locate_distattn", "read_hf_config"]
