"""Run a function on W local ranks (spawned processes, gloo or nccl).

Tests, benchmarks and the local launcher share this. A `RankPool` keeps its
worker processes (and their process group) alive between calls so a test suite
pays the torch import and rendezvous once per world size. Any failure or time-out
tears the pool down, so a broken group never leaks into the next call, and the
failing rank's traceback is raised in the caller. A rank function may attach a
short, picklable `report` to the exception it raises (the train launcher's
one-line failure); `RankError.reports` hands those to the caller by rank.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable


class RankError(RuntimeError):
    """A rank raised or died; the message carries the tracebacks.

    `reports`: the `report` attribute of each rank's exception, where it had one;
    `died`: exit codes of ranks whose process ended; `blocked`: ranks still running
    (usually waiting in a collective the failed rank never joined).
    """

    def __init__(self, message: str, reports: dict[int, Any] | None = None,
                 died: dict[int, int | None] | None = None, blocked: list[int] | None = None,
                 tracebacks: dict[int, str] | None = None):
        super().__init__(message)
        self.reports = dict(reports or {})
        self.died = dict(died or {})
        self.blocked = list(blocked or [])
        self.tracebacks = dict(tracebacks or {})


class RankTimeout(RuntimeError):
    """A call did not finish in time (a hang, usually a mismatched collective)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Task:
    fn: Callable
    args: tuple
    kwargs: dict


def _worker(rank: int, world: int, port: int, backend: str, threads: int,
            sys_path: list[str], tasks: "mp.Queue", results: "mp.Queue",
            pg_timeout_s: float | None = None) -> None:
    sys.path[:] = sys_path
    for stream in (sys.stdout, sys.stderr):  # line by line, also into pipes and files
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # the standard launcher env, so libraries that read it (DeepSpeed) see a normal rank
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        import datetime
        kw = {"timeout": datetime.timedelta(seconds=pg_timeout_s)} if pg_timeout_s else {}
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world, **kw)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
    except Exception:  # pragma: no cover - rendezvous failure
        results.put((rank, False, (traceback.format_exc(), None)))
        return
    results.put((rank, True, "ready"))
    while True:
        payload = tasks.get()
        if payload is None:
            break
        try:
            task: _Task = pickle.loads(payload)
            out = task.fn(*task.args, **task.kwargs)
            results.put((rank, True, pickle.dumps(out)))
        except BaseException as e:
            report = getattr(e, "report", None)
            try:
                pickle.dumps(report)
            except Exception:
                report = None
            results.put((rank, False, (traceback.format_exc(), report)))
    dist.destroy_process_group()


class RankPool:
    """W worker processes with an initialised default process group."""

    def __init__(self, world: int, backend: str = "gloo", threads: int = 1,
                 start_timeout: float = 120.0, pg_timeout_s: float | None = None):
        if world < 1:
            raise ValueError(f"world size must be >= 1, got {world}")
        self.world = world
        self.backend = backend
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world)]
        port = free_port()
        self._procs = [
            ctx.Process(target=_worker, daemon=True,
                        args=(r, world, port, backend, threads, list(sys.path),
                              self._tasks[r], self._results, pg_timeout_s))
            for r in range(world)
        ]
        for p in self._procs:
            p.start()
        self._collect(start_timeout, what="start-up")

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def _collect(self, timeout: float, what: str) -> list[Any]:
        deadline = time.monotonic() + timeout
        got: dict[int, Any] = {}
        errors: dict[int, str] = {}
        reports: dict[int, Any] = {}
        while len(got) + len(errors) < self.world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(self.world)) - set(got) - set(errors))
                self.close(force=True)
                if errors:
                    raise RankError(f"{what} failed on rank(s) {sorted(errors)} "
                                    f"(ranks {missing} then blocked)\n" + self._format(errors),
                                    reports=reports, blocked=missing, tracebacks=errors)
                raise RankTimeout(f"{what} timed out after {timeout:.0f}s; "
                                  f"ranks {missing} did not finish")
            try:
                rank, ok, payload = self._results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs)
                        if not p.is_alive() and r not in got and r not in errors]
                if dead:
                    codes = {r: self._procs[r].exitcode for r in dead}
                    self.close(force=True)
                    raise RankError(f"{what}: rank(s) {dead} died "
                                    f"(exit codes {[codes[r] for r in dead]})"
                                    + ("\n" + self._format(errors) if errors else ""),
                                    reports=reports, died=codes, tracebacks=errors)
                continue
            if ok:
                got[rank] = payload
            else:
                errors[rank], report = payload
                if report is not None:
                    reports[rank] = report
                # Give the other ranks a moment to report, then fail fast: they
                # are likely blocked in a collective the failed rank never joined.
                deadline = min(deadline, time.monotonic() + 5.0)
        if errors:
            self.close(force=True)
            raise RankError(f"{what} failed on rank(s) {sorted(errors)}\n" + self._format(errors),
                            reports=reports, tracebacks=errors)
        return [got[r] for r in range(self.world)]

    @staticmethod
    def _format(errors: dict[int, str]) -> str:
        return "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))

    def run(self, fn: Callable, *args, timeout: float = 120.0, **kwargs) -> list[Any]:
        """Run fn(*args, **kwargs) on every rank; return the per-rank results."""
        if not self.alive:
            raise RankError("pool is closed")
        payload = pickle.dumps(_Task(fn, args, kwargs))
        for q in self._tasks:
            q.put(payload)
        raw = self._collect(timeout, what=getattr(fn, "__name__", "task"))
        return [pickle.loads(r) for r in raw]

    def close(self, force: bool = False) -> None:
        for p, q in zip(self._procs, self._tasks):
            if p.is_alive() and not force:
                q.put(None)
        for p in self._procs:
            p.join(timeout=0 if force else 5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def run_on_ranks(fn: Callable, world: int, *args, backend: str = "gloo",
                 timeout: float = 120.0, threads: int = 1, **kwargs) -> list[Any]:
    """One-shot: start W ranks, run fn, shut down."""
    pool = RankPool(world, backend=backend, threads=threads)
    try:
        return pool.run(fn, *args, timeout=timeout, **kwargs)
    finally:
        pool.close()
