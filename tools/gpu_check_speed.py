"""tools/gpu_check.py's speed parts: kernel TFLOP/s, the bf16 training smoke run, the delta-rule and linear kernels."""
from __future__ import annotations

import math
import tempfile
import time
import traceback

from gpu_check_common import (DELTA_RULES, ROOT, SHAPES, Budget, _dtype, _env, _short, _sync, note_progress,
                              world_of_one)


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


def _time_row(row: dict, fwd, fwdbwd, tokens: int, dev, iters: int, budget: Budget) -> None:
    row["fwd"] = _time_fn(fwd, dev, iters, budget)
    row["fwdbwd"] = _time_fn(fwdbwd, dev, iters, budget)
    row["fwdbwd_tokens_per_s"] = tokens / (row["fwdbwd"]["ms"] / 1e3)
    row["status"] = "ok"


def _failed_row(row: dict, e: BaseException) -> None:
    row.update(status="error", error=_short(e), traceback=traceback.format_exc()[-2000:])


def _row_done(row: dict, rows: list) -> None:
    print(f"  delta: {row['name']}: {row['status']} {row.get('error', '')}", flush=True)
    note_progress(rows=rows)


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
                _time_row(row, fwd, fwdbwd, n, dev, iters, budget)
            except Exception as e:
                _failed_row(row, e)
            _row_done(row, rows)
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
                _time_row(row, lfwd, lfwdbwd, n, dev, iters, budget)
        except Exception as e:
            _failed_row(row, e)
        _row_done(row, rows)
    if "torch" in lin_out and "fla" in lin_out:
        a, b = lin_out["fla"], lin_out["torch"]
        rows[-1]["rel_diff_vs_torch"] = float((a - b).norm() / b.norm().clamp_min(1e-30))
    bad = [r["name"] for r in rows if r["status"] in ("error", "skipped") or
           (r["kernel"] == "torch" and r["status"] != "ok")]
    return {"status": "ok" if not bad else "fail", "problems": bad, "rows": rows,
            "fla_installed": fla is not None or have_fla_linear}
