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
import json
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
for p in (str(HERE.parent), str(HERE)):  # distattn from this checkout; kernel_bench beside this file
    if p not in sys.path:
        sys.path.insert(0, p)

from gpu_check_common import (BUDGET_S, CHILD_GRACE_S, PARTS, QUICK_BUDGET_S, ROOT,  # noqa: E402
                              TOTAL_BUDGET_S, _PARTIAL, Budget, _now, _short)
from gpu_check_exact import part_exact  # noqa: E402
from gpu_check_speed import part_kernels, part_train, part_delta  # noqa: E402


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
