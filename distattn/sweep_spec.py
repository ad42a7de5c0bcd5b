"""What `distattn sweep` runs: the sweep YAML's keys, their checks, `--set KEY=VALUE` overrides.

Every problem is one line naming the key, the value and what would work, and
where the key came from: the YAML file, or the `--set` override that set it.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from distattn.config import ConfigError

__all__ = ["SearchSpec", "SweepSpec", "Point", "load_sweep", "parse_sets", "LINEAR", "DTYPES", "BACKENDS"]

LINEAR = ("lasp2", "lasp1")
DTYPES = ("fp32", "bf16")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class SearchSpec:
    enabled: bool = True
    start: int = 4096
    max: int = 1 << 20
    granularity: int = 1024


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class SweepSpec:
    name: str = "sweep"
    out_dir: str = "runs/sweeps/latest"
    schemes: list[str] = field(default_factory=lambda: ["ring", "allgather"])
    lengths: list[int] = field(default_factory=lambda: [2048, 4096])
    worlds: list[int] = field(default_factory=lambda: [2])
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    dtype: str = "fp32"
    causal: bool = True
    iters: int = 2
    warmup: int = 1
    threads: int = 1
    backend: str = "auto"  # auto | gloo | nccl
    timeout_s: float = 600.0
    memory_budget_mib: float | None = None
    use_planner: bool = True  # skip points the planner rules out; seed the search with its longest context
    plan_margin: float = 0.15  # skip only when predicted * (1 - plan_margin) > budget
    search: SearchSpec = field(default_factory=SearchSpec)

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) for every value the sweep cannot run with; empty when it can."""
        out: list[tuple[str, str]] = []

        def bad(key: str, msg: str) -> None:
            out.append((key, f"{key}: {msg}"))

        for key in ("name", "out_dir"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                bad(key, f"{getattr(self, key)!r} must be a non-empty string")
        if not isinstance(self.schemes, list) or not self.schemes:
            bad("schemes", f"expected a non-empty list of scheme names, got {self.schemes!r}")
        else:
            from distattn.schemes import scheme_names
            known = set(scheme_names())
            for s in self.schemes:
                base = s.partition("@")[0].partition(":")[0] if isinstance(s, str) else s
                if base not in known:
                    bad("schemes", f"{s!r} is not a scheme; choose from {', '.join(sorted(known))} "
                                   f"(usp:U for a ulysses degree, NAME@LAYOUT for a layout)")
        for key in ("lengths", "worlds"):
            vals = getattr(self, key)
            if not isinstance(vals, list) or not vals or any(not _is_int(v) or v < 1 for v in vals):
                bad(key, f"expected a non-empty list of positive integers, got {vals!r}")
        for key, low in (("heads", 1), ("kv_heads", 1), ("head_dim", 1), ("iters", 1), ("warmup", 0),
                         ("threads", 1)):
            v = getattr(self, key)
            if not _is_int(v) or v < low:
                bad(key, f"expected an integer >= {low}, got {v!r}")
        if _is_int(self.heads) and _is_int(self.kv_heads) and self.heads >= 1 and self.kv_heads >= 1 \
                and self.heads % self.kv_heads:
            bad("kv_heads", f"heads={self.heads} is not divisible by kv_heads={self.kv_heads}")
        if self.dtype not in DTYPES:
            bad("dtype", f"{self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.backend not in BACKENDS:
            bad("backend", f"{self.backend!r} is not one of {', '.join(BACKENDS)}")
        for key in ("causal", "use_planner"):
            if not isinstance(getattr(self, key), bool):
                bad(key, f"expected true or false, got {getattr(self, key)!r}")
        if not _is_num(self.timeout_s) or self.timeout_s <= 0:
            bad("timeout_s", f"expected a number of seconds > 0, got {self.timeout_s!r}")
        if self.memory_budget_mib is not None and (not _is_num(self.memory_budget_mib)
                                                   or self.memory_budget_mib <= 0):
            bad("memory_budget_mib", f"expected a number of MiB > 0 (or null), got {self.memory_budget_mib!r}")
        if not _is_num(self.plan_margin) or not 0 <= self.plan_margin < 1:
            out.append(("plan_margin", f"plan_margin: {self.plan_margin!r} must be a number in [0, 1), the "
                                       f"fraction by which the planner may over-predict (0.15: skip a point "
                                       f"only when 85% of its prediction is over budget)"))
        s = self.search
        if not isinstance(s.enabled, bool):
            bad("search.enabled", f"expected true or false, got {s.enabled!r}")
        for key in ("start", "max", "granularity"):
            v = getattr(s, key)
            if not _is_int(v) or v < 1:
                bad(f"search.{key}", f"expected an integer >= 1, got {v!r}")
        if _is_int(s.start) and _is_int(s.max) and s.max < s.start:
            bad("search.max", f"{s.max} is below search.start={s.start}; need 1 <= start <= max")
        if s.enabled is True and self.memory_budget_mib is None:
            bad("search.enabled", "the search needs memory_budget_mib (the per-rank budget the search "
                                  "fits); set it, or search.enabled=false")
        return out

    def check(self, where: dict[str, str] | None = None) -> None:
        """Raise ConfigError listing every problem; ``where`` names each key's source."""
        probs = self.problems()
        if probs:
            where = where or {}
            raise ConfigError([f"{where[k]}: {m}" if k in where else m for k, m in probs])


@dataclass
class Point:
    scheme: str
    world: int
    n_tokens: int
    phase: str = "grid"  # grid | search
    status: str = "ok"  # ok | oom | failed | timeout | invalid | skipped (by the planner)
    step_s: float = math.nan
    tokens_per_s: float = math.nan
    compute_s: float = math.nan
    bytes_sent: int = 0
    exposed_s: float = math.nan
    peak_mem_bytes: int = 0
    predicted_mem_bytes: int | None = None  # the planner's peak (distattn.plan.attention); None: no model
    peak_rss_bytes: int = 0
    mem_source: str = ""
    fits: bool | None = None
    error: str = ""


_KEYS = tuple(f.name for f in fields(SweepSpec) if f.name != "search")
_SEARCH_KEYS = tuple(f.name for f in fields(SearchSpec))


def _unknown(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "") + \
        f"; valid keys are {', '.join(valid)}"


def parse_sets(items: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """`--set KEY=VALUE` overrides of sweep keys (`search.KEY` for the search), values read as YAML.

    Returns the nested overrides and, per dotted key, the override that set it.
    """
    import yaml
    data: dict[str, Any] = {}
    where: dict[str, str] = {}
    valid = list(_KEYS) + [f"search.{k}" for k in _SEARCH_KEYS]
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with KEY a sweep key, "
                              f"e.g. --set lengths=[2048,4096] or --set search.max=65536")
        if key not in valid:
            raise ConfigError(f"--set {item}: {_unknown(key, valid)}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {item}: {text!r} is not a YAML value; e.g. 4, 0.5, true, "
                              f"[ring, allgather]") from None
        if key.startswith("search."):
            data.setdefault("search", {})[key.split(".", 1)[1]] = value
        else:
            data[key] = value
        where[key] = f"--set {item}"
    return data, where


def load_sweep(path: str | Path, overrides: dict | None = None, sets: list[str] | None = None) -> SweepSpec:
    """Read a sweep YAML (keys of :class:`SweepSpec`, ``search`` a nested mapping), then apply
    ``overrides`` (a mapping) and ``sets`` (``KEY=VALUE`` strings); ConfigError names what is wrong."""
    import yaml
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the sweep file ({e.strerror or e}); pass a sweep YAML "
                          f"such as configs/sweeps/example.yaml") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sweep keys, got {type(data).__name__}")
    set_data, where = parse_sets(list(sets or []))
    search = data.pop("search", None) or {}
    if not isinstance(search, dict):
        raise ConfigError(f"{path}: search: expected a mapping of {', '.join(_SEARCH_KEYS)}, got {search!r}")
    search = {**search, **set_data.pop("search", {})}
    data.update(overrides or {})
    data.update(set_data)
    bad = sorted(set(data) - set(_KEYS))
    if bad:
        raise ConfigError(f"{path}: {_unknown(bad[0], list(_KEYS) + ['search'])}")
    sbad = sorted(set(search) - set(_SEARCH_KEYS))
    if sbad:
        raise ConfigError(f"{path}: search: {_unknown(sbad[0], list(_SEARCH_KEYS))}")
    spec = SweepSpec(**data, search=SearchSpec(**search))
    spec.check({k: where.get(k, str(path)) for k in list(_KEYS) + [f"search.{k}" for k in _SEARCH_KEYS]})
    return spec
