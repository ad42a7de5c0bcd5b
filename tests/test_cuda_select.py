"""The CUDA kernel self-test's logic, on CPU with stand-in kernels (tests/fake_kernels.py): a wrong
kernel, one that kills its process and one that raises are refused with the reason; the fastest
exact one is chosen; verdicts are cached; bad names are refused before any kernel runs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from distattn.kernels import cuda_select
from distattn.kernels.backends import select_backend

HERE = str(Path(__file__).parent)
CPU = "distattn.kernels.backends:CpuFlash"


def test_probe_in_process_refuses_a_raising_kernel_and_passes_the_cpu_kernel():
    bad = cuda_select.probe("fake_kernels:Raises", "fp32", 32, "cpu", time_it=False)
    assert not bad.exact and "failed at 64x203" in bad.why and "rectangles are not supported" in bad.why
    good = cuda_select.probe(CPU, "bf16", 64, "cpu")
    assert good.exact and good.ms > 0 and good.error < cuda_select.TOLERANCE["bf16"], good


def test_self_test_in_child_processes_picks_the_fastest_exact_kernel(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("DISTATTN_CACHE_DIR", str(tmp_path))
    cands = ("fake_kernels:Wrong", "fake_kernels:Crash", "fake_kernels:SlowExact", CPU)
    choice, verdicts = cuda_select.self_test("fp32", 32, "cpu", cands)
    why = {v.name: v for v in verdicts}
    assert choice == CPU
    assert not why["fake_kernels:Wrong"].exact and why["fake_kernels:Wrong"].why.startswith("out off by")
    assert not why["fake_kernels:Crash"].exact and "the test process died" in why["fake_kernels:Crash"].why
    assert why["fake_kernels:SlowExact"].exact and why["fake_kernels:SlowExact"].ms > why[CPU].ms
    assert "refused: out off by" in cuda_select.describe(choice, verdicts)
    # the verdicts are cached: a second self-test starts no process
    monkeypatch.setattr(cuda_select, "probe_in_child", lambda *a, **k: pytest.fail("not cached"))
    assert cuda_select.self_test("fp32", 32, "cpu", cands)[0] == CPU
    assert (tmp_path / "cuda_kernels.json").exists()


def test_no_exact_kernel_falls_back():
    v = [cuda_select.Verdict("cudnn", False, "dq off"), cuda_select.Verdict("flash-attn", False, "unavailable")]
    assert cuda_select.choose(v) == "cuda-sdpa"


def test_bad_kernel_names_are_refused_before_anything_runs(monkeypatch):
    with pytest.raises(ValueError, match="use one of auto, cudnn, cuda-sdpa, flash-attn"):
        select_backend(torch.device("cuda"), prefer="cudnn2")
    monkeypatch.setenv("DISTATTN_CUDA_KERNEL", "fast")
    with pytest.raises(ValueError, match="DISTATTN_CUDA_KERNEL='fast'"):
        select_backend(torch.device("cuda"), dtype=torch.bfloat16, head_dim=128)
    with pytest.raises(ValueError, match="unknown CUDA kernel"):
        cuda_select.make_backend("cudnn2")
