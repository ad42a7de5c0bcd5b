"""tools/gpu_check.py's exact part: every registered scheme at W=1 against the dense reference."""
from __future__ import annotations

import collections
import time
import traceback

from gpu_check_common import (BF16_MEAN_FACTOR, BF16_REL_MAX, DELTA_RULES, DELTA_TOL, LINEAR_SCHEMES, LINEAR_TOL,
                              SHAPES, SOFTMAX_SPECS, SOFTMAX_TOL, Budget, _dtype, _env, _short, _sync,
                              note_progress, world_of_one)


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
