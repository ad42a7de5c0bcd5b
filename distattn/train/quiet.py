"""Keep training output readable: line by line, no colour in pipes, no known library noise.

`install()` runs once in every process that trains or launches (the driver and
each rank). It only drops messages that tell a distattn user nothing they can
act on, each matched by its module and text; every other warning still shows:
- megatron-core's deprecation warnings (about config fields and defaults distattn
  does not use);
- torch.distributed.checkpoint's "existing checkpoint, overwriting" warning (the
  run directory's rules decide about overwriting, before launch);
- the FutureWarning torch raises when DeepSpeed ZeRO calls the old
  `all_gather_into_tensor` name;
- Ray's notice that token authentication is on for the local cluster it starts.

`ray_env()` sets Ray's environment defaults; call it before `import ray`.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

_installed = False

# (message regex, category, module regex) for warnings.filterwarnings
WARNING_FILTERS: tuple[tuple[str, type[Warning], str], ...] = (
    (r".*deprecat", Warning, r"megatron\.core"),
    (r"", DeprecationWarning, r"megatron\.core"),
    (r"Detected an existing checkpoint in .*overwriting", UserWarning, ""),
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning, ""),
    (r"`torch\.distributed\.reduce_scatter_tensor` is deprecated", FutureWarning, ""),
)
# loggers whose warnings are notices, not problems
QUIET_LOGGERS = ("ray._private.authentication.authentication_token_setup",)


def line_buffered() -> None:
    """Flush every line, so output piped to a file or `tee` appears as it is written."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(line_buffering=True)
            except (ValueError, OSError):  # a closed or detached stream
                pass


def ray_env() -> None:
    """Ray's environment defaults: no usage reporting, every rank's lines (no dedup), and
    no colour codes around the `(rank0 pid=...)` prefixes when stdout is not a terminal."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not _isatty(sys.stdout):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def install() -> None:
    """Line-buffered output and the noise filters above; idempotent."""
    global _installed
    line_buffered()
    if _installed:
        return
    _installed = True
    for message, category, module in WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
