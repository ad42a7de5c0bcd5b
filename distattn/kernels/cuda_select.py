"""Which CUDA attention kernel runs: the fastest one that passes an exactness self-test.

No kernel is trusted by name. cuDNN's attention ran about 2x torch's flash kernel on an H100,
yet in torch 2.11 its bf16 backward failed our reference check on odd lengths and crashed the
process on other shapes. So per (device name, torch version, dtype, head_dim) each candidate
(`cudnn`, `cuda-sdpa`, and `flash-attn` when installed) runs forward and backward on
odd-length causal squares, a rectangle and GQA heads in a CHILD process, where a crash costs
nothing; its outputs, lse and gradients are compared with an fp64 reference within the
dtype's tolerance, and the exact ones are timed on one causal block of `TIME_TOKENS`
tokens. The fastest exact candidate wins; `cuda-sdpa` (torch's flash / memory-efficient
kernels) is the fallback. Verdicts are cached in `~/.cache/distattn/cuda_kernels.json`
(`DISTATTN_CACHE_DIR` moves it), and the choice is logged once per process.

`DISTATTN_CUDA_KERNEL=auto|cudnn|cuda-sdpa|flash-attn` overrides the choice (no self-test).

    python -m distattn.kernels.cuda_select --dtype bf16 --head-dim 128   # run it, print verdicts
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CANDIDATES = ("cudnn", "cuda-sdpa", "flash-attn")
FALLBACK = "cuda-sdpa"
TIME_TOKENS = 4096
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# max |error| / max |reference| of out, lse and every gradient; bf16 and fp16 at their resolution
TOLERANCE = {"bf16": 2e-2, "fp16": 4e-3, "fp32": 1e-4}
# (q tokens, k tokens, causal, heads, kv heads): odd causal squares, a rectangle, GQA
PROBES = ((77, 77, True, 4, 4), (131, 131, True, 8, 2), (64, 203, False, 4, 2), (1, 1, True, 2, 2))


@dataclass
class Verdict:
    name: str
    exact: bool
    why: str = ""
    error: float = 0.0       # the largest relative error over the probes
    ms: float | None = None  # one causal block of TIME_TOKENS tokens, forward + backward


def make_backend(name: str):
    """A kernel backend by candidate name, or by "module:Class" (tests use their own)."""
    if ":" in name:
        mod, cls = name.split(":", 1)
        return getattr(importlib.import_module(mod), cls)()
    from distattn.kernels import backends
    if name == "cudnn":
        return backends.CudnnSdpa()
    if name == "cuda-sdpa":
        return backends.CudaSdpa()
    if name == "flash-attn":
        return backends.FlashAttn()
    raise ValueError(f"unknown CUDA kernel {name!r}; choose one of {', '.join(CANDIDATES)}")


def _heads_view(x: torch.Tensor) -> torch.Tensor:
    """[T, H, D] -> the [1, H, T, D] view the block planner hands a backend."""
    return x.transpose(0, 1).unsqueeze(0)


def _reference(q, k, v, causal: bool, scale: float, dout, dtype=torch.float64):
    """(out, lse, dq, dk, dv) of [1, H, T, D] inputs by plain math in `dtype`; GQA by repeating
    K/V heads. In fp64 it is the truth; in the inputs' dtype, the error any kernel is allowed."""
    rep = q.shape[1] // k.shape[1]
    q64, k64, v64 = (x.detach().to(dtype).requires_grad_(True) for x in (q, k, v))
    ke, ve = k64.repeat_interleave(rep, 1), v64.repeat_interleave(rep, 1)
    s = q64 @ ke.transpose(-1, -2) * scale
    if causal:
        tq, tk = s.shape[-2:]
        s = s.masked_fill(torch.ones(tq, tk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ ve
    out.backward(dout.to(dtype))
    return out.detach(), lse.detach(), q64.grad, k64.grad, v64.grad


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |error| over max |truth|; a truth near zero (one key's dq) is judged absolutely."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-2))


def probe(name: str, dtype: str, head_dim: int, device: str = "cuda", time_it: bool = True) -> Verdict:
    """Run one candidate in this process: exactness over PROBES, then its time."""
    try:
        be = make_backend(name)
    except Exception as e:  # not installed, or no such kernel in this torch
        return Verdict(name, False, f"unavailable: {type(e).__name__}: {e}")
    dt, dev, worst = DTYPES[dtype], torch.device(device), 0.0
    gen = torch.Generator().manual_seed(0)
    scale = head_dim ** -0.5
    for tq, tk, causal, h, hkv in PROBES:
        q, dout = (torch.randn(tq, h, head_dim, generator=gen).to(dev, dt) for _ in range(2))
        k, v = (torch.randn(tk, hkv, head_dim, generator=gen).to(dev, dt) for _ in range(2))
        qv, kv_, vv, dv_ = (_heads_view(x) for x in (q, k, v, dout))
        want = _reference(qv, kv_, vv, causal, scale, dv_)
        # each quantity's tolerance: the dtype's, or twice plain math's error in the same dtype
        plain = _reference(qv, kv_, vv, causal, scale, dv_, dt)
        tol = [max(TOLERANCE[dtype], 2 * _rel(p, w)) for p, w in zip(plain, want)]
        try:
            out, lse = be.forward(qv, kv_, vv, causal, scale)
            grads = be.backward(dv_, qv, kv_, vv, out.to(dt), lse, causal, scale)
        except Exception as e:
            return Verdict(name, False, f"failed at {tq}x{tk} causal={causal} heads {h}/{hkv}: "
                                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        got = (out, lse.reshape(want[1].shape), *grads)
        errs = [_rel(g, w) for g, w in zip(got, want)]
        if not all(e == e for e in errs):  # NaN
            return Verdict(name, False, f"NaN at {tq}x{tk} causal={causal}", float("nan"))
        worst = max(worst, *errs)
        bad = [i for i, (e, t) in enumerate(zip(errs, tol)) if e > t]
        if bad:
            i = bad[0]
            return Verdict(name, False, f"{('out', 'lse', 'dq', 'dk', 'dv')[i]} off by {errs[i]:.2e} "
                                        f"(relative; tolerance {tol[i]:.1e}) at {tq}x{tk} causal={causal} "
                                        f"heads {h}/{hkv}", worst)
    return Verdict(name, True, "exact", worst, _time(be, dt, dev, head_dim) if time_it else None)


def _time(be, dt, dev, head_dim: int, heads: int = 8, reps: int = 3) -> float:
    """Milliseconds of forward + backward of one causal block of TIME_TOKENS tokens."""
    t = TIME_TOKENS if dev.type == "cuda" else 256
    q, k, v, do = (_heads_view(torch.randn(t, heads, head_dim, device=dev, dtype=dt)) for _ in range(4))
    scale = head_dim ** -0.5

    def step():
        o, l = be.forward(q, k, v, True, scale)
        be.backward(do, q, k, v, o.to(dt), l, True, scale)

    step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return (time.perf_counter() - t0) / reps * 1e3


def probe_in_child(name: str, dtype: str, head_dim: int, device: str = "cuda",
                   timeout: float = 180.0) -> Verdict:
    """`probe` in a fresh interpreter: a kernel that crashes or hangs only fails its own test."""
    cmd = [sys.executable, "-m", "distattn.kernels.cuda_select", "--probe", name, "--dtype", dtype,
           "--head-dim", str(head_dim), "--device", device]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Verdict(name, False, f"no answer within {timeout:.0f} s")
    for line in reversed(res.stdout.splitlines()):
        if line.startswith("{"):
            return Verdict(**json.loads(line))
    tail = (res.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return Verdict(name, False, f"the test process died (exit {res.returncode}): {tail}")


def choose(verdicts: list[Verdict], fallback: str = FALLBACK) -> str:
    """The fastest exact candidate; `fallback` when none passed."""
    exact = [v for v in verdicts if v.exact and v.ms is not None]
    return min(exact, key=lambda v: v.ms).name if exact else fallback


def _cache_file() -> Path:
    root = os.environ.get("DISTATTN_CACHE_DIR") or os.path.join(Path.home(), ".cache", "distattn")
    return Path(root) / "cuda_kernels.json"


def _cache_key(device: str, dtype: str, head_dim: int) -> str:
    dev = torch.device(device)
    what = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    return f"{what}|torch {torch.__version__}|{dtype}|d{head_dim}"


def self_test(dtype: str, head_dim: int, device: str = "cuda", candidates=CANDIDATES,
              use_cache: bool = True) -> tuple[str, list[Verdict]]:
    """The chosen kernel and every candidate's verdict, from the cache when it has them."""
    key = _cache_key(device, dtype, head_dim) + "|" + ",".join(candidates)
    path = _cache_file()
    cache = {}
    if use_cache and path.exists():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
    if key in cache:
        verdicts = [Verdict(**v) for v in cache[key]]
    else:
        verdicts = [probe_in_child(c, dtype, head_dim, device) for c in candidates]
        if use_cache:
            cache[key] = [asdict(v) for v in verdicts]
            try:  # atomic: ranks of one host may write at once
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(cache, indent=1))
                tmp.replace(path)
            except OSError:
                pass
    return choose(verdicts), verdicts


def describe(choice: str, verdicts: list[Verdict]) -> str:
    parts = [f"{v.name} {'%.2f ms' % v.ms if v.exact else 'refused: ' + v.why}" for v in verdicts]
    return f"distattn: CUDA attention kernel {choice} ({'; '.join(parts)})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", default=None, help="test one candidate in this process, print JSON")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--no-cache", action="store_true", help="test again, do not read or write the cache")
    a = ap.parse_args(argv)
    if a.probe:
        print(json.dumps(asdict(probe(a.probe, a.dtype, a.head_dim, a.device))), flush=True)
        return 0
    choice, verdicts = self_test(a.dtype, a.head_dim, a.device, tuple(a.candidates.split(",")),
                                 use_cache=not a.no_cache)
    print(describe(choice, verdicts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
