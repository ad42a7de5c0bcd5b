"""Throughput of the block-attention kernel path (fwd+bwd) on one device.

Usage: python tools/kernel_bench.py [--device cuda] [--n 16384] [--dtype bf16]
Reports TFLOP/s counting 4*N^2*H*D/2 (causal) forward FLOPs and 2.5x that for backward,
for our planner+kernel path and, side by side, torch SDPA on the same shapes.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from distattn.kernels import block_backward, block_forward, plan_calls
from distattn.layout import get_layout


def timeit(fn, device, iters):
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    dev = torch.device(a.device)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    n, h, hkv, d = a.n, a.heads, a.kv_heads, a.head_dim
    q = torch.randn(n, h, d, device=dev, dtype=dt)
    k = torch.randn(n, hkv, d, device=dev, dtype=dt)
    v = torch.randn(n, hkv, d, device=dev, dtype=dt)
    do = torch.randn(n, h, d, device=dev, dtype=dt)
    scale = d ** -0.5
    flops_f = 4 * n * n * h * d / 2
    for layout in ("contiguous", "zigzag"):
        lay = get_layout(layout, n, 1 if layout == "contiguous" else 2)
        # zigzag: one rank's view of W=2 (half the tokens): time its local causal block
        runs = lay.runs(0)
        idx = lay.indices(0).to(dev)
        ql, kl, vl, dl = q[idx], k[idx], v[idx], do[idx]
        calls = plan_calls(runs, runs, True)
        pairs = sum(c.pairs for c in calls)

        def fwd():
            return block_forward(ql, kl, vl, calls, scale)

        def fwdbwd():
            o, l = block_forward(ql, kl, vl, calls, scale)
            block_backward(dl, ql, kl, vl, o.to(dt), l, calls, scale)

        tf = timeit(fwd, dev, a.iters)
        tb = timeit(fwdbwd, dev, a.iters)
        fl = 4 * pairs * h * d
        print(f"distattn {layout:10s} tokens={ql.shape[0]:6d} fwd {tf*1e3:8.2f} ms {fl/tf/1e12:7.1f} TFLOP/s   "
              f"fwd+bwd {tb*1e3:8.2f} ms {3.5*fl/tb/1e12:7.1f} TFLOP/s")
    qb, kb, vb, dob = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v, do))
    kb, vb = (x.repeat_interleave(h // hkv, dim=1) for x in (kb, vb))

    def sdpa_fb():
        a_, b_, c_ = (x.detach().requires_grad_(True) for x in (qb, kb, vb))
        F.scaled_dot_product_attention(a_, b_, c_, is_causal=True).backward(dob)

    ts = timeit(lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True), dev, a.iters)
    tsb = timeit(sdpa_fb, dev, a.iters)
    print(f"torch SDPA  full       tokens={n:6d} fwd {ts*1e3:8.2f} ms {flops_f/ts/1e12:7.1f} TFLOP/s   "
          f"fwd+bwd {tsb*1e3:8.2f} ms {3.5*flops_f/tsb/1e12:7.1f} TFLOP/s")


if __name__ == "__main__":
    main()
