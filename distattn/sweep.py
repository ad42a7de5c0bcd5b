"""`distattn sweep SWEEP.yaml`: context-length scaling over schemes x lengths x world sizes.

Every point is an attention-level run, like ``distattn bench attention``: W
local ranks (gloo on CPU, NCCL on GPUs) each generate their own shard of random
q/k/v (no full-length tensor is ever built, so memory is what the scheme needs),
run one untimed forward + backward pass of one attention layer to measure memory,
then time ``warmup + iters`` more (softmax schemes through ``distattn.attention``,
linear ones through ``distattn.linear_attention``). Attention-level runs isolate the scheme: a
trainer step adds embeddings, MLPs and the optimizer, whose memory and time
scale the same way for every scheme and would blur the comparison, and it costs
far more per point on a CPU.

Per point, the maximum over ranks of:

- ``step_s``: wall time of one fwd+bwd (median over iterations), and
  ``tokens_per_s`` = N / step_s;
- ``compute_s``: the main thread's CPU time of one fwd+bwd (the critical path
  on a machine with fewer cores than ranks, see docs/benchmarks.md);
- ``bytes_sent`` and ``exposed_s`` per fwd+bwd, from the ledger;
- ``peak_mem_bytes``: what the point adds to the rank's memory at its peak:
  the inputs and one untimed fwd+bwd (the memory pass) measured before the
  timed passes. On Linux the pass runs on a fresh thread with glibc told to
  return freed tensors at once, and the peak is VmHWM (reset via
  /proc/self/clear_refs after malloc_trim) minus the resident memory before
  the inputs: the peak of live bytes rather than the allocator's high-water
  mark, which depends on allocation history (see _malloc_tracks_tensors).
  Elsewhere ru_maxrss, which cannot be reset, so points must then be run in
  increasing size; on CUDA the allocator's peak over the point;
- ``predicted_mem_bytes``: the planner's prediction of that peak
  (`distattn.plan.attention`, None for schemes it does not model).

A point that fails is recorded with its status (``oom`` when the failure says
so, ``failed``, ``timeout``, ``invalid`` for a scheme that cannot run that
shape) and the sweep goes on with a fresh pool of ranks. With a
``memory_budget_mib`` and ``use_planner`` (the default), a point whose
prediction exceeds the budget even with ``plan_margin`` taken off it
(predicted * (1 - plan_margin) > budget) is not run: it is recorded as
``skipped`` with ``fits`` false. Closer calls are always measured.

Maximum trainable context: for every scheme and world size, the largest N
whose point succeeds with ``peak_mem_bytes <= memory_budget_mib``, to
``search.granularity`` tokens, up to ``search.max``. With the planner the
search starts at its predicted longest context and brackets in steps of 1/8
before bisecting; without it (or for a scheme it does not model), doubling
from the largest length that fit (or ``search.start``), then bisection.
Skipped points bound the search from above like measured failures.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from distattn.sweep_point import _classify_failure, _Pools, _rank_point
from distattn.sweep_report import format_max_context, format_points, plot_sweep, write_csv
from distattn.sweep_spec import DTYPES, LINEAR, Point, SearchSpec, SweepSpec, load_sweep

__all__ = ["SweepSpec", "SearchSpec", "Point", "load_sweep", "run_point_on_ranks", "run_sweep", "add_parser",
           "max_context_search", "planner_skip", "planned_longest", "format_points", "format_max_context",
           "write_csv", "plot_sweep", "DTYPES", "LINEAR", "_Pools", "_classify_failure", "_rank_point"]


# ----------------------------------------------------------------------------- planner


MIB = 2**20


def predicted_bytes(spec: SweepSpec, scheme: str, world: int, n_tokens: int) -> int | None:
    """The planner's per-rank peak for this point; None when the scheme has no model."""
    from distattn.plan.attention import predict_attention_peak
    m = predict_attention_peak(scheme, n_tokens, world, spec.heads, spec.kv_heads, spec.head_dim,
                               spec.dtype, spec.causal, spec.threads)
    return None if m is None else m.total


def planner_skip(spec: SweepSpec, predicted: int | None) -> str | None:
    """Why the planner rules a point out, or None to run it.

    Only a prediction over budget even after taking plan_margin off it is
    trusted; anything closer is measured.
    """
    if not spec.use_planner or spec.memory_budget_mib is None or predicted is None:
        return None
    budget = spec.memory_budget_mib * MIB
    if predicted * (1 - spec.plan_margin) <= budget:
        return None
    need = 1 - budget / predicted
    return (f"planner predicts {predicted / MIB:.1f} MiB > budget {spec.memory_budget_mib:g} MiB "
            f"(plan_margin={spec.plan_margin:g}); set plan_margin higher (>= {need:.2f}) or "
            f"memory_budget_mib larger to run it")


def planned_longest(spec: SweepSpec, scheme: str, world: int) -> int | None:
    """Largest N (a multiple of search.granularity, <= search.max) predicted within the budget.

    0 when not even one granule fits; None without a budget or a model for the
    scheme. Predictions grow with N, so a bisection over multiples suffices.
    """
    from distattn.plan.attention import has_model
    if spec.memory_budget_mib is None or not has_model(scheme):
        return None
    g, budget = spec.search.granularity, spec.memory_budget_mib * MIB
    lo, hi = 0, spec.search.max // g
    while lo < hi:
        mid = (lo + hi + 1) // 2
        p = predicted_bytes(spec, scheme, world, mid * g)
        if p is not None and p <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * g


def plan_or_run(spec: SweepSpec, pools: "_Pools", scheme: str, world: int, n_tokens: int,
                phase: str = "grid") -> Point:
    """A point the planner rules out comes back "skipped" without running; any other is run."""
    pred = predicted_bytes(spec, scheme, world, n_tokens)
    why = planner_skip(spec, pred)
    if why is not None:
        return Point(scheme=scheme, world=world, n_tokens=n_tokens, phase=phase, status="skipped",
                     predicted_mem_bytes=pred, fits=False, error=why)
    return run_point_on_ranks(spec, pools, scheme, world, n_tokens, phase=phase, predicted=pred)


def run_point_on_ranks(spec: SweepSpec, pools: _Pools, scheme: str, world: int, n_tokens: int,
                       phase: str = "grid", predicted: int | None = None) -> Point:
    """Run one point on ``world`` ranks; any failure becomes the point's status.

    ``predicted``: the planner's peak when the caller has it already.
    """
    if predicted is None:
        predicted = predicted_bytes(spec, scheme, world, n_tokens)
    pt = Point(scheme=scheme, world=world, n_tokens=n_tokens, phase=phase, predicted_mem_bytes=predicted)
    spec_dict = asdict(spec)
    try:
        res = pools.get(world).run(_rank_point, spec_dict, scheme, n_tokens, timeout=spec.timeout_s)
    except Exception as e:  # the pool is torn down by RankPool on failure; start afresh next time
        pools.drop(world)
        msg = str(e)
        pt.status = _classify_failure(msg)
        pt.error = msg.strip().splitlines()[-1][:300] if msg.strip() else type(e).__name__
        pt.fits = False
        return pt
    bad = [r for r in res if r["status"] != "ok"]
    if bad:
        pt.status, pt.error, pt.fits = bad[0]["status"], bad[0].get("error", "")[:300], False
        return pt
    pt.step_s = max(r["step_s"] for r in res)
    pt.tokens_per_s = n_tokens / pt.step_s if pt.step_s > 0 else math.nan
    pt.compute_s = max(r["compute_s"] for r in res)
    pt.bytes_sent = max(r["bytes_sent"] for r in res)
    pt.exposed_s = max(r["exposed_s"] for r in res)
    pt.peak_mem_bytes = max(r["peak_mem_bytes"] for r in res)
    pt.peak_rss_bytes = max(r["peak_rss_bytes"] for r in res)
    pt.mem_source = res[0]["mem_source"]
    if spec.memory_budget_mib is not None:
        pt.fits = pt.peak_mem_bytes <= spec.memory_budget_mib * 2**20
    return pt


# ----------------------------------------------------------------------------- search


def _round(n: int, g: int) -> int:
    return max(g, (n // g) * g)


STEP = 0.125  # bracket step around the planner's longest context (its error is a few percent)


def _up(n: int, g: int) -> int:
    return max(n + g, -(-int(n * (1 + STEP)) // g) * g)


def _down(n: int, g: int) -> int:
    return min(n - g, int(n / (1 + STEP)) // g * g)


def _why(p: Point) -> str:
    if p.status == "ok":
        return "over budget"
    return "planner: over budget" if p.status == "skipped" else p.status


def _double(lo: int, start: int, top: int, g: int, probe: Callable[[int], Point]) -> tuple[int, int | None]:
    """Double from the best fit (or start) until a point does not fit or `top` is passed."""
    n = max(lo * 2, _round(start, g)) if lo else _round(start, g)
    while n <= top:
        if not probe(n).fits:
            return lo, n
        lo, n = n, n * 2
    return lo, None


def _bracket(lo: int, seed: int, top: int, g: int, probe: Callable[[int], Point]) -> tuple[int, int | None]:
    """Probe the planner's longest context, then step by STEP up (it fits) or down (it does not)."""
    n = _round(seed, g) if seed > lo else _up(lo, g)
    if n > top:
        return lo, None
    if probe(n).fits:
        lo = n
        while (n := _up(lo, g)) <= top:
            if not probe(n).fits:
                return lo, n
            lo = n
        return lo, None
    hi = n
    while (n := _down(hi, g)) > lo:
        if probe(n).fits:
            return n, hi
        hi = n
    return lo, hi


def max_context_search(spec: SweepSpec, scheme: str, world: int, known: list[Point],
                       run: Callable[[int], Point], seed: int | None = None) -> dict:
    """Largest N whose measured point fits the budget, to search.granularity tokens.

    Without `seed`: doubling from the best known fit (or search.start). With
    `seed`, the planner's predicted longest context: the first probe is there
    and the bracket moves in steps of STEP, since the prediction is close. Then
    bisection. `run` may return points the planner skipped; they count as not
    fitting, which the planner only decides when it is sure (see planner_skip).
    """
    g, top = spec.search.granularity, spec.search.max
    seen = {p.n_tokens: p for p in known if p.fits is not None}

    def probe(n: int) -> Point:
        seen[n] = run(n)
        return seen[n]

    lo = max((n for n, p in seen.items() if p.fits), default=0)
    hi = min((n for n, p in seen.items() if p.fits is False and n > lo), default=None)
    if hi is None:
        lo, hi = (_double(lo, spec.search.start, top, g, probe) if seed is None
                  else _bracket(lo, seed, top, g, probe))
    while hi is not None and hi - lo > g:
        mid = _round((lo + hi) // 2, g)
        if mid <= lo or mid >= hi:
            break
        if probe(mid).fits:
            lo = mid
        else:
            hi = mid
    return {"scheme": scheme, "world": world, "max_tokens": lo, "first_failing": hi,
            "limit": _why(seen[hi]) if hi is not None else f"search.max={top} reached",
            "planned_tokens": seed, "budget_mib": spec.memory_budget_mib}


# ----------------------------------------------------------------------------- driver


def run_sweep(spec: SweepSpec, progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Run the grid, then the max-context searches; write CSV, plots and tables."""
    spec.check()
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pools = _Pools(spec)
    points: list[Point] = []
    grid = [(s, w, n) for w in spec.worlds for s in spec.schemes for n in sorted(spec.lengths)]
    bar = _Progress(len(grid), enabled=progress)
    searches: list[dict] = []
    try:
        for s, w, n in grid:
            bar.describe(f"{s} W={w} N={n}")
            p = plan_or_run(spec, pools, s, w, n)
            points.append(p)
            bar.advance()
            if log and p.status != "ok":
                log(f"sweep: {s} W={w} N={n}: {p.status} {p.error}")
        if spec.search.enabled:
            for w in spec.worlds:
                for s in spec.schemes:
                    known = [p for p in points if p.scheme == s and p.world == w]
                    if any(p.status == "invalid" for p in known):
                        continue

                    def probe(n: int, s=s, w=w) -> Point:
                        bar.add(1)
                        bar.describe(f"search {s} W={w} N={n}")
                        p = plan_or_run(spec, pools, s, w, n, phase="search")
                        points.append(p)
                        bar.advance()
                        return p
                    seed = planned_longest(spec, s, w) if spec.use_planner else None
                    searches.append(max_context_search(spec, s, w, known, probe, seed=seed))
    finally:
        bar.close()
        pools.close()
    write_csv(out / "sweep.csv", points)
    paths = {"csv": out / "sweep.csv"}
    paths.update(plot_sweep(points, out, spec))
    md = [f"# {spec.name}", "", format_points(points)]
    if searches:
        with (out / "max_context.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(searches[0]))
            w.writeheader()
            w.writerows(searches)
        paths["max_context"] = out / "max_context.csv"
        md += ["", f"Maximum context per rank budget of {spec.memory_budget_mib} MiB:", "",
               format_max_context(searches)]
    (out / "sweep.md").write_text("\n".join(md) + "\n")
    paths["md"] = out / "sweep.md"
    (out / "sweep.json").write_text(json.dumps({"spec": asdict(spec), "points": [asdict(p) for p in points],
                                                "max_context": searches}, indent=2, default=str))
    paths["json"] = out / "sweep.json"
    return {"points": points, "max_context": searches, "paths": {k: str(v) for k, v in paths.items()}}


class _Progress:
    """A rich progress bar on stderr (points done / points known so far); silent when disabled."""

    def __init__(self, total: int, enabled: bool = True):
        self._p = None
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn)
        except ImportError:  # pragma: no cover - rich is a dependency
            return
        self._p = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           TextColumn("{task.description}"), console=Console(stderr=True), transient=False)
        self._p.start()
        self._t = self._p.add_task("", total=total)

    def describe(self, text: str) -> None:
        if self._p:
            self._p.update(self._t, description=text)

    def advance(self) -> None:
        if self._p:
            self._p.advance(self._t)

    def add(self, n: int) -> None:
        if self._p:
            task = self._p.tasks[0]
            self._p.update(self._t, total=(task.total or 0) + n)

    def close(self) -> None:
        if self._p:
            self._p.stop()


# ----------------------------------------------------------------------------- CLI


def add_parser(sub):
    from distattn.cli_args import HelpFormatter
    p = sub.add_parser("sweep", formatter_class=HelpFormatter,
                       help="context-length scaling: schemes x lengths x world sizes; CSV, throughput and "
                            "memory plots, maximum context under a memory budget")
    p.add_argument("sweep", metavar="SWEEP", help="sweep YAML (see configs/sweeps/example.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the sweep YAML, e.g. --set lengths=[2048,4096] or "
                        "--set search.max=65536 (repeatable)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: the YAML's out_dir)")
    p.add_argument("--no-search", action="store_true", help="skip the maximum-context search")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_sweep)
    return p


def cmd_sweep(args) -> int:
    """Everything is checked (file, keys, overrides) before any rank starts; ConfigError exits 2."""
    over: dict[str, Any] = {}
    if args.out:
        over["out_dir"] = args.out
    spec = load_sweep(args.sweep, over, sets=args.overrides)
    if args.no_search:
        spec.search.enabled = False
    res = run_sweep(spec, progress=not args.no_progress,
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_points(res["points"]))
    if res["max_context"]:
        print()
        print(format_max_context(res["max_context"]))
    for k, v in sorted(res["paths"].items()):
        print(f"{k}: {v}")
    return 0
