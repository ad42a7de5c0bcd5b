"""Run the `distattn` CLI as a user would and check how it refuses bad input.

`run_cli` calls `distattn.cli.main` in this process (the console script's entry
point, without paying the imports again for every case); `run_cli_process`
runs the installed console script in a fresh process, with a hard time-out, for
hangs and for what only a real process shows (exit codes, pipes).
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONSOLE = Path(sys.executable).parent / "distattn"


@dataclass
class CliResult:
    code: int
    out: str
    err: str
    seconds: float

    @property
    def text(self) -> str:
        return self.out + self.err


def run_cli(argv: list[str], cwd: str | Path | None = None) -> CliResult:
    """`distattn ARGV` in this process: exit code (argparse's SystemExit included) and output."""
    from distattn.cli import main
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    t0 = time.perf_counter()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(old)
    return CliResult(int(code or 0), out.getvalue(), err.getvalue(), time.perf_counter() - t0)


def run_cli_process(argv: list[str], timeout: float = 60, cwd: str | Path | None = None,
                    env: dict[str, str] | None = None) -> CliResult:
    """The installed console script in a new process; a time-out is a test failure, not a hang."""
    cmd = [str(CONSOLE)] if CONSOLE.exists() else [sys.executable, "-m", "distattn.cli"]
    full_env = {**os.environ, **(env or {})}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd + list(argv), capture_output=True, text=True, timeout=timeout,
                           cwd=cwd, env=full_env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"distattn {' '.join(argv)} did not finish within {timeout}s "
                             f"(output so far: {e.stdout!r} {e.stderr!r})") from None
    return CliResult(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)


def assert_refused(res: CliResult, *names: str, code: int = 2, max_s: float = 10.0) -> None:
    """A clean refusal: the exit code, no traceback, every name (key, argument, value) in the
    message, and quickly."""
    shown = res.text
    assert res.code == code, f"exit code {res.code}, expected {code}:\n{shown}"
    assert "Traceback" not in shown, f"traceback in the output:\n{shown}"
    for n in names:
        assert n in shown, f"{n!r} not named in the message:\n{shown}"
    assert res.seconds < max_s, f"took {res.seconds:.1f}s (limit {max_s}s):\n{shown}"
