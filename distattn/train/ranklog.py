"""Each rank's full output in a log file, and its failure as one line for the driver.

A rank's stdout and stderr (Python's and C/C++ libraries' alike, at the file
descriptor level) go both to where they went before (the terminal, Ray's log
streaming) and to `<run.output_dir>/logs/rank<R>.log`. When the rank raises, the
traceback goes to that file only, and the rank hands the driver a `RankFailure`:
the message in one line, the log's path, and whether the error is only the echo
of a peer's failure (a collective broken because another rank stopped), so the
driver can show the first cause instead of every rank's consequence.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

# messages of errors that only say a peer went away or a collective broke
_ECHO_MARKERS = (
    "connection closed by peer", "connection reset by peer", "broken pipe", "socket closed",
    "connection refused", "read error", "recv error", "timed out", "timeout", "nccl error",
    "ncclremoteerror", "ncclsystemerror", "process group", "processgroup", "failed after",
    "peer", "collective",
)
_PLAIN_TYPES = (ValueError, RuntimeError, OSError, FloatingPointError)  # their message speaks for itself


def log_path(output_dir: str | os.PathLike, rank: int) -> Path:
    return Path(output_dir) / "logs" / f"rank{rank}.log"


def shown_path(path: str | os.PathLike) -> str:
    """The path as the user would type it: relative to the working directory when inside it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(p)


@dataclass(frozen=True)
class RankFailure:
    """What the driver needs to report a failed rank in one line."""

    rank: int
    message: str
    log: str | None = None
    echo: bool = False

    def line(self) -> str:
        where = f" (full log: {shown_path(self.log)})" if self.log else ""
        return f"rank {self.rank} failed: {self.message}{where}"


def one_line(exc: BaseException, limit: int = 400) -> str:
    """The exception's message on one line; its type too unless the message speaks for itself."""
    text = " ".join(s.strip() for s in str(exc).splitlines() if s.strip())
    if not text or not isinstance(exc, _PLAIN_TYPES):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_echo(exc: BaseException) -> bool:
    """Whether the error only reports that a peer failed (the collective broke under it)."""
    names = {t.__name__ for t in type(exc).__mro__}
    if "DistBackendError" in names or "DistNetworkError" in names:
        return True
    if not isinstance(exc, (RuntimeError, OSError, TimeoutError)):
        return False
    text = str(exc).lower()
    return any(m in text for m in _ECHO_MARKERS)


def first_causes(failures: list[RankFailure]) -> list[RankFailure]:
    """The failures worth showing: those that are not echoes, else all of them."""
    real = [f for f in failures if not f.echo]
    return sorted(real or failures, key=lambda f: f.rank)


class _Tee:
    """Duplicate file descriptors 1 and 2 into a log file (a pipe per fd, a thread each)."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "ab", buffering=0)
        self.lock = threading.Lock()
        self.saved: dict[int, int] = {}
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for fd in (1, 2):
            r, w = os.pipe()
            self.saved[fd] = os.dup(fd)
            os.dup2(w, fd)
            os.close(w)
            t = threading.Thread(target=self._pump, args=(r, self.saved[fd]), daemon=True,
                                 name=f"distattn-tee-{fd}")
            t.start()
            self.threads.append(t)

    def _pump(self, r: int, out: int) -> None:
        try:
            while True:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                with contextlib.suppress(OSError):
                    os.write(out, chunk)
                with self.lock:
                    self.file.write(chunk)
        finally:
            os.close(r)

    def write_log_only(self, text: str) -> None:
        with self.lock:
            self.file.write(text.encode(errors="replace"))

    def stop(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)  # closes the pipe's write end: the pump sees EOF
        for t in self.threads:
            t.join(timeout=5)
        for saved in self.saved.values():
            os.close(saved)
        self.file.close()


@contextlib.contextmanager
def rank_log(output_dir: str | os.PathLike, rank: int, role: str = "trainer") -> Iterator["_Tee"]:
    """Tee this process's output into the rank's log file for the duration of the block."""
    path = log_path(output_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tee = _Tee(path)
    tee.write_log_only(f"=== distattn rank {rank} ({role}), pid {os.getpid()}, "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
    tee.start()
    try:
        yield tee
    finally:
        tee.stop()


def run_logged(output_dir: str | os.PathLike, rank: int, role: str, fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) with the rank's output teed to its log; returns fn's result, or a
    RankFailure when it raised (the traceback is in the log, not on the terminal)."""
    with rank_log(output_dir, rank, role) as tee:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            tee.write_log_only(traceback.format_exc())
            return RankFailure(rank=rank, message=one_line(e), log=str(tee.path), echo=is_echo(e))
