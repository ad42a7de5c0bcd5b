"""Keep kineto's own log lines out of the profile command's output.

torch's profiler backend (kineto) writes ``USDT:``/``STAGE:`` records such as
``profiler_start`` straight to file descriptor 2 from C++, from every rank at
once, so they interleave with (and, without their newlines, run into) the
command's own lines. Around the profiler's start, stop and export, fd 2 goes to
a temporary file; afterwards every other line is passed on, each ended by a
newline.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from contextlib import contextmanager

# a kineto record: "USDT:2026-12-02 09:23:24 5564:5564 SyncActivityProfilerHandler.cpp:52] profiler_start"
KINETO_RECORD = re.compile(
    r"(?:USDT|STAGE):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \w+\.cpp:\d+\] "
    r"(?:profiler_start|profiler_stop|Completed Stage: (?:Warm Up|Collection|Post Processing))")


def strip_kineto(text: str) -> str:
    """The text without kineto's records, every remaining non-blank line ended by a newline."""
    lines = (line.rstrip() for line in KINETO_RECORD.sub("\n", text).splitlines())
    return "".join(line + "\n" for line in lines if line.strip())


@contextmanager
def quiet_kineto():
    """Capture fd 2 over the block; re-emit what is not kineto's, line by line."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. captured): nothing to filter
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            rest = strip_kineto(tmp.read().decode(errors="replace"))
            if rest:
                sys.stderr.write(rest)
                sys.stderr.flush()
