"""Argument types and helpers shared by every `distattn` subcommand.

One place for the config arguments, the typed numbers and lists, and the error
a command raises for a bad argument, so every command refuses bad input the same
way: one line naming the option and the value, exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Iterable


class UsageError(ValueError):
    """A bad command-line argument found after parsing; `distattn.cli.main` prints it and exits 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default (where it has one worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower():
            return text
        if action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The positional CONFIG and the repeatable `--set KEY=VALUE` of every config-driven command."""
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config (default: the embedded configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set parallel.cp=4 (repeatable)")


def load(args):
    """The validated config of a command's CONFIG and --set arguments."""
    from distattn.config import load_config
    return load_config(args.config, args.overrides)


def _number(kind: type, low: float | None, text: str, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and value != value:  # NaN
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    if low is not None and value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(int, 1, text, "an integer >= 1")


def nonneg_int(text: str) -> int:
    return _number(int, 0, text, "an integer >= 0")


def positive_float(text: str) -> float:
    value = _number(float, None, text, "a number > 0")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    value = _number(float, 0.0, text, "a number >= 0")
    if value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """Comma-separated positive integers, e.g. `1,2,4`."""
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def choice_list(choices: Iterable[str], accept: Callable[[str], bool] | None = None):
    """An argument type for comma-separated names from `choices` (or any name `accept` allows)."""
    allowed = list(choices)

    def parse(text: str) -> list[str]:
        import difflib
        names = [x.strip() for x in text.split(",") if x.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"expected comma-separated names from {', '.join(allowed)}")
        for n in names:
            if n not in allowed and not (accept and accept(n)):
                close = difflib.get_close_matches(n, allowed, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise argparse.ArgumentTypeError(f"{n!r} is not one of {', '.join(allowed)}{hint}")
        return names
    return parse


def write_json(path: str | None, payload) -> None:
    """Write a command's results as JSON when --json was given."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


__all__ = ["HelpFormatter", "UsageError", "add_config_args", "choice_list", "int_list", "load",
           "nonneg_float", "nonneg_int", "positive_float", "positive_int", "write_json"]
