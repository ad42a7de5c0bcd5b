"""Turning pydantic's validation errors into lines that name the key, the value and the fix."""
from __future__ import annotations

import difflib
from typing import Any, Iterable, Literal, Sequence, get_args, get_origin

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A config that cannot run; `problems` holds one self-contained line each."""

    def __init__(self, problems: str | Sequence[str], source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        if self.source is None:
            return "\n".join(self.problems)
        if len(self.problems) == 1:
            return f"{self.source}: {self.problems[0]}"
        return f"{self.source}:\n" + "\n".join(f"  - {p}" for p in self.problems)



_NOUNS = {"schemes": "scheme", "source": "data source", "zero_stage": "ZeRO stage"}


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _annotation_at(loc: Sequence[str | int]) -> Any:
    from distattn.config.sections import Config
    ann: Any = Config
    for part in loc:
        if isinstance(part, int):
            args = get_args(ann)
            ann = next((a for a in args if get_origin(a) is list), ann)
            ann = get_args(ann)[0] if get_origin(ann) is list else ann
            continue
        model = _model_of(ann)
        if model is None or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
    return ann


def _literal_values(ann: Any) -> list[Any]:
    if get_origin(ann) is Literal:
        return list(get_args(ann))
    for arg in get_args(ann):
        found = _literal_values(arg)
        if found:
            return found
    return []


def _did_you_mean(value: Any, options: Iterable[Any]) -> str:
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            type(None): "nothing"}.get(type(value), type(value).__name__)


_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string (quote it in YAML)",
    "list_type": "a list", "model_type": None, "model_attributes_type": None, "dict_type": None,
}


def _describe_one(err: dict[str, Any], loc: tuple[str | int, ...]) -> list[str]:
    key, kind, value = _dotted(loc), err["type"], err.get("input")
    where = f"{key}: " if key else ""
    if kind == "value_error":
        cause = err["ctx"]["error"]
        if isinstance(cause, ConfigError):  # a nested section already named its keys
            return list(cause.problems)
        return [f"{where}{line}" for line in str(cause).splitlines()]
    if kind == "literal_error":
        allowed = _literal_values(_annotation_at(loc))
        field = next((p for p in reversed(loc) if isinstance(p, str)), "value")
        noun = _NOUNS.get(field, field.replace("_", " "))
        choices = ", ".join(map(str, allowed)) if allowed else err["ctx"]["expected"]
        return [f"{where}{value!r} is not a {noun}; choose one of {choices}"
                + _did_you_mean(value, allowed)]
    if kind == "extra_forbidden":
        parent = _model_of(_annotation_at(loc[:-1]))
        valid = list(parent.model_fields) if parent else []
        name = loc[-1]
        if len(loc) == 1:
            return [f"{name}: unknown section{_did_you_mean(name, valid)}; "
                    f"valid sections are {', '.join(valid)}"]
        return [f"{key}: unknown key{_did_you_mean(name, valid)}; "
                f"valid keys of {_dotted(loc[:-1])} are {', '.join(valid)}"]
    if kind in ("greater_than_equal", "greater_than"):
        op = ">=" if kind == "greater_than_equal" else ">"
        bound = err["ctx"]["ge" if op == ">=" else "gt"]
        return [f"{where}must be {op} {bound}, got {value!r}"]
    if kind in _EXPECTED:
        expected = _EXPECTED[kind]
        if expected is None:
            model = _model_of(_annotation_at(loc))
            keys = ", ".join(model.model_fields) if model else ""
            expected = f"a mapping with keys from {keys}"
        return [f"{where}expected {expected}, got {_type_name(value)} {value!r}"]
    return [f"{where}{err['msg']}, got {value!r}"]


def _describe(err: ValidationError, prefix: tuple[str, ...] = ()) -> list[str]:
    problems: list[str] = []
    for item in err.errors(include_url=False):
        problems.extend(_describe_one(item, prefix + tuple(item["loc"])))
    return problems
