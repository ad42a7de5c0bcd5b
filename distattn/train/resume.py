"""Finding, checking and comparing checkpoints, from files alone (no process group).

The driver resolves `--resume [STEP|PATH]` here before any rank starts, so a
missing, unfinished or damaged checkpoint, or one written by a different model,
is named with the file or config key at fault and the fix, instead of failing
inside torch.distributed.checkpoint on every rank. The ranks reuse
`incompatibilities` as a guard when the Trainer is used directly.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["CheckpointError", "step_dir", "latest", "steps", "verify", "find", "saved_config",
           "incompatibilities", "previous_good"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message names it and says what would work."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def latest(root: Path) -> Path | None:
    """The checkpoint the `latest` marker names (written after a checkpoint is complete)."""
    marker = Path(root) / "latest"
    if not marker.is_file():
        return None
    name = marker.read_text().strip()
    return Path(root) / name if name else None


def steps(root: Path) -> list[int]:
    """The steps of every `step_*` directory under root, ascending (finished or not)."""
    out = []
    for d in Path(root).glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", d.name)
        if m and d.is_dir():
            out.append(int(m.group(1)))
    return sorted(out)


def _meta(path: Path) -> dict[str, Any]:
    f = path / "meta.json"
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: the run stopped while writing this checkpoint")
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f} is not readable JSON ({e})") from None
    missing = [k for k in ("step", "dp", "cp", "world", "zero_stage") if k not in (meta or {})]
    if missing:
        raise CheckpointError(f"{f} lacks {', '.join(missing)}")
    return meta


def _check_dcp(dcp_dir: Path) -> None:
    """Every storage file the DCP metadata names exists and holds the bytes it records."""
    from torch.distributed.checkpoint import FileSystemReader
    if not (dcp_dir / ".metadata").is_file():
        raise CheckpointError(f"{dcp_dir / '.metadata'} is missing: the model and optimizer were not "
                              "completely saved")
    try:
        md = FileSystemReader(str(dcp_dir)).read_metadata()
    except Exception as e:  # pickle and I/O errors of a damaged file
        raise CheckpointError(f"{dcp_dir / '.metadata'} cannot be read ({type(e).__name__}: {e})") from None
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        need[info.relative_path] = max(need.get(info.relative_path, 0), end)
    for rel, end in sorted(need.items()):
        f = dcp_dir / rel
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (the DCP metadata lists it)")
        size = f.stat().st_size
        if size < end:
            raise CheckpointError(f"{f} is truncated: {size} bytes, but the DCP metadata records data "
                                  f"up to byte {end}")


def verify(path: Path) -> dict[str, Any]:
    """The checkpoint's meta.json after checking that every file it needs is complete;
    CheckpointError names the first file that is missing, short or unreadable."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    meta = _meta(path)
    files = meta.get("rank_files")
    if files is None:  # checkpoints written before sizes were recorded: rank 0's file at least
        files = {"rank00000.pt": None}
    for name, size in sorted(files.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (this rank's data position, scheduler and RNG)")
        if size is not None and f.stat().st_size != size:
            raise CheckpointError(f"{f} is {f.stat().st_size} bytes, but {size} were written (truncated "
                                  f"or replaced)")
    if meta["zero_stage"]:
        ds = path / "deepspeed"
        if not ds.is_dir() or not any(ds.iterdir()):
            raise CheckpointError(f"{ds} is missing or empty (the ZeRO model and optimizer state)")
    else:
        _check_dcp(path / "dcp")
    return meta


def previous_good(root: Path, before: int) -> int | None:
    """The newest complete checkpoint step below `before`, or None."""
    for s in reversed(steps(root)):
        if s < before:
            try:
                verify(step_dir(root, s))
                return s
            except CheckpointError:
                continue
    return None


def find(run_dir: Path, target: bool | str) -> Path:
    """The checkpoint directory `--resume` names: True for the latest, a step number, or a path
    (a step directory, a run's checkpoints directory or a run directory)."""
    root = Path(run_dir) / "checkpoints"
    if target is True:
        path = latest(root)
        if path is None:
            done = steps(root)
            hint = (f" ({len(done)} unfinished step directories, no finished checkpoint)" if done else "")
            raise CheckpointError(f"--resume: no checkpoint under {root}{hint}; train with "
                                  "train.ckpt_every > 0 first, or drop --resume")
        if not path.is_dir():
            raise CheckpointError(f"--resume: {root / 'latest'} names {path.name}, which does not exist; "
                                  f"pick a checkpoint with --resume STEP ({_have(root)})")
        return path
    text = str(target).strip()
    if re.fullmatch(r"-?\d+", text):
        step = int(text)
        if step < 0:
            raise CheckpointError(f"--resume {text}: expected a step >= 0 or a checkpoint directory")
        path = step_dir(root, step)
        if not path.is_dir():
            raise CheckpointError(f"--resume {text}: there is no checkpoint of step {step} in {root} "
                                  f"({_have(root)})")
        return path
    p = Path(text)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        raise CheckpointError(f"--resume {text}: that is a config file; put the config first: "
                              f"distattn train {text} --resume [STEP|PATH]")
    if not p.exists():
        raise CheckpointError(f"--resume {text}: no such checkpoint directory; give a step number or "
                              f"a checkpoint directory such as {step_dir(root, 100)}")
    for cand in (p, p / "checkpoints"):
        if (cand / "meta.json").is_file() or re.fullmatch(r"step_\d+", cand.name):
            return cand
        mark = latest(cand)
        if mark is not None:
            return mark
    raise CheckpointError(f"--resume {text}: not a checkpoint (no meta.json) and no 'latest' marker "
                          f"under it; give a step directory such as {step_dir(root, 100)}")


def _have(root: Path) -> str:
    done = steps(root)
    if not done:
        return "none there"
    shown = ", ".join(map(str, done[-6:]))
    return f"steps there: {'..., ' if len(done) > 6 else ''}{shown}"


def saved_config(ckpt: Path) -> dict[str, Any] | None:
    """The config that wrote a checkpoint: its own config.yaml, else its run's."""
    for f in (Path(ckpt) / "config.yaml", Path(ckpt).parent.parent / "config.yaml"):
        if f.is_file():
            try:
                data = yaml.safe_load(f.read_text())
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(data, dict):
                return data
    return None


# config keys whose change keeps the saved tensors or state from loading
_MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "vocab_size", "layer_pattern")
_DATA_KEYS = (("data", "source"), ("data", "path"), ("data", "seq_len"), ("data", "synthetic_task"),
              ("data", "jsonl_field"), ("data", "balance"), ("run", "seed"))


def _get(d: dict | None, section: str, key: str):
    sec = (d or {}).get(section)
    return sec.get(key) if isinstance(sec, dict) else None


def incompatibilities(cfg, meta: dict[str, Any], saved: dict[str, Any] | None) -> list[tuple[str, Any, Any, str]]:
    """(key, saved value, value now, why it matters) for every setting that keeps this run from
    loading the checkpoint; empty when it resumes."""
    now = cfg.model_dump()
    out: list[tuple[str, Any, Any, str]] = []
    if saved is not None:
        m_saved, m_now = saved.get("model") or {}, now["model"]
        for k in _MODEL_KEYS:
            a, b = m_saved.get(k), m_now.get(k)
            if k == "layer_pattern":  # unset means all softmax layers: compare what was built
                a = a or "N" * int(m_saved.get("num_layers") or 0)
                b = b or "N" * int(m_now["num_layers"])
            if k in m_saved and a != b:
                out.append((f"model.{k}", a, b, "the saved tensors have other shapes"))
        for section, k in _DATA_KEYS:
            a, b = _get(saved, section, k), _get(now, section, k)
            if section in saved and k in (saved.get(section) or {}) and a != b:
                out.append((f"{section}.{k}", a, b, "the saved data position belongs to other data"))
    p = cfg.parallel
    if meta["dp"] != p.dp and cfg.data.balance == "attention":
        out.append(("parallel.dp", meta["dp"], p.dp, "data.balance=attention packs documents per dp rank"))
    if meta.get("tp", 1) != p.tp:
        out.append(("parallel.tp", meta.get("tp", 1), p.tp,
                    "each tp rank's parts of the weights are saved under its own keys"))
    if meta["zero_stage"] != cfg.train.zero_stage:
        out.append(("train.zero_stage", meta["zero_stage"], cfg.train.zero_stage,
                    "ZeRO and plain checkpoints have different formats"))
    elif meta["zero_stage"] and meta["world"] != p.world_size:
        out.append(("parallel.world_size", meta["world"], p.world_size,
                    "ZeRO partitions the optimizer state per rank"))
    return out


def describe_incompatible(ckpt: Path, diffs: list[tuple[str, Any, Any, str]]) -> str:
    """One line naming every differing key, the saved and current values, and the fix."""
    parts = "; ".join(f"{k}={a!r} then, {b!r} now ({why})" for k, a, b, why in diffs)
    sets = " ".join(f"--set {k}={_yaml_value(a)}" for k, a, _, _ in diffs)
    return (f"--resume: checkpoint {ckpt} was written with other settings: {parts}; resume with the "
            f"saved values ({sets}), or start a new run without --resume (--overwrite here, or "
            f"--set run.name=NEW)")


def _yaml_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
