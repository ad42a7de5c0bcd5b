"""Shared by tools/gpu_check.py's parts: shapes, budgets, tolerances and small helpers."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):  # distattn from this checkout; kernel_bench beside this file
    if p not in sys.path:
        sys.path.insert(0, p)

PARTS = ("env", "exact", "kernels", "train", "delta")
# seconds per part on the full run, and for all parts together (tools/gpu_check.sh adds the install)
BUDGET_S = {"env": 45, "exact": 120, "kernels": 90, "train": 90, "delta": 90}
TOTAL_BUDGET_S = 400
QUICK_BUDGET_S = 300  # the CPU dry run takes seconds; this only stops a hang
CHILD_GRACE_S = 30  # a child process past its budget by this much is killed

# Shapes. "full" is the lent-GPU run; "quick" the CPU dry run.
SHAPES = {
    "full": dict(
        softmax={"docs_gqa": (2011, 8, 2, 128, [0, 3, 900, 901, 1500, 2011]),
                 "one_doc": (1024, 4, 4, 128, None)},
        hetero=dict(n=2048, h=8, hkv=2, d=128, cu=[0, 5, 1300, 2048],
                    opts=dict(block=64, local_blocks=2, stride=4, gqa_pattern="q")),
        linear=dict(n=1003, h=8, hkv=2, d=64, dv=64, cu=[0, 1, 400, 1003]),
        delta=dict(n=200, h=2, dk=32, dv=32, cu=[0, 70, 71, 200]),
        kernels=dict(n=16384, heads=32, kv_heads=8, head_dim=128, iters=10),
        train=dict(steps=20, overrides=[]),
        delta_bench=dict(n=8192, h=16, dk=128, dv=128, iters=3, dtype="bf16"),
    ),
    "quick": dict(
        softmax={"docs_gqa": (203, 8, 2, 16, [0, 3, 120, 121, 170, 203])},
        hetero=dict(n=203, h=8, hkv=2, d=16, cu=[0, 3, 120, 203],
                    opts=dict(block=32, local_blocks=1, stride=2, gqa_pattern="q")),
        linear=dict(n=203, h=4, hkv=2, d=16, dv=8, cu=[0, 3, 120, 203]),
        delta=dict(n=48, h=2, dk=8, dv=8, cu=[0, 17, 30, 48]),
        kernels=dict(n=256, heads=4, kv_heads=2, head_dim=32, iters=1),
        train=dict(steps=2, overrides=["data.seq_len=128"]),
        delta_bench=dict(n=32, h=2, dk=16, dv=16, iters=0, dtype="fp32"),
    ),
}

# Tolerances, as the CPU tests use them (tests/test_schemes.py, test_lasp.py, test_delta_cp.py).
# bf16 softmax at these lengths and head dims is judged as flash-attn's tests judge it: against the
# fp32 reference, the mean error may be at most twice that of plain attention computed in bf16
# (bf16 matmuls, fp32 softmax, probabilities rounded to bf16), and no error may pass 5% of the
# largest reference value; the CPU tests' elementwise bf16 tolerance is recorded beside it.
SOFTMAX_TOL = {"fp32": dict(atol=3e-5, rtol=3e-4), "bf16": dict(atol=2e-2, rtol=2e-2)}
BF16_MEAN_FACTOR = 2.0
BF16_REL_MAX = 5e-2
LINEAR_TOL = {"fp32": 2e-6, "bf16": 1e-2}   # max |err| / max |ref|
DELTA_TOL = {"fp32": 1e-4, "bf16": 1e-2}    # ||err|| / ||ref||
SOFTMAX_SPECS = [  # (scheme, options); every other registered softmax scheme runs with defaults
    ("ring", {}),
    ("ring", {"layout_name": "doc_zigzag"}),
    ("ring", {"layout_name": "contiguous", "dkv_dtype": "input"}),
    ("allgather", {}),
    ("ulysses", {}),
    ("usp", {}),
    ("cad", {}),
    ("local", {}),
]
LINEAR_SCHEMES = ("lasp2", "lasp1", "local")
DELTA_RULES = ("gated_delta", "kda")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]


def _dtype(name: str):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


class Budget:
    """A part's deadline (time.monotonic); cases past it are recorded as skipped."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def spent(self) -> bool:
        return time.monotonic() > self.deadline

    def left(self) -> float:
        return self.deadline - time.monotonic()


_PARTIAL: dict = {"path": None}  # where a child process keeps its results so far


def note_progress(**fields) -> None:
    """Save a part's results so far (child processes only): a part killed at its time limit
    still reports the cases it finished."""
    path = _PARTIAL["path"]
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(fields, default=str))
        tmp.replace(path)


@contextlib.contextmanager
def world_of_one(backend: str = "gloo"):
    """A default process group of one rank (an in-memory store: no port), unless one exists."""
    import torch.distributed as dist
    if dist.is_initialized():
        yield
        return
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _env(name: str, value: str):
    """os.environ[name] = value inside the block (distattn reads its kernel choices per call)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


