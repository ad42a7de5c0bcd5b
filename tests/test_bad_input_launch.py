"""Launch-time failures of `distattn train`, through the real console script in a subprocess.

Each case asserts the exit code, that no traceback reaches the terminal, that the
message names the address (or the rank, its message and its log file) and the fix,
and how long it took. Connecting to a Ray address that does not answer must fail
within `launch.start_timeout_s`, without Ray's retry warnings; a rank that raises
is one line from the driver, its traceback in `<run.output_dir>/logs/rank<R>.log`.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cli_util import CONSOLE, CliResult, run_cli, run_cli_process

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=128", "data.seq_len=192",
        "train.steps=3", "train.warmup_steps=1", "train.tensorboard=false", "train.log_every=1"]
FIX = "ray start --head"
NOISE = ("Failed to connect to GCS", "rpc_client", "gcs_client", "\x1b[")


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@contextlib.contextmanager
def _server(reply: bytes | None):
    """A TCP port on every interface that accepts and then stays silent (reply None) or
    answers `reply` and closes: something listens, but it is not a Ray cluster."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 0))
    s.listen(16)
    held: list[socket.socket] = []

    def serve():
        with contextlib.suppress(OSError):
            while True:
                c, _ = s.accept()
                if reply is None:
                    held.append(c)
                else:
                    with contextlib.suppress(OSError):
                        c.recv(1024)
                        c.sendall(reply)
                    c.close()
    threading.Thread(target=serve, daemon=True).start()
    try:
        yield s.getsockname()[1]
    finally:
        s.close()
        for c in held:
            c.close()


def _no_cluster_here() -> bool:
    from ray._private import services
    return not services.find_gcs_addresses()


# (id, address argument or None, RAY_ADDRESS or None, server reply, start_timeout_s, names, max_s,
#  in a subprocess: the hang cases run the console script; the others run in this process)
CONNECT_CASES = [
    ("refused", "127.0.0.1:1", None, None, 60, ["--address 127.0.0.1:1", "connection refused"], 20, True),
    ("ray_address_env", None, "127.0.0.1:1", None, 60, ["RAY_ADDRESS=127.0.0.1:1", "connection refused"],
     20, True),
    ("silent_port", "127.0.0.1:{port}", None, "silent", 3, ["--address 127.0.0.1:", "no answer",
                                                            "within 3s"], 20, True),
    ("ray_client_refused", "ray://127.0.0.1:1", None, None, 60, ["ray://127.0.0.1:1", "refused"], 10,
     False),
    ("unknown_host", "no-such-host.invalid:6379", None, None, 60, ["no-such-host.invalid", "resolve"], 10,
     False),
    ("not_a_gcs", "127.0.0.1:{port}", None, b"HTTP/1.1 400 Bad Request\r\n\r\n", 60,
     ["--address 127.0.0.1:", "not as a Ray cluster's GCS", "6379"], 10, False),
    ("auto_without_cluster", "auto", None, None, 60, ["--address auto", "no running Ray cluster"], 10,
     False),
]


@pytest.mark.parametrize("case", CONNECT_CASES, ids=[c[0] for c in CONNECT_CASES])
def test_ray_connect_fails_fast(case, tmp_path, monkeypatch):
    name, address, env_address, reply, timeout_s, names, max_s, process = case
    if name == "auto_without_cluster" and not _no_cluster_here():
        pytest.skip("a Ray cluster runs on this machine, so --address auto finds it")
    env = {"RAY_ADDRESS": env_address or ""}
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(_server(None if reply == "silent" else reply)) if reply else 0
        argv = ["train", *(["--address", address.format(port=port)] if address else []),
                *_sets(*TINY, f"run.output_dir={tmp_path / 'run'}", f"launch.start_timeout_s={timeout_s}")]
        if process:
            res = run_cli_process(argv, timeout=60, cwd=tmp_path, env=env)
        else:
            monkeypatch.setenv("RAY_ADDRESS", env["RAY_ADDRESS"])
            res = run_cli(argv, cwd=tmp_path)
    text = res.text
    assert res.code == 2, text
    assert "Traceback" not in text, text
    for n in names + [FIX]:
        assert n in text, f"{n!r} not in:\n{text}"
    assert not [n for n in NOISE if n in text], text
    assert res.seconds < max_s, f"{res.seconds:.1f}s:\n{text}"
    assert not (tmp_path / "run" / "logs").exists()  # no rank started


def _stream(argv: list[str], cwd: Path, env: dict[str, str], timeout: float,
            first: str) -> tuple[CliResult, bool]:
    """Run the console script with its output in a pipe; also tell whether `first` arrived while
    the job was still running (so lines stream instead of arriving at the end)."""
    cmd = [str(CONSOLE)] if CONSOLE.exists() else [sys.executable, "-m", "distattn.cli"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd + argv, cwd=cwd, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines, streamed = [], False
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    try:
        for line in p.stdout:
            lines.append(line)
            if first in line and not streamed:
                streamed = p.poll() is None
        code = p.wait()
    finally:
        timer.cancel()
        if p.poll() is None:
            p.kill()
    assert code != -9, f"no result within {timeout}s:\n{''.join(lines)}"
    return CliResult(code, "".join(lines), "", time.perf_counter() - t0), streamed


# (id, launcher arguments, the rank that raises, limit on seconds)
RANK_CASES = [
    ("local", ["--launcher", "local"], 1, 90),
    ("ray", ["--launcher", "ray"], 1, 120),
]


@pytest.mark.parametrize("case", RANK_CASES, ids=[c[0] for c in RANK_CASES])
def test_rank_failure_is_one_line(case, tmp_path):
    """A rank raises at step 2: one line names the rank, the message and its log; the traceback is
    in the log only; the step-1 line was streamed before the job ended; no library noise."""
    name, launcher, rank, max_s = case
    env = {"DISTATTN_FAULT_INJECT": f"rank={rank},step=2,marker={tmp_path / 'm'},kind=raise",
           "RAY_ADDRESS": ""}
    argv = ["train", *launcher, *_sets(*TINY, "run.output_dir=runs/x")]
    res, streamed = _stream(argv, tmp_path, env, timeout=max_s, first="step     1/3")
    text = res.text
    log = f"runs/x/logs/rank{rank}.log"
    assert res.code == 1, text
    assert "Traceback" not in text, text
    line = f"rank {rank} failed: injected failure on rank {rank} before step 2 " \
           f"(DISTATTN_FAULT_INJECT) (full log: {log})"
    assert line in text, text
    assert sum("failed:" in ln for ln in text.splitlines()) == 1, text  # rank 0 only echoes it
    assert "Traceback" in (tmp_path / log).read_text()
    assert "step     1/3" in (tmp_path / "runs/x/logs/rank0.log").read_text()
    assert streamed, text
    noise = ("deprecated", "Token authentication", "Detected an existing checkpoint", "FutureWarning",
             "\x1b[")
    assert not [n for n in noise if n in text], text
    assert res.seconds < max_s
