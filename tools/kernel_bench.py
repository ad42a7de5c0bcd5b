"""Throughput of the block-attention kernel path next to torch SDPA, on one device (fwd and fwd+bwd).

Usage: python tools/kernel_bench.py [--device cuda] [--n 16384] [--dtype bf16] [--json PATH]

Rows, all causal over one document of N tokens, H query heads, Hkv KV heads, head dim D:
- `sdpa-<kernel>`: F.scaled_dot_product_attention over the whole sequence inside
  torch.nn.attention.sdpa_kernel(<kernel>), for flash, efficient, cudnn (and math on request:
  it holds [H, N, N] scores); K/V are expanded to H heads first, as every SDPA kernel accepts that.
  A kernel SDPA refuses for this device, dtype or shape is reported as unavailable.
- `block <layout>/<backend>`: our planner + block kernels (`plan_calls`, `block_forward`,
  `block_backward`) on one rank's tokens: `contiguous` at W=1 is one causal block of N tokens,
  `zigzag` at W=2 is rank 0's half (chunks 0 and 3 of 4, N/2 tokens, the visible pairs only).
  The backend is the one `select_backend` picks (`auto`) or one named with --block-backends.

TFLOP/s count 4 * pairs * H * D forward FLOPs, pairs being the visible (query, key) pairs
(N(N+1)/2 for one causal block), and 2.5x that for the backward (3.5x for fwd+bwd).
`run_bench` returns the rows as dicts; tools/gpu_check.py records them in its JSON file.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from distattn.kernels import block_backward, block_forward, plan_calls
from distattn.kernels.backends import select_backend
from distattn.layout import get_layout

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_KERNELS = ("flash", "efficient", "cudnn", "math")
LAYOUTS = (("contiguous", 1), ("zigzag", 2))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, iters: int, warmup: int = 2) -> float:
    """Seconds per call: `warmup` untimed calls, then the mean of `iters` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def make_inputs(n: int, h: int, hkv: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """q, dout [n, h, d] and k, v [n, hkv, d], standard normal, made on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(n, h, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(n, hkv, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(n, hkv, d, device=device, dtype=dtype, generator=g)
    do = torch.randn(n, h, d, device=device, dtype=dtype, generator=g)
    return q, k, v, do


def _rates(row: dict, flops_fwd: float, t_fwd: float, t_fb: float) -> dict:
    row.update(fwd_ms=t_fwd * 1e3, fwd_tflops=flops_fwd / t_fwd / 1e12,
               fwdbwd_ms=t_fb * 1e3, fwdbwd_tflops=3.5 * flops_fwd / t_fb / 1e12)
    return row


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def block_row(q, k, v, do, layout: str, world: int, iters: int, backend: str = "auto") -> dict:
    """Our block path on rank 0's tokens of `layout` over `world` ranks (a dict row)."""
    dev, dt = q.device, q.dtype
    n, h, d = q.shape
    row = {"name": f"block {layout}/{backend}", "kind": "block", "layout": layout, "world": world,
           "backend": backend}
    try:
        be = select_backend(dev, prefer=backend, dtype=dt, head_dim=d)  # auto: the self-tested choice
        row["backend_name"] = getattr(be, "name", type(be).__name__)
        lay = get_layout(layout, n, world)
        runs = lay.runs(0)
        idx = lay.indices(0).to(dev)
        ql, kl, vl, dl = q[idx], k[idx], v[idx], do[idx]
        calls = plan_calls(runs, runs, True)
        pairs = sum(c.pairs for c in calls)
        scale = d ** -0.5
        row.update(tokens=int(ql.shape[0]), calls=len(calls), pairs=int(pairs))

        def fwd():
            return block_forward(ql, kl, vl, calls, scale, backend=be)

        def fwdbwd():
            o, lse = block_forward(ql, kl, vl, calls, scale, backend=be)
            block_backward(dl, ql, kl, vl, o.to(dt), lse, calls, scale, backend=be)

        _rates(row, 4.0 * pairs * h * d, timeit(fwd, dev, iters), timeit(fwdbwd, dev, iters))
        row["status"] = "ok"
    except Exception as e:  # a backend missing here, or failing on this device: recorded, not fatal
        row.update(status="unavailable" if isinstance(e, (ImportError, ValueError)) else "error",
                   error=_short(e))
    return row


def sdpa_row(q, k, v, do, kernel: str, iters: int) -> dict:
    """F.scaled_dot_product_attention (causal, whole sequence) under one SDPA kernel (a dict row)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    which = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[kernel]
    dev = q.device
    n, h, d = q.shape
    hkv = k.shape[1]
    row = {"name": f"sdpa-{kernel}", "kind": "sdpa", "kernel": kernel, "tokens": n,
           "pairs": n * (n + 1) // 2}
    qb, kb, vb, dob = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v, do))  # [1, H, N, D] views
    kb, vb = (x.repeat_interleave(h // hkv, dim=1) for x in (kb, vb))

    def fwd():
        return F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)

    def fwdbwd():
        a, b, c = (x.detach().requires_grad_(True) for x in (qb, kb, vb))
        F.scaled_dot_product_attention(a, b, c, is_causal=True).backward(dob)

    try:
        with sdpa_kernel([which]):
            _rates(row, 4.0 * row["pairs"] * h * d, timeit(fwd, dev, iters), timeit(fwdbwd, dev, iters))
        row["status"] = "ok"
    except RuntimeError as e:  # "No available kernel": this kernel does not run this case here
        row.update(status="unavailable", error=_short(e))
    except Exception as e:
        row.update(status="error", error=_short(e))
    return row


def run_bench(device, n: int = 16384, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
              dtype: str = "bf16", iters: int = 10, sdpa=("flash", "efficient", "cudnn"),
              block_backends=("auto",), layouts=LAYOUTS, deadline: float | None = None,
              on_row=None) -> list[dict]:
    """Every row, SDPA first; rows past `deadline` (time.monotonic) are marked skipped."""
    dev = torch.device(device)
    q, k, v, do = make_inputs(n, heads, kv_heads, head_dim, DTYPES[dtype], dev)
    jobs = [lambda s=s: sdpa_row(q, k, v, do, s, iters) for s in sdpa]
    names = [f"sdpa-{s}" for s in sdpa]
    for be in block_backends:
        for layout, world in layouts:
            jobs.append(lambda be=be, layout=layout, world=world: block_row(q, k, v, do, layout, world, iters, be))
            names.append(f"block {layout}/{be}")
    rows = []
    for name, job in zip(names, jobs):
        if deadline is not None and time.monotonic() > deadline:
            row = {"name": name, "status": "skipped", "error": "time budget spent"}
        else:
            row = job()
        row.update(n=n, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, device=str(dev))
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_row(r: dict) -> str:
    head = f"{r['name']:28s}"
    if r.get("status") != "ok":
        return f"{head} {r.get('status')}: {r.get('error', '')}"
    def rate(x):  # one decimal at GPU rates, three significant digits below 10 (CPU, tiny shapes)
        return f"{x:7.1f}" if x >= 10 else f"{x:7.3g}"
    return (f"{head} tokens={r['tokens']:6d} calls={r.get('calls', 1):2d} fwd {r['fwd_ms']:8.2f} ms "
            f"{rate(r['fwd_tflops'])} TFLOP/s   fwd+bwd {r['fwdbwd_ms']:8.2f} ms {rate(r['fwdbwd_tflops'])} TFLOP/s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--sdpa", default="flash,efficient,cudnn",
                    help=f"comma-separated SDPA kernels of {', '.join(SDPA_KERNELS)} ('' for none)")
    ap.add_argument("--block-backends", default="auto",
                    help="comma-separated backends for our block path: auto (select_backend's pick) or names "
                         "select_backend accepts, e.g. cudnn,cuda-sdpa,flash-attn")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = ap.parse_args(argv)
    sdpa = [s for s in a.sdpa.split(",") if s]
    bad = [s for s in sdpa if s not in SDPA_KERNELS]
    if bad:
        ap.error(f"--sdpa: unknown kernel(s) {bad}; choose from {', '.join(SDPA_KERNELS)}")
    rows = run_bench(a.device, a.n, a.heads, a.kv_heads, a.head_dim, a.dtype, a.iters, sdpa,
                     [b for b in a.block_backends.split(",") if b], on_row=lambda r: print(format_row(r)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
