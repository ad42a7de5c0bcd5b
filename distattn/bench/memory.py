"""Measured per-rank peak memory of one training step, and the longest context that trains.

`measure_step` runs in a fresh rank process (spawned by `run_on_ranks`): after
a throwaway warm-up step at the shortest length it builds the trainer, resets
the kernel's peak-RSS counter, runs two steps (the second is the steady state,
with optimizer state) and reads the peak; the growth is what training added
(gradients, optimizer state, activations, temporaries and communication
buffers), to compare with the planner's prediction less the parameters, which
exist before the step.

`longest_trainable` searches seq_len for the largest length whose measured
growth stays within a budget, starting from the planner's prediction, each
point in fresh processes.
"""
from __future__ import annotations

import contextlib
import os
import sys

from distattn.bench.rss import peak_bytes, reset_peak, trim_heap

MIB = 1024 ** 2


def _warm_up(cfg) -> None:
    """One throwaway step at the shortest length, then free it all.

    A process's first step also pays one-time costs that do not scale with the
    context and are not the step's memory: lazy imports and their bytecode
    compilation, thread pools, kernel dispatch tables. They vary with the
    environment (a fresh checkout compiles its modules, a warm one does not),
    so the measured step follows a warm-up, as GPU peaks exclude the CUDA
    context and library workspaces.
    """
    import gc

    from distattn.config import Config
    from distattn.train.trainer import Trainer
    d = cfg.model_dump()
    d["data"]["seq_len"] = 2 * cfg.parallel.cp * 64
    small = Config.model_validate(d)
    tr = Trainer(small, quiet=True)
    tr.train_step()
    tr.mesh.destroy()
    del tr
    gc.collect()
    trim_heap()


def measure_step(cfg_dict: dict, warm_up: bool = True, steps: int = 2) -> dict:
    """Peak RSS growth (bytes) over `steps` training steps on this rank (max over ranks), and the
    last step's comm bytes."""
    import torch

    from distattn.comm import Comm, CommLedger
    from distattn.config import Config
    from distattn.train.trainer import Trainer
    cfg = Config.model_validate(cfg_dict)
    if warm_up:
        _warm_up(cfg)
    tr = Trainer(cfg, quiet=True)
    before, source = reset_peak()
    for _ in range(steps):  # the second step is the steady state: optimizer state already exists
        log = tr.train_step()
    grown = peak_bytes(source) - before
    tr.mesh.destroy()
    peak = torch.tensor([float(grown)], dtype=torch.float64)
    Comm(None, CommLedger()).all_reduce(peak, op="max")
    return {"peak_growth": int(peak.item()), "comm_bytes": log.comm_bytes, "loss": log.loss,
            "step_s": log.step_s}


def measure(cfg, seq_len: int, cp: int, scheme: str, recompute: str, timeout: float = 600.0,
            warm_up: bool = True) -> dict:
    """`measure_step` on cp x tp fresh ranks for `cfg` (its whole model section and parallel.tp) at one
    point."""
    from distattn.config import Config
    from distattn.multiproc import run_on_ranks
    d = cfg.model_dump()
    d["data"]["seq_len"] = seq_len
    ulysses = cfg.parallel.ulysses if scheme == "usp" else 1  # usp keeps the config's degree
    tp = cfg.parallel.tp
    d["parallel"].update(world_size=cp * tp, dp=1, cp=cp, ulysses=ulysses, ring=None, attention_servers=0)
    d["attention"]["scheme"] = scheme if cp > 1 else "local"
    d["model"]["recompute"] = recompute
    d["train"]["tensorboard"] = False
    c = Config.model_validate(d)
    with malloc_returns_freed_memory():
        return run_on_ranks(measure_step, cp * tp, c.model_dump(), warm_up, timeout=timeout)[0]


@contextlib.contextmanager
def malloc_returns_freed_memory():
    """Spawned ranks whose RSS tracks live tensors.

    glibc raises its mmap threshold after the first large free, after which
    freed tensors stay in the heap and RSS reports the allocator's high-water
    mark, not live memory. Fixing the threshold at 64 KiB (every activation
    tensor of a real length is larger) and trimming at once makes the peak RSS
    the peak of live bytes, which is what the planner predicts and what a GPU
    caching allocator's peak reflects.
    """
    keys = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def longest_trainable(cfg, budget_bytes: float, cp: int, scheme: str, recompute: str,
                      start: int, log=print, step: float = 0.06,
                      resolution: float = 0.03) -> tuple[int, list[tuple[int, int]], dict | None]:
    """Largest seq_len (multiple of 2*cp*64) whose measured step growth fits the budget.

    Starts at `start` (the planner's prediction), steps by `step` (relative)
    up or down until one length fits and the next does not, then bisects to
    `resolution`: with a planner within a few percent that is 3-5 points, each
    a fresh training process, instead of a doubling search from scratch.
    """
    unit = 2 * cp * 64
    tried: list[tuple[int, int]] = []
    seen: dict[int, bool] = {}
    results: dict[int, dict] = {}

    def fits(k: int) -> bool:
        if k not in seen:
            n = k * unit
            results[k] = measure(cfg, n, cp, scheme, recompute)
            got = results[k]["peak_growth"]
            tried.append((n, got))
            seen[k] = got <= budget_bytes
            log(f"  cp={cp} {scheme} recompute={recompute} seq_len={n}: {got / MIB:.1f} MiB "
                f"{'fits' if seen[k] else 'over'}")
        return seen[k]

    def stride(k: int) -> int:
        return max(1, round(k * step))

    k = max(1, start // unit)
    if fits(k):
        lo, hi = k, None
        while hi is None:
            nxt = lo + stride(lo)
            if fits(nxt):
                lo = nxt
            else:
                hi = nxt
    else:
        lo, hi = None, k
        while lo is None:
            nxt = hi - stride(hi)
            if nxt < 1:
                return 0, tried, None
            if fits(nxt):
                lo = nxt
            else:
                hi = nxt
    while hi - lo > max(1, int(lo * resolution)):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo * unit, tried, results[lo]


def run_longest(budget_mib: float, worlds: list[int], recomputes: list[str], scheme: str = "ring",
                overrides: list[str] = (), log=print, resolution: float = 0.03) -> list[dict]:
    """Measured vs predicted longest trainable context, per world size and recompute mode."""
    from distattn.config import load_config
    from distattn.plan.memory import longest_context, predict_memory
    cfg = load_config(None, list(overrides))
    budget = budget_mib * MIB
    rows = []
    for rc in recomputes:
        for w in worlds:
            sch = scheme if w > 1 else "local"
            params = predict_memory(cfg, 2 * w, cp=w, scheme=sch, recompute=rc).params
            predicted = longest_context(cfg, budget + params, w, sch, rc)
            measured, tried, point = longest_trainable(cfg, budget, w, sch, rc, start=predicted, log=log,
                                                       resolution=resolution)
            if point is None:
                raise RuntimeError(f"cp={w} {sch} recompute={rc}: not even {2 * w * 64} tokens fit "
                                   f"{budget_mib} MiB; raise --budget-mib")
            plan = predict_memory(cfg, measured, cp=w, scheme=sch, recompute=rc)
            rows.append({"world": w, "scheme": sch, "recompute": rc, "predicted": predicted,
                         "measured": measured, "peak_mib": point["peak_growth"] / MIB,
                         "predicted_peak_mib": (plan.total - plan.params) / MIB,
                         "comm_bytes": point["comm_bytes"], "step_s": point["step_s"],
                         "tried": tried})
            log(f"cp={w} {sch} recompute={rc}: measured {measured}, predicted {predicted}")
    return rows


# (cp, scheme, seq_len, recompute): three context lengths without recomputation,
# then each recompute mode and a context-parallel scheme
ACCURACY_POINTS = [(1, "local", 4096, "none"), (1, "local", 8192, "none"), (1, "local", 16384, "none"),
                   (1, "local", 16384, "full"), (2, "ring", 16384, "selective")]


def compare_points(cfg, points=ACCURACY_POINTS) -> list[dict]:
    """Planner vs measurement at each (cp, scheme, seq_len, recompute) point, each a fresh process."""
    from distattn.plan.memory import predict_memory
    rows = []
    for cp, scheme, n, rc in points:
        got = measure(cfg, n, cp, scheme, rc, timeout=300)["peak_growth"]
        plan = predict_memory(cfg, n, cp=cp, scheme=scheme, recompute=rc)
        want = plan.total - plan.params
        rows.append({"cp": cp, "scheme": scheme, "seq_len": n, "recompute": rc, "phase": plan.phase,
                     "measured_mib": got / MIB, "predicted_mib": want / MIB, "ratio": want / got})
    return rows


def format_compare(rows: list[dict]) -> str:
    lines = ["| cp | scheme | seq_len | recompute | peak at (planner) | measured MiB | predicted MiB | "
             "predicted / measured |", "|---:|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['cp']} | {r['scheme']} | {r['seq_len']} | {r['recompute']} | {r['phase']} | "
                     f"{r['measured_mib']:.1f} | {r['predicted_mib']:.1f} | {r['ratio']:.3f} |")
    return "\n".join(lines)


def format_rows(rows: list[dict], budget_mib: float) -> str:
    base = {r["recompute"]: r["measured"] for r in rows if r["world"] == 1}
    head = (f"| W | scheme | recompute | longest measured | longest predicted | x W=1 | "
            f"step peak MiB (meas / pred) | step s |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["measured"] / base[r["recompute"]] if base.get(r["recompute"]) else float("nan")
        lines.append(f"| {r['world']} | {r['scheme']} | {r['recompute']} | {r['measured']} | "
                     f"{r['predicted']} | {ratio:.2f} | {r['peak_mib']:.1f} / "
                     f"{r['predicted_peak_mib']:.1f} | {r['step_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    from pathlib import Path
    p = argparse.ArgumentParser(description="longest trainable context: measured vs planned")
    p.add_argument("--budget-mib", type=float, default=128.0,
                   help="per-rank budget for the memory one step adds (MiB)")
    p.add_argument("--worlds", default="1,4")
    p.add_argument("--recompute", default="none,full")
    p.add_argument("--scheme", default="ring")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resolution", type=float, default=0.03,
                   help="the search stops when the longest fitting and the shortest failing length differ by "
                        "at most this fraction (finer: more points)")
    p.add_argument("--json", default=None)
    p.add_argument("--compare", action="store_true",
                   help="instead of the search: planner vs measured peak at fixed points "
                        "(4K/8K/16K at W=1, full recompute, ring cp=2 selective)")
    a = p.parse_args(argv)
    if a.compare:
        from distattn.config import load_config
        rows = compare_points(load_config(None, a.overrides))
        print(format_compare(rows))
    else:
        rows = run_longest(a.budget_mib, [int(x) for x in a.worlds.split(",")], a.recompute.split(","),
                           a.scheme, a.overrides, log=lambda m: print(m, file=sys.stderr, flush=True),
                           resolution=a.resolution)
        print(format_rows(rows, a.budget_mib))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
