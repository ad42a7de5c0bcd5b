"""The checks a lent GPU machine runs in one go, recorded in one JSON file.

Usage: python tools/gpu_check.py [--device cuda|cpu] [--quick] [--out PATH] [--parts env,exact,...]
Normally started by tools/gpu_check.sh, which installs the carried wheelhouse first.

Parts, in order; each has a time budget, and a part that fails, raises or runs out of time is
recorded as such while the next part still runs:
  env      the machine: torch, the device, the optional kernels (flash-attn, fla, triton) and which
           attention, delta-rule and linear kernels distattn picks there
  exact    every registered scheme at W=1 (a gloo world of one) against the dense reference, fp32
           and bf16, packed documents and GQA: the output and every input gradient; softmax schemes
           through distattn.attention (hetero against its per-head mask), lasp2/lasp1/local
           through distattn.linear_attention with a per-head decay and with rule=gated_delta / kda
  kernels  TFLOP/s of F.scaled_dot_product_attention per SDPA kernel (flash, efficient, cudnn) next
           to our block path (one causal block; a zigzag half-block), bf16, head dim 128, 16K
           tokens (tools/kernel_bench.py)
  train    the default model shape (configs/default.yaml) trained in bf16 for 20 steps on this one
           device, in-process in a world of one: loss first and last, tokens/s
  delta    the delta-rule kernels (gated_delta, kda) and decay linear attention on the device,
           ours and flash-linear-attention's when installed: times and how far fla is from ours

`--quick` shrinks every shape to seconds on a CPU (the dry run that proves the script).
On CUDA each part runs in a child process (`--isolate auto`), so a crash or hang in one
part cannot take the others down; the JSON file is rewritten after every part.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
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


# ----------------------------------------------------------------------------- env

def _version(dist_name: str):
    from importlib import metadata
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def _importable(module: str):
    """True, or the import error in one line."""
    try:
        __import__(module)
        return True
    except Exception as e:
        return _short(e)


def part_env(args, budget: Budget) -> dict:
    import torch
    dev = torch.device(args.device)
    out = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "device": str(dev), "cpu_count": os.cpu_count(),
           "env": {k: v for k, v in os.environ.items() if k.startswith("DISTATTN_")}}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        out.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                   gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   sdpa_enabled={"flash": torch.backends.cuda.flash_sdp_enabled(),
                                 "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                 "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                                 "math": torch.backends.cuda.math_sdp_enabled()})
    out["packages"] = {name: _version(name) for name in
                       ("megatron-core", "pydantic", "pydantic-core", "numpy", "pyyaml", "flash-attn",
                        "fla-core", "flash-linear-attention", "triton", "ring-flash-attn")}
    out["importable"] = {m: _importable(m) for m in ("megatron.core", "pydantic", "flash_attn", "fla", "triton")}
    picks = {}
    try:
        from distattn.kernels.backends import select_backend
        picks["attention"] = getattr(select_backend(dev), "name", None)
    except Exception as e:
        picks["attention"] = _short(e)
    try:
        from distattn.kernels.delta_backends import select_delta_kernel
        picks["delta_rule"] = select_delta_kernel(dev)
    except Exception as e:
        picks["delta_rule"] = _short(e)
    try:
        from distattn.kernels.linear_fla import use_fla
        picks["linear"] = "fla" if use_fla(dev) else "torch"
    except Exception as e:
        picks["linear"] = _short(e)
    out["kernels_picked"] = picks
    out["status"] = "ok"
    return out


# ----------------------------------------------------------------------------- exact

def _compare(got, ref, metric: str, tol) -> dict:
    """Errors of `got` against `ref` (both moved to CPU fp64) and whether they are within `tol`.

    metric "close": |got - ref| <= atol + rtol |ref| elementwise (tol a dict); "bf16": mean |err| at
    most BF16_MEAN_FACTOR x that of tol["baseline"] and max |err| / max |ref| <= BF16_REL_MAX;
    "max": max |err| / max |ref| < tol; "norm": ||err|| / ||ref|| < tol.
    """
    import torch
    g, r = got.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    if g.shape != r.shape:
        return {"ok": False, "error": f"shape {tuple(g.shape)} != reference {tuple(r.shape)}"}
    err = (g - r).abs()
    top = float(r.abs().max()) if r.numel() else 0.0
    res = {"max_abs": float(err.max()) if err.numel() else 0.0,
           "rel_max": float(err.max() / max(top, 1e-30)) if err.numel() else 0.0,
           "rel_norm": float((g - r).norm() / r.norm().clamp_min(1e-30)),
           "finite": bool(torch.isfinite(g).all())}
    if metric in ("close", "bf16"):
        res["ok"] = res["finite"] and bool((err <= tol["atol"] + tol["rtol"] * r.abs()).all())
        if metric == "bf16":  # tol["baseline"]: the bf16 dense attention's result
            base = (tol["baseline"].detach().to("cpu", torch.float64) - r).abs()
            res["mean_abs"] = float(err.mean())
            res["baseline_mean_abs"] = float(base.mean())
            res["baseline_max_abs"] = float(base.max())
            res["test_tol_ok"] = res["ok"]
            mean_ok = res["mean_abs"] <= BF16_MEAN_FACTOR * res["baseline_mean_abs"] + 1e-6 * top
            res["ok"] = res["finite"] and mean_ok and res["rel_max"] <= BF16_REL_MAX
    else:
        res["ok"] = res["finite"] and res["rel_max" if metric == "max" else "rel_norm"] < tol
    return res


def _softmax_inputs(n, h, hkv, d, dtype, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, m, d, generator=g).to(dtype) for m in (h, hkv, hkv, h))  # q, k, v, dout


def _reference_grads(fn, leaves, dout):
    """fn(*leaves) and the gradients of <fn, dout> in every leaf, on CPU."""
    import torch
    xs = [x.detach().clone().requires_grad_(True) for x in leaves]
    out = fn(*xs)
    grads = torch.autograd.grad(out, xs, dout.to(out.dtype))
    return [out.detach()] + list(grads)


def _bf16_dense(mask):
    """Plain attention as a bf16 program would compute it (bf16 matmuls with fp32 accumulation,
    fp32 softmax, probabilities rounded to the input dtype): the yardstick for bf16 errors.
    `mask` is [T, T] or per head [H, T, T]."""
    import torch

    def fn(q, k, v):
        h, hkv = q.shape[1], k.shape[1]
        k, v = (x.repeat_interleave(h // hkv, dim=1) for x in (k, v))
        s = torch.einsum("thd,shd->hts", q, k) * q.shape[-1] ** -0.5
        p = torch.softmax(s.float().masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
        return torch.einsum("hts,shd->thd", p.to(q.dtype), v)
    return fn


def _softmax_errors(got, want, idx, dtn, baseline):
    """{tensor: errors} of out, dq, dk, dv against the reference rows `idx`."""
    names = ("out", "dq", "dk", "dv")
    if dtn == "bf16":
        return {t: _compare(g, w[idx], "bf16", {**SOFTMAX_TOL[dtn], "baseline": b[idx]})
                for t, g, w, b in zip(names, got, want, baseline)}
    return {t: _compare(g, w[idx], "close", SOFTMAX_TOL[dtn]) for t, g, w in zip(names, got, want)}


def _run_softmax(scheme, q, k, v, do, cu, dev):
    """This rank's output and q/k/v gradients through distattn.attention at W=1, on `dev`."""
    import distattn
    n = q.shape[0]
    loc = [distattn.shard(x, scheme=scheme, cu_seqlens=cu).to(dev) for x in (q, k, v, do)]
    leaves = [x.requires_grad_(True) for x in loc[:3]]
    out = distattn.attention(*leaves, scheme=scheme, cu_seqlens=cu, causal=True, n_tokens=n)
    out.backward(loc[3])
    _sync(dev)
    idx = scheme.layout(n, 1, cu).indices(0)
    return idx, [out.detach(), *(x.grad for x in leaves)], str(out.dtype)


def _linear_target(name: str, n: int, cu):
    """What linear_attention takes for scheme `name` and the token indices rank 0 holds at W=1."""
    import distattn
    scheme = "local" if name == "local" else distattn.get_scheme(name)
    lay = distattn.get_scheme(name).layout(n, 1, cu)  # "local": the softmax local's layout, the same tokens
    return scheme, lay.indices(0)


def _fla_kernels(dev, rule: str) -> tuple[str, ...]:
    """The kernels to check for `rule` on `dev`: ours, and flash-linear-attention's where installed."""
    if dev.type != "cuda":
        return ("torch",)
    if rule == "decay":
        from distattn.kernels.linear_fla import _fla_simple_gla
        have = _fla_simple_gla() is not None
    else:
        from distattn.kernels.delta_backends import _fla_ops
        have = _fla_ops() is not None and _fla_ops().get(rule) is not None
    return ("torch", "fla") if have else ("torch",)


def _softmax_specs():
    import distattn
    specs = list(SOFTMAX_SPECS)
    named = {s for s, _ in specs} | {"hetero"}
    for name in distattn.scheme_names():
        try:
            kind = distattn.get_scheme(name).kind
        except Exception:
            kind = "softmax"  # a scheme that needs options: still tried, and its error recorded
        if kind == "softmax" and name not in named:
            specs.append((name, {}))
    return specs


def exact_cases(args, shapes) -> list[tuple[str, dict, callable]]:
    """(label, description, run) per case; run() returns {tensor: errors} for this device."""
    import torch

    import distattn
    from distattn.kernels import document_mask, reference_attention
    from distattn.kernels.delta import delta_rule_reference
    from distattn.kernels.linear import reference_linear_attention
    dev = torch.device(args.device)
    refs: dict = {}

    def cached(key, make):
        if key not in refs:
            refs[key] = make()
        return refs[key]

    cases = []
    for dtn in ("fp32", "bf16"):
        dt = _dtype(dtn)
        # softmax schemes through distattn.attention
        for case, (n, h, hkv, d, cu) in shapes["softmax"].items():
            for name, opts in _softmax_specs():
                def run(name=name, opts=opts, case=case, n=n, h=h, hkv=hkv, d=d, cu=cu, dt=dt, dtn=dtn):
                    q, k, v, do = _softmax_inputs(n, h, hkv, d, dt)
                    want = cached(("softmax", case, dtn), lambda: _reference_grads(
                        lambda a, b, c: reference_attention(a, b, c, cu, True), (q, k, v), do.float()))
                    base = None
                    if dtn == "bf16":
                        base = cached(("softmax-bf16", case), lambda: _reference_grads(
                            _bf16_dense(document_mask(n, cu, True)), (q, k, v), do))
                    scheme = distattn.get_scheme(name, **opts)
                    idx, got, odt = _run_softmax(scheme, q, k, v, do, cu, dev)
                    res = _softmax_errors(got, want, idx, dtn, base)
                    if odt != str(dt):
                        res["out"]["ok"] = False
                        res["out"]["error"] = f"output dtype {odt}, inputs {dt}"
                    return res
                label = name + "".join(f"-{v}" for v in opts.values())
                cases.append((f"softmax {label} {case} {dtn}", dict(kind="softmax", scheme=name, opts=opts,
                              shape=case, dtype=dtn, n=n, heads=h, kv_heads=hkv, head_dim=d, cu_seqlens=cu), run))
        # linear attention (decay rule), per-head decay, documents, GQA
        ls = shapes["linear"]
        for name, kernel in ((nm, kn) for nm in LINEAR_SCHEMES for kn in _fla_kernels(dev, "decay")):
            def run_linear(name=name, kernel=kernel, ls=ls, dt=dt, dtn=dtn):
                n, h, hkv, d, dv, cu = ls["n"], ls["h"], ls["hkv"], ls["d"], ls["dv"], ls["cu"]
                g = torch.Generator().manual_seed(1)
                q, k = (torch.randn(n, m, d, generator=g).to(dt) for m in (h, hkv))
                v = torch.randn(n, hkv, dv, generator=g).to(dt)
                do = torch.randn(n, h, dv, generator=g).to(dt)
                decay = torch.linspace(0.9, 0.999, h)
                want = cached(("linear", dtn), lambda: _reference_grads(
                    lambda a, b, c: reference_linear_attention(a, b, c, cu, decay, None),
                    [x.double() for x in (q, k, v)], do.double()))
                scheme, idx = _linear_target(name, n, cu)
                loc = [distattn.shard(x, scheme=scheme, cu_seqlens=cu).to(dev) for x in (q, k, v, do)]
                leaves = [x.requires_grad_(True) for x in loc[:3]]
                with _env("DISTATTN_LINEAR_KERNEL", kernel):
                    out = distattn.linear_attention(*leaves, scheme=scheme, cu_seqlens=cu, decay=decay.to(dev),
                                                    n_tokens=n)
                    out.backward(loc[3])
                _sync(dev)
                return {t: _compare(gt, w[idx], "max", LINEAR_TOL[dtn]) for t, gt, w in
                        zip(("out", "dq", "dk", "dv"), [out, *(x.grad for x in leaves)], want)}
            cases.append((f"linear {name} decay/{kernel} {dtn}", dict(
                          kind="linear", scheme=name, rule="decay", kernel=kernel, dtype=dtn,
                          n=ls["n"], heads=ls["h"], kv_heads=ls["hkv"], head_dim=ls["d"], cu_seqlens=ls["cu"]),
                          run_linear))
        # the delta rule (Gated DeltaNet, Kimi Delta Attention) on the same three schemes
        ds = shapes["delta"]
        for rule, name, kernel in ((r, nm, kn) for r in DELTA_RULES for nm in LINEAR_SCHEMES
                                   for kn in _fla_kernels(dev, r)):
            def run_delta(name=name, rule=rule, kernel=kernel, ds=ds, dt=dt, dtn=dtn):
                n, h, dk, dv, cu = ds["n"], ds["h"], ds["dk"], ds["dv"], ds["cu"]
                g = torch.Generator().manual_seed(2)
                f64 = torch.float64
                q = torch.randn(n, h, dk, generator=g, dtype=f64)
                k = torch.nn.functional.normalize(torch.randn(n, h, dk, generator=g, dtype=f64), dim=-1)
                v = torch.randn(n, h, dv, generator=g, dtype=f64)
                gate = 0.5 + 0.5 * torch.rand(n, h, *((dk,) if rule == "kda" else ()), generator=g, dtype=f64)
                beta = torch.rand(n, h, generator=g, dtype=f64)
                do = torch.randn(n, h, dv, generator=g, dtype=f64)
                xs = [x.to(dt) for x in (q, k, v, gate, beta, do)]  # rounded to the tested dtype
                want = cached(("delta", rule, dtn), lambda: _reference_grads(
                    lambda *a: delta_rule_reference(*a, cu_seqlens=cu)[0], [x.double() for x in xs[:5]],
                    xs[5].double()))
                scheme, idx = _linear_target(name, n, cu)
                loc = [distattn.shard(x, scheme=scheme, cu_seqlens=cu).to(dev) for x in xs]
                leaves = [x.requires_grad_(True) for x in loc[:5]]
                with _env("DISTATTN_DELTA_KERNEL", kernel):
                    out = distattn.linear_attention(*leaves[:3], scheme=scheme, cu_seqlens=cu, rule=rule,
                                                    gate=leaves[3], beta=leaves[4], n_tokens=n)
                    out.backward(loc[5])
                _sync(dev)
                return {t: _compare(gt, w[idx], "norm", DELTA_TOL[dtn]) for t, gt, w in
                        zip(("out", "dq", "dk", "dv", "dgate", "dbeta"), [out, *(x.grad for x in leaves)], want)}
            cases.append((f"linear {name} {rule}/{kernel} {dtn}", dict(
                          kind="delta", scheme=name, rule=rule, kernel=kernel, dtype=dtn,
                          n=ds["n"], heads=ds["h"], head_dim=ds["dk"], cu_seqlens=ds["cu"]), run_delta))
    # hetero last (flex_attention compiles on its first CUDA call): the per-head sparse pattern
    # against the dense reference under the same mask, through each of its kernels here
    hs = shapes["hetero"]
    het_kernels = ("blocks", "flex") if dev.type == "cuda" else ("blocks",)  # flex has no CPU backward
    for dtn in ("fp32", "bf16"):
        dt = _dtype(dtn)
        for kernel in het_kernels:
            def run_hetero(hs=hs, dt=dt, dtn=dtn, kernel=kernel):
                from distattn.kernels.sparse import masked_reference
                from distattn.schemes.hetero import Hetero
                n, h, hkv, d, cu = hs["n"], hs["h"], hs["hkv"], hs["d"], hs["cu"]
                scheme = Hetero(**hs["opts"])
                q, k, v, do = _softmax_inputs(n, h, hkv, d, dt)
                mask = scheme.pattern.token_mask(n, h, hkv, cu, True)
                want = cached(("hetero", dtn), lambda: _reference_grads(
                    lambda a, b, c: masked_reference(a, b, c, mask), (q, k, v), do.float()))
                base = None
                if dtn == "bf16":
                    base = cached(("hetero-bf16",), lambda: _reference_grads(_bf16_dense(mask), (q, k, v), do))
                with _env("DISTATTN_HETERO_KERNEL", kernel):
                    idx, got, _ = _run_softmax(scheme, q, k, v, do, cu, dev)
                return _softmax_errors(got, want, idx, dtn, base)
            cases.append((f"softmax hetero-{kernel} docs_gqa {dtn}", dict(
                kind="softmax", scheme="hetero", opts={**hs["opts"], "kernel": kernel}, shape="docs_gqa",
                dtype=dtn, n=hs["n"], heads=hs["h"], kv_heads=hs["hkv"], head_dim=hs["d"],
                cu_seqlens=hs["cu"]), run_hetero))
    return cases


def part_exact(args, budget: Budget) -> dict:
    shapes = SHAPES["quick" if args.quick else "full"]
    results = []
    with world_of_one():
        for label, desc, run in exact_cases(args, shapes):
            row = {"case": label, **desc}
            if budget.spent():
                row.update(status="skipped", error="time budget spent")
            else:
                t0 = time.perf_counter()
                try:
                    errs = run()
                    row["errors"] = errs
                    row["status"] = "ok" if all(e.get("ok") for e in errs.values()) else "fail"
                except Exception as e:
                    row.update(status="error", error=_short(e), traceback=traceback.format_exc()[-2000:])
                row["wall_s"] = round(time.perf_counter() - t0, 3)
            if row["status"] != "ok":
                print(f"  exact: {label}: {row['status']} {row.get('error', '')}", flush=True)
            results.append(row)
            note_progress(cases=results)
    counts = collections.Counter(r["status"] for r in results)
    worst = {}
    for r in results:
        for t, e in r.get("errors", {}).items():
            key = r["dtype"]
            if "rel_max" in e and e["rel_max"] > worst.get(key, (0.0, ""))[0]:
                worst[key] = (e["rel_max"], f"{r['case']} {t}")
    return {"status": "ok" if counts.get("ok", 0) == len(results) else "fail",
            "counts": dict(counts), "cases": results,
            "worst_rel_max": {k: {"rel_max": v[0], "where": v[1]} for k, v in worst.items()}}


# ----------------------------------------------------------------------------- kernels

def part_kernels(args, budget: Budget) -> dict:
    import torch

    import kernel_bench
    ks = SHAPES["quick" if args.quick else "full"]["kernels"]
    dev = torch.device(args.device)
    backends = ["auto"]
    if dev.type == "cuda":  # each CUDA backend by name too; one not installed is recorded as unavailable
        backends += ["cuda-sdpa", "flash-attn", "cudnn"]  # cudnn last: it may crash the process
    done: list = []

    def on_row(r):
        print("  " + kernel_bench.format_row(r), flush=True)
        done.append(r)
        note_progress(rows=done)
    rows = kernel_bench.run_bench(dev, n=ks["n"], heads=ks["heads"], kv_heads=ks["kv_heads"],
                                  head_dim=ks["head_dim"], dtype="bf16", iters=ks["iters"],
                                  sdpa=("flash", "efficient", "cudnn"), block_backends=backends,
                                  deadline=budget.deadline, on_row=on_row)
    ok = [r for r in rows if r.get("status") == "ok"]
    best_sdpa = max((r for r in ok if r.get("kind") == "sdpa"), key=lambda r: r["fwd_tflops"], default=None)
    block = next((r for r in ok if r.get("name") == "block contiguous/auto"), None)
    zig = next((r for r in ok if r.get("name") == "block zigzag/auto"), None)
    ratios = {}
    if best_sdpa and block:
        ratios["block_vs_best_sdpa_fwd"] = block["fwd_tflops"] / best_sdpa["fwd_tflops"]
        ratios["block_vs_best_sdpa_fwdbwd"] = block["fwdbwd_tflops"] / max(
            r["fwdbwd_tflops"] for r in ok if r.get("kind") == "sdpa")
        ratios["best_sdpa"] = best_sdpa["name"]
    if block and zig:
        ratios["zigzag_half_vs_block_fwd"] = zig["fwd_tflops"] / block["fwd_tflops"]
        ratios["zigzag_half_vs_block_fwdbwd"] = zig["fwdbwd_tflops"] / block["fwdbwd_tflops"]
    needed = ("sdpa-flash", "block contiguous/auto", "block zigzag/auto")
    missing = [n for n in needed if not any(r["name"] == n and r.get("status") == "ok" for r in rows)]
    if dev.type == "cpu":  # a CPU build of torch may lack SDPA's flash kernel: that row only informs
        missing = [n for n in missing if n != "sdpa-flash"]
    # the speed goals: one block >= 0.95x the best SDPA kernel, a zigzag half-block >= 0.9x one block
    targets = {key: {"goal": goal, "measured": ratios.get(key), "met": ratios.get(key, 0.0) >= goal}
               for key, goal in (("block_vs_best_sdpa_fwd", 0.95), ("zigzag_half_vs_block_fwd", 0.9))}
    return {"status": "ok" if not missing else "fail", "missing": missing, "rows": rows, "ratios": ratios,
            "targets": targets, "flops": "4*pairs*H*D forward, 3.5x that for fwd+bwd"}


# ----------------------------------------------------------------------------- train

def _device_trainer(device):
    """The trainer with its model, inputs and loss on `device` (the library trainer keeps the
    model where megatron builds it, on the CPU)."""
    import torch

    from distattn.train.trainer import Trainer

    class DeviceTrainer(Trainer):
        def __init__(self, cfg):
            super().__init__(cfg, quiet=True)
            self.model.to(device)  # parameters move in place: the optimizer keeps the same tensors

        def _local(self, batch):
            return tuple(x.to(device) for x in super()._local(batch))

        def _forward_backward(self, model, batches, denom, scale, loss_sum):
            acc = torch.zeros((), device=device)
            super()._forward_backward(model, batches, denom, scale, acc)
            loss_sum += acc.detach().cpu()

    return DeviceTrainer


def part_train(args, budget: Budget) -> dict:
    import torch

    from distattn.config import load_config
    ts = SHAPES["quick" if args.quick else "full"]["train"]
    dev = torch.device(args.device)
    steps = args.train_steps or ts["steps"]
    with tempfile.TemporaryDirectory(prefix="gpu_check_train_") as tmp:
        overrides = ["parallel.cp=1", "parallel.dp=1", "model.dtype=bf16", f"train.steps={steps}",
                     "run.name=gpu_check", f"run.output_dir={tmp}", "train.ckpt_every=0",
                     "train.tensorboard=false", *ts["overrides"]]
        cfg = load_config(ROOT / "configs" / "default.yaml", overrides)
        out = {"config": overrides, "model": {k: getattr(cfg.model, k) for k in (
            "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
            "vocab_size", "dtype")}, "seq_len": cfg.data.seq_len, "scheme": cfg.attention.scheme,
            "steps_asked": steps}
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with world_of_one():
            t0 = time.perf_counter()
            tr = _device_trainer(dev)(cfg)
            out["build_s"] = round(time.perf_counter() - t0, 3)
            out["param_device"] = str(next(tr.model.parameters()).device)
            out["param_dtype"] = str(next(tr.model.parameters()).dtype)
            out["params"] = sum(p.numel() for p in tr.model.parameters())
            hist = []
            try:
                for _ in range(steps):
                    if budget.spent():
                        out["stopped"] = "time budget spent"
                        break
                    s = tr.train_step()
                    hist.append({"step": s.step, "loss": s.loss, "step_s": s.step_s, "tokens": s.tokens,
                                 "grad_norm": float(s.grad_norm)})
                    note_progress(**{**out, "steps": hist})
            finally:
                tr.mesh.destroy()
        out["steps"] = hist
        if hist:
            out["loss_first"], out["loss_last"] = hist[0]["loss"], hist[-1]["loss"]
            steady = hist[1:] or hist  # the first step includes warm-up (kernel selection, allocator)
            out["tokens_per_s"] = sum(h["tokens"] for h in steady) / sum(h["step_s"] for h in steady)
            out["first_step_s"] = hist[0]["step_s"]
            out["loss_decreased"] = hist[-1]["loss"] < hist[0]["loss"]
        if dev.type == "cuda":
            out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
        finite = bool(hist) and all(math.isfinite(h["loss"]) for h in hist)
        on_device = out["param_device"].startswith(dev.type)
        out["status"] = "ok" if finite and len(hist) == steps and on_device else "fail"
    return out


# ----------------------------------------------------------------------------- delta

def _time_fn(fn, dev, iters: int, budget: Budget) -> dict:
    """One warm-up call (timed), then `iters` timed calls unless the warm-up alone ate a sixth of
    what is left of the budget."""
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    first = time.perf_counter() - t0
    res = {"first_ms": first * 1e3}
    if iters and first * (iters + 1) < budget.left() / 2:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(dev)
        res["ms"] = (time.perf_counter() - t0) / iters * 1e3
    else:
        res["ms"] = first * 1e3
        res["note"] = "warm-up call only (time budget)"
    return res


def part_delta(args, budget: Budget) -> dict:
    import torch

    from distattn.kernels.delta_backends import _fla_ops, delta_rule
    from distattn.kernels.linear_fla import ENV as LINEAR_ENV
    from distattn.kernels.linear_fla import _fla_simple_gla
    bs = SHAPES["quick" if args.quick else "full"]["delta_bench"]
    dev = torch.device(args.device)
    n, h, dk, dv, iters = bs["n"], bs["h"], bs["dk"], bs["dv"], bs["iters"]
    dt = _dtype(bs["dtype"])
    fla = _fla_ops() if dev.type == "cuda" else None
    rows = []

    def delta_inputs(rule):
        g = torch.Generator(device=dev).manual_seed(3)
        q = torch.randn(n, h, dk, device=dev, generator=g).to(dt)
        k = torch.nn.functional.normalize(torch.randn(n, h, dk, device=dev, generator=g), dim=-1).to(dt)
        v = torch.randn(n, h, dv, device=dev, generator=g).to(dt)
        shape = (n, h, dk) if rule == "kda" else (n, h)
        gate = (0.9 + 0.1 * torch.rand(*shape, device=dev, generator=g)).to(dt)
        beta = torch.rand(n, h, device=dev, generator=g).to(dt)
        do = torch.randn(n, h, dv, device=dev, generator=g).to(dt)
        return [q, k, v, gate, beta], do

    outs = {}
    for rule in DELTA_RULES:
        for kernel in ("torch", "fla"):
            row = {"name": f"delta {rule}/{kernel}", "rule": rule, "kernel": kernel, "tokens": n, "heads": h,
                   "dk": dk, "dv": dv, "dtype": bs["dtype"]}
            rows.append(row)
            if kernel == "fla" and (fla is None or fla.get(rule) is None):
                why = ("CUDA only" if dev.type != "cuda" else "flash-linear-attention not installed" if fla is None
                       else f"this fla release has no {rule} kernel")
                row.update(status="unavailable", error=why)
                continue
            if budget.spent():
                row.update(status="skipped", error="time budget spent")
                continue
            try:
                xs, do = delta_inputs(rule)

                def fwd(xs=xs, kernel=kernel):
                    with torch.no_grad():
                        return delta_rule(*xs, kernel=kernel)

                def fwdbwd(xs=xs, do=do, kernel=kernel):
                    leaves = [x.detach().requires_grad_(True) for x in xs]
                    delta_rule(*leaves, kernel=kernel).backward(do)

                outs[(rule, kernel)] = fwd().float()
                row["fwd"] = _time_fn(fwd, dev, iters, budget)
                row["fwdbwd"] = _time_fn(fwdbwd, dev, iters, budget)
                row["fwdbwd_tokens_per_s"] = n / (row["fwdbwd"]["ms"] / 1e3)
                row["status"] = "ok"
            except Exception as e:
                row.update(status="error", error=_short(e), traceback=traceback.format_exc()[-2000:])
            print(f"  delta: {row['name']}: {row['status']} {row.get('error', '')}", flush=True)
            note_progress(rows=rows)
        if (rule, "torch") in outs and (rule, "fla") in outs:
            a, b = outs[(rule, "fla")], outs[(rule, "torch")]
            rows[-1]["rel_diff_vs_torch"] = float((a - b).norm() / b.norm().clamp_min(1e-30))

    # decay linear attention: the local chunked part, ours and fla's chunk_simple_gla
    import distattn
    have_fla_linear = dev.type == "cuda" and _fla_simple_gla() is not None
    lin_out = {}
    for kernel in ("torch", "fla"):
        row = {"name": f"linear decay/{kernel}", "rule": "decay", "kernel": kernel, "tokens": n, "heads": h,
               "dk": dk, "dv": dv, "dtype": bs["dtype"]}
        rows.append(row)
        if kernel == "fla" and not have_fla_linear:
            row.update(status="unavailable", error="flash-linear-attention not installed" if dev.type == "cuda"
                       else "CUDA only")
            continue
        if budget.spent():
            row.update(status="skipped", error="time budget spent")
            continue
        try:
            g = torch.Generator(device=dev).manual_seed(4)
            q, k = (torch.randn(n, h, dk, device=dev, generator=g).to(dt) * dk ** -0.5 for _ in range(2))
            v = torch.randn(n, h, dv, device=dev, generator=g).to(dt)
            do = torch.randn(n, h, dv, device=dev, generator=g).to(dt)
            decay = torch.linspace(0.95, 0.999, h, device=dev)

            def lfwd():
                with torch.no_grad():
                    return distattn.linear_attention(q, k, v, scheme="local", decay=decay)

            def lfwdbwd():
                a, b, c = (x.detach().requires_grad_(True) for x in (q, k, v))
                distattn.linear_attention(a, b, c, scheme="local", decay=decay).backward(do)

            with _env(LINEAR_ENV, kernel):
                lin_out[kernel] = lfwd().float()
                row["fwd"] = _time_fn(lfwd, dev, iters, budget)
                row["fwdbwd"] = _time_fn(lfwdbwd, dev, iters, budget)
            row["fwdbwd_tokens_per_s"] = n / (row["fwdbwd"]["ms"] / 1e3)
            row["status"] = "ok"
        except Exception as e:
            row.update(status="error", error=_short(e), traceback=traceback.format_exc()[-2000:])
        print(f"  delta: {row['name']}: {row['status']} {row.get('error', '')}", flush=True)
        note_progress(rows=rows)
    if "torch" in lin_out and "fla" in lin_out:
        a, b = lin_out["fla"], lin_out["torch"]
        rows[-1]["rel_diff_vs_torch"] = float((a - b).norm() / b.norm().clamp_min(1e-30))
    bad = [r["name"] for r in rows if r["status"] in ("error", "skipped") or
           (r["kernel"] == "torch" and r["status"] != "ok")]
    return {"status": "ok" if not bad else "fail", "problems": bad, "rows": rows,
            "fla_installed": fla is not None or have_fla_linear}


# ----------------------------------------------------------------------------- driver

RUNNERS = {"env": part_env, "exact": part_exact, "kernels": part_kernels, "train": part_train,
           "delta": part_delta}


def run_part_here(name: str, args, seconds: float) -> dict:
    """One part in this process: its result with status, wall time and budget, or the error."""
    t0 = time.perf_counter()
    try:
        res = RUNNERS[name](args, Budget(seconds))
    except Exception as e:
        res = {"status": "error", "error": _short(e), "traceback": traceback.format_exc()[-3000:]}
    res["wall_s"] = round(time.perf_counter() - t0, 3)
    res["budget_s"] = round(seconds, 1)
    res["isolated"] = False
    return res


_CHILDREN: list = []  # the running part's process, ended with the driver


def run_part_child(name: str, args, seconds: float) -> dict:
    """One part in a child process (killed CHILD_GRACE_S after its budget); its output is echoed."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_part_") as tmp:
        out = Path(tmp) / "part.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--child", name,
               "--child-out", str(out), "--child-budget", str(seconds)]
        if args.quick:
            cmd.append("--quick")
        if args.train_steps:
            cmd += ["--train-steps", str(args.train_steps)]
        tail: collections.deque = collections.deque(maxlen=40)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _CHILDREN.append(proc)

        def pump():
            for line in proc.stdout:
                tail.append(line.rstrip("\n"))
                print(line, end="", flush=True)
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=seconds + CHILD_GRACE_S)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
        finally:
            _CHILDREN.remove(proc)
        reader.join(timeout=5)
        partial = Path(str(out) + ".partial")
        if out.exists():
            res = json.loads(out.read_text())
        else:
            res = json.loads(partial.read_text()) if partial.exists() else {}  # what it finished
            if timed_out:
                res.update(status="timeout", error=f"killed after {seconds + CHILD_GRACE_S:.0f} s")
            else:
                res.update(status="error", error=f"child exited with code {proc.returncode} before its result")
        if res.get("status") != "ok":
            res["output_tail"] = list(tail)
    res["wall_s"] = round(time.perf_counter() - t0, 3)
    res["budget_s"] = round(seconds, 1)
    res["isolated"] = True
    return res


def summary_line(name: str, res: dict) -> str:
    st = res.get("status", "?")
    head = f"  {name:8s} {st:8s} {res.get('wall_s', 0):6.1f} s  "
    if st in ("error", "timeout"):
        return head + res.get("error", "")
    try:
        if name == "env":
            dev = res.get("gpu") or res.get("device")
            extras = ", ".join(f"{m} {'yes' if v is True else 'no'}" for m, v in res.get("importable", {}).items()
                               if m in ("flash_attn", "fla", "triton"))
            return head + f"{dev}, torch {res.get('torch')}; {extras}; picks {res.get('kernels_picked')}"
        if name == "exact":
            c = res.get("counts", {})
            worst = "; ".join(f"{k} worst rel {v['rel_max']:.1e} ({v['where']})"
                              for k, v in res.get("worst_rel_max", {}).items())
            return head + f"{c.get('ok', 0)}/{sum(c.values())} cases within tolerance; {worst}"
        if name == "kernels":
            parts = [f"{r['name']} {r['fwd_tflops']:.3g}/{r['fwdbwd_tflops']:.3g}" for r in res.get("rows", [])
                     if r.get("status") == "ok"]
            goals = "; ".join(f"{k} {v['measured']:.2f} (goal {v['goal']})" for k, v in res.get("targets", {}).items()
                              if v.get("measured") is not None)
            return head + "TFLOP/s fwd/fwd+bwd: " + ", ".join(parts) + (f"; {goals}" if goals else "")
        if name == "train":
            if "loss_first" not in res:
                return head + "no step finished"
            return head + (f"{len(res['steps'])} steps on {res['param_device']} ({res['param_dtype']}): loss "
                           f"{res['loss_first']:.4f} -> {res['loss_last']:.4f}, {res['tokens_per_s']:,.0f} tok/s")
        if name == "delta":
            parts = [f"{r['name']} {r['fwdbwd']['ms']:.1f} ms" if r.get("status") == "ok"
                     else f"{r['name']} {r.get('status')}" for r in res.get("rows", [])]
            return head + "fwd+bwd: " + ", ".join(parts)
    except Exception as e:  # a summary must never hide the JSON
        return head + f"(summary failed: {_short(e)})"
    return head


def default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    return ROOT / "runs" / "gpu_check.json"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="GPU checks for a lent machine; results in one JSON file.")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: the CPU dry run, seconds")
    ap.add_argument("--out", default=None,
                    help="the JSON file (default $OUT/gpu_check.json, else runs/gpu_check.json)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                    help="run each part in a child process (auto: on CUDA)")
    ap.add_argument("--total-budget", type=float, default=None,
                    help=f"seconds for all parts (default {TOTAL_BUDGET_S}, --quick {QUICK_BUDGET_S})")
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help="multiply every part's budget and the total (a slower device, a CPU run of full shapes)")
    ap.add_argument("--train-steps", type=int, default=None, help="override the training smoke's steps")
    ap.add_argument("--install-log", default=None, help="a file whose text is recorded as the install step")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-budget", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    parts = [p for p in args.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"--parts: unknown part(s) {bad}; choose from {', '.join(PARTS)}")
    args.part_list = parts
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:  # one part for a parent process
        _PARTIAL["path"] = str(args.child_out) + ".partial"
        res = run_part_here(args.child, args, args.child_budget)
        Path(args.child_out).write_text(json.dumps(res, default=str))
        return 0
    out_path = Path(args.out) if args.out else default_out()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and args.device.startswith("cuda"))
    total = args.total_budget or (QUICK_BUDGET_S if args.quick else TOTAL_BUDGET_S * args.budget_scale)
    t_start = time.monotonic()
    doc = {"schema": 1, "tool": "tools/gpu_check.py", "started": _now(), "device": args.device,
           "quick": args.quick, "isolated": isolate, "total_budget_s": total,
           "argv": sys.argv[1:] if argv is None else list(argv), "parts": {}}
    doc["install"] = {"ran": bool(args.install_log)}  # tools/gpu_check.sh passes its log, unless --no-install
    if args.install_log and Path(args.install_log).exists():
        doc["install"]["log_tail"] = Path(args.install_log).read_text(errors="replace").splitlines()[-20:]
    try:
        import subprocess as _sp
        doc["commit"] = _sp.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except Exception:
        doc["commit"] = None

    def save():
        doc["wall_s"] = round(time.monotonic() - t_start, 3)
        tmp = out_path.with_suffix(out_path.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(out_path)

    def stop(signum, frame):  # an outer timeout: end the running part, keep what is recorded
        for proc in list(_CHILDREN):
            with contextlib.suppress(Exception):
                proc.kill()
        doc["stopped"] = f"signal {signum} after {time.monotonic() - t_start:.0f} s"
        doc["ok"] = False
        save()
        print(f"gpu_check: stopped by signal {signum}; results so far in {out_path}", flush=True)
        os._exit(124)
    signal.signal(signal.SIGTERM, stop)

    print(f"gpu_check: device {args.device}{' (quick)' if args.quick else ''}, parts {','.join(args.part_list)}, "
          f"budget {total:.0f} s, results -> {out_path}", flush=True)
    for name in args.part_list:
        left = total - (time.monotonic() - t_start)
        seconds = min((BUDGET_S[name] * args.budget_scale if not args.quick else total), left)
        if seconds <= 1:
            doc["parts"][name] = {"status": "skipped", "error": "total time budget spent"}
        else:
            print(f"gpu_check: {name} (budget {seconds:.0f} s)", flush=True)
            runner = run_part_child if isolate else run_part_here
            doc["parts"][name] = runner(name, args, seconds)
        print(summary_line(name, doc["parts"][name]), flush=True)
        save()
    statuses = {n: r.get("status") for n, r in doc["parts"].items()}
    doc["ok"] = all(s == "ok" for s in statuses.values())
    doc["finished"] = _now()
    save()
    print(f"gpu_check: {'all parts ok' if doc['ok'] else 'NOT all ok: ' + str(statuses)}; "
          f"{doc['wall_s']:.1f} s; results in {out_path}", flush=True)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
