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
import ctypes
import json
import math
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable
from distattn.bench.rss import peak_bytes, reset_peak, trim_heap
from distattn.comm import Comm

__all__ = ["SweepSpec", "Point", "load_sweep", "run_point_on_ranks", "run_sweep", "add_parser"]

LINEAR = ("lasp2", "lasp1")
DTYPES = ("fp32", "bf16")


# ----------------------------------------------------------------------------- spec


@dataclass
class SearchSpec:
    enabled: bool = True
    start: int = 4096
    max: int = 1 << 20
    granularity: int = 1024


@dataclass
class SweepSpec:
    name: str = "sweep"
    out_dir: str = "runs/sweeps/latest"
    schemes: list[str] = field(default_factory=lambda: ["ring", "allgather"])
    lengths: list[int] = field(default_factory=lambda: [2048, 4096])
    worlds: list[int] = field(default_factory=lambda: [2])
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    dtype: str = "fp32"
    causal: bool = True
    iters: int = 2
    warmup: int = 1
    threads: int = 1
    backend: str = "auto"  # auto | gloo | nccl
    timeout_s: float = 600.0
    memory_budget_mib: float | None = None
    use_planner: bool = True  # skip points the planner rules out; seed the search with its longest context
    plan_margin: float = 0.15  # skip only when predicted * (1 - plan_margin) > budget
    search: SearchSpec = field(default_factory=SearchSpec)

    def check(self) -> None:
        problems = []
        from distattn.schemes import scheme_names
        known = set(scheme_names())
        for s in self.schemes:
            base = s.partition("@")[0].partition(":")[0]
            if base not in known:
                problems.append(f"schemes: {s!r} is not a scheme; choose from {', '.join(sorted(known))} "
                                f"(usp:U for a ulysses degree, NAME@LAYOUT for a layout)")
        for key in ("lengths", "worlds"):
            vals = getattr(self, key)
            if not vals or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in vals):
                problems.append(f"{key}: expected a non-empty list of positive integers, got {vals!r}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.heads % self.kv_heads:
            problems.append(f"heads={self.heads} is not divisible by kv_heads={self.kv_heads}")
        if self.iters < 1 or self.warmup < 0:
            problems.append("iters must be >= 1 and warmup >= 0")
        if self.backend not in ("auto", "gloo", "nccl"):
            problems.append(f"backend: {self.backend!r} is not one of auto, gloo, nccl")
        if self.search.enabled and self.memory_budget_mib is None:
            problems.append("search.enabled needs memory_budget_mib (the per-rank budget the search fits)")
        if self.search.granularity < 1 or self.search.start < 1 or self.search.max < self.search.start:
            problems.append("search: need granularity >= 1 and 1 <= start <= max")
        if isinstance(self.plan_margin, bool) or not isinstance(self.plan_margin, (int, float)) \
                or not 0 <= self.plan_margin < 1:
            problems.append(f"plan_margin: {self.plan_margin!r} must be a number in [0, 1), the fraction "
                            f"by which the planner may over-predict (0.15: skip a point only when 85% "
                            f"of its prediction is over budget)")
        if problems:
            raise ValueError("; ".join(problems))


def load_sweep(path: str | Path, overrides: dict | None = None) -> SweepSpec:
    """Read a sweep YAML (keys of :class:`SweepSpec`, ``search`` a nested mapping)."""
    import yaml
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sweep keys")
    data.update(overrides or {})
    search = data.pop("search", None) or {}
    known = set(SweepSpec.__dataclass_fields__) - {"search"}
    bad = sorted(set(data) - known)
    if bad:
        raise ValueError(f"{path}: unknown key(s) {bad}; valid keys are {sorted(known | {'search'})}")
    sknown = set(SearchSpec.__dataclass_fields__)
    sbad = sorted(set(search) - sknown)
    if sbad:
        raise ValueError(f"{path}: unknown search key(s) {sbad}; valid keys are {sorted(sknown)}")
    spec = SweepSpec(**data, search=SearchSpec(**search))
    spec.check()
    return spec


# ----------------------------------------------------------------------------- one point


@dataclass
class Point:
    scheme: str
    world: int
    n_tokens: int
    phase: str = "grid"  # grid | search
    status: str = "ok"  # ok | oom | failed | timeout | invalid | skipped (by the planner)
    step_s: float = math.nan
    tokens_per_s: float = math.nan
    compute_s: float = math.nan
    bytes_sent: int = 0
    exposed_s: float = math.nan
    peak_mem_bytes: int = 0
    predicted_mem_bytes: int | None = None  # the planner's peak (distattn.plan.attention); None: no model
    peak_rss_bytes: int = 0
    mem_source: str = ""
    fits: bool | None = None
    error: str = ""


def _scheme(name: str):
    """'ring', 'usp:2' (ulysses degree), 'ring@contiguous' (layout)."""
    from distattn.plan.attention import build_scheme
    return build_scheme(name)


class _MemProbe:
    """Peak memory of this process over a block (see the module docstring)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.source = ""

    def start(self) -> None:
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.source = "cuda_allocator"
            return
        trim_heap()
        self.base, self.source = reset_peak()

    def peak(self) -> tuple[int, int]:
        """(peak - base, absolute peak) in bytes."""
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            p = torch.cuda.max_memory_allocated()
            return max(0, p - self.base), p
        p = peak_bytes(self.source)
        return max(0, p - self.base), p


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_TRACK = {"mmap": 64 << 10, "trim": 0}            # every tensor mmapped, returned when freed
_DEFAULT = {"mmap": 32 << 20, "trim": 64 << 20}   # glibc's dynamic thresholds at their ceiling


def _malloc_tracks_tensors(on: bool) -> bool:
    """Make freed tensors leave the resident set at once (on), or restore glibc's usual reuse.

    glibc raises its mmap threshold after the first large free; from then on a
    freed tensor stays in the heap and VmHWM reports the allocator's
    high-water mark, which depends on allocation order and history (two ranks
    running the same code differ by 20%). With the threshold pinned at 64 KiB
    and trimming at once, the resident peak is the peak of live tensor bytes:
    what the planner predicts and what a GPU allocator's peak reports. Every
    allocation then pays fresh page faults, so timed passes run with the
    thresholds at glibc's dynamic ceiling instead. False where there is no glibc.
    """
    vals = _TRACK if on else _DEFAULT
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, vals["mmap"])
                    and libc.mallopt(_M_TRIM_THRESHOLD, vals["trim"]))
    except (OSError, AttributeError):
        return False


_MEM_GROUP: list = []


def _memory_group():
    """A process group (over all ranks) used only by memory passes.

    Gloo runs collectives on its own worker threads, whose glibc arenas keep
    the free space that timed passes leave at their top (malloc_trim does not
    return it for threads other than the main one); a memory pass on those
    threads would reuse it without growing the resident set and be
    under-counted. This group's threads only ever allocate with glibc returning
    memory at once. Made on first use, by every rank in the same call.
    """
    import torch.distributed as dist
    if not _MEM_GROUP:
        _MEM_GROUP.append(dist.new_group(backend=dist.get_backend()))
    return _MEM_GROUP[0]


def _on_fresh_thread(fn: Callable[[], Any]) -> Any:
    """fn() on a new thread, its exception re-raised here.

    A new thread allocates from its own glibc arena, which the timed passes on
    the main thread never filled. In the main arena, chunks those passes freed
    would be reused before any new mapping and stay resident after their next
    free, whatever the mmap threshold, so the peak would again be a
    high-water mark rather than live bytes.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            box["error"] = e

    t = threading.Thread(target=run, name="distattn-memory-pass")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


_WARM_TOKENS = 2048  # per rank: large enough for the kernels' largest tiles (>= 768 query rows)
_WARM: set[str] = set()  # schemes this process has already run once (lazy one-time allocations done)


def _rank_point(spec_dict: dict, scheme_name: str, n_tokens: int, _warming: bool = False) -> dict:
    """Rank side of one point: make the local shard, time fwd+bwd, measure memory.

    The first time a process runs a scheme it first runs a tiny point of it and
    one of 2048 tokens per rank, so one-time allocations (thread pools, backend
    buffers, lazily loaded kernels, and the code the CPU flash kernel generates
    for its large bf16 tiles, ~2 MiB per tile shape) are resident before the
    memory baseline is taken and are not charged to the point.
    """
    import torch
    import torch.distributed as dist

    import distattn
    from distattn.comm import CommLedger

    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    s = SweepSpec(**{k: v for k, v in spec_dict.items() if k != "search"})
    cuda = torch.cuda.is_available() and dist.get_backend() == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[s.dtype]
    try:
        scheme = _scheme(scheme_name)
        scheme.validate(heads=s.heads, kv_heads=s.kv_heads, world=world)
        local = scheme.layout(n_tokens, world).size(rank)
    except ValueError as e:
        return {"status": "invalid", "error": str(e)}
    linear = scheme.kind == "linear"
    if not _warming and scheme_name not in _WARM:
        for small in sorted({min(n_tokens, 64 * world), min(n_tokens, _WARM_TOKENS * world)}):
            _rank_point({**spec_dict, "iters": 1, "warmup": 0}, scheme_name, small, _warming=True)
        _WARM.add(scheme_name)
    ledger = CommLedger()
    scale = 0.3 if linear else 1.0  # keeps linear-attention sums (no normalisation) in range

    def make_inputs():
        g = torch.Generator(device=dev).manual_seed(1000 + rank)

        def rnd(h):
            return torch.randn(local, h, s.head_dim, generator=g, device=dev, dtype=torch.float32).to(dt)

        return rnd(s.heads) * scale, rnd(s.kv_heads) * scale, rnd(s.kv_heads), rnd(s.heads)

    def step(q, k, v, do, group=group):
        a, b, c = (x.detach().requires_grad_(True) for x in (q, k, v))
        if linear:
            out = distattn.linear_attention(a, b, c, scheme=scheme, group=group, ledger=ledger,
                                            n_tokens=n_tokens)
        else:
            out = distattn.attention(a, b, c, scheme=scheme, group=group, causal=s.causal, ledger=ledger,
                                     n_tokens=n_tokens)
        out.backward(do)
        if cuda:
            torch.cuda.synchronize()

    probe = _MemProbe(cuda)

    def memory_pass():
        """The inputs and one untimed fwd+bwd under the probe, glibc returning freed memory."""
        tracking = not cuda and _malloc_tracks_tensors(True)
        try:
            probe.start()
            x = make_inputs()
            step(*x, group=group if cuda else _memory_group())
            return x, probe.peak()
        finally:
            if tracking:
                _malloc_tracks_tensors(False)

    inputs, (mem, peak) = memory_pass() if cuda else _on_fresh_thread(memory_pass)
    for _ in range(s.warmup):
        step(*inputs)
    ledger.reset()
    walls, cpus = [], []
    for _ in range(s.iters):
        Comm(group).barrier()
        c0, w0 = time.thread_time(), time.perf_counter()
        step(*inputs)
        cpus.append(time.thread_time() - c0)
        walls.append(time.perf_counter() - w0)
    if cuda:  # the allocator's peak covers the timed passes too
        mem, peak = probe.peak()
    tot = ledger.totals()
    return {"status": "ok", "step_s": statistics.median(walls), "compute_s": statistics.median(cpus),
            "bytes_sent": tot.bytes_sent // s.iters, "exposed_s": tot.exposed_s / s.iters,
            "peak_mem_bytes": mem, "peak_rss_bytes": peak, "mem_source": probe.source}


def _classify_failure(msg: str) -> str:
    low = msg.lower()
    if any(t in low for t in ("out of memory", "memoryerror", "can't allocate", "cannot allocate",
                              "bad_alloc", "exit codes [-9]", "exit codes [137]")):
        return "oom"
    if "timed out" in low or "timeout" in low:
        return "timeout"
    return "failed"


class _Pools:
    """One RankPool per world size, replaced after a failure."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.pools: dict[int, Any] = {}

    def backend(self) -> str:
        import torch
        if self.spec.backend != "auto":
            return self.spec.backend
        return "nccl" if torch.cuda.is_available() else "gloo"

    def get(self, world: int):
        from distattn.multiproc import RankPool
        p = self.pools.get(world)
        if p is None or not p.alive:
            p = self.pools[world] = RankPool(world, backend=self.backend(), threads=self.spec.threads)
        return p

    def drop(self, world: int) -> None:
        p = self.pools.pop(world, None)
        if p is not None:
            p.close(force=True)

    def close(self) -> None:
        for p in self.pools.values():
            p.close()
        self.pools.clear()


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


# ----------------------------------------------------------------------------- outputs


_COLS = [f for f in Point.__dataclass_fields__]


def write_csv(path: Path, points: list[Point]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_COLS)
        for p in points:
            w.writerow([getattr(p, c) for c in _COLS])


def plot_sweep(points: list[Point], out: Path, spec: SweepSpec) -> dict[str, Path]:
    """throughput.png (wall-clock and critical-path-compute tokens/s) and memory.png vs N.

    One line per scheme, one column of panels per world size; failed points
    are marked by dotted vertical lines.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted({p.world for p in points})
    schemes = list(dict.fromkeys(p.scheme for p in points))
    colors = {s: f"C{i}" for i, s in enumerate(schemes)}
    panels = {
        "throughput": [("tokens_per_s", "tokens/s, wall clock"),
                       ("cpu_tokens_per_s", "tokens/s, critical-path compute")],
        "memory": [("peak_mem_bytes", "peak memory per rank (MiB; dashed: planner)")],
    }
    paths = {}
    for what, rows in panels.items():
        fig, axes = plt.subplots(len(rows), len(worlds), figsize=(max(6.5, 4.0 * len(worlds) + 1.0),
                                                                  0.9 + 2.7 * len(rows)),
                                 squeeze=False, sharex=True)
        for col, w in enumerate(worlds):
            for row, (key, ylabel) in enumerate(rows):
                ax = axes[row][col]
                for s in schemes:
                    pts = sorted((p for p in points if p.scheme == s and p.world == w and p.status == "ok"),
                                 key=lambda p: p.n_tokens)
                    if not pts:
                        continue
                    if key == "cpu_tokens_per_s":
                        ys = [p.n_tokens / p.compute_s if p.compute_s > 0 else math.nan for p in pts]
                    elif key == "peak_mem_bytes":
                        ys = [p.peak_mem_bytes / 2**20 for p in pts]
                    else:
                        ys = [getattr(p, key) for p in pts]
                    ax.plot([p.n_tokens for p in pts], ys, marker="o", ms=3, color=colors[s], label=s)
                    if key == "peak_mem_bytes":
                        _plot_predicted(ax, points, s, w, colors[s])
                    for p in points:
                        if p.scheme == s and p.world == w and p.status != "ok":
                            ax.axvline(p.n_tokens, color=colors[s], lw=0.6, ls=":")
                if key == "peak_mem_bytes" and spec.memory_budget_mib:
                    ax.axhline(spec.memory_budget_mib, color="red", lw=0.8, ls="--", label="budget")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.tick_params(labelsize=7)
                ax.grid(alpha=0.3, which="both")
                if col == 0:
                    ax.set_ylabel(ylabel, fontsize=8)
                if row == 0:
                    ax.set_title(f"W = {w}", fontsize=9)
                if row == len(rows) - 1:
                    ax.set_xlabel("context length N (tokens)", fontsize=8)
        if axes[0][-1].get_legend_handles_labels()[0]:
            axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{spec.name}: {what} vs N\n{spec.heads}/{spec.kv_heads} heads x {spec.head_dim}, "
                     f"{spec.dtype}, one attention layer fwd+bwd", fontsize=9)
        fig.tight_layout()
        path = out / f"{what}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths[what] = path
    return paths


def _plot_predicted(ax, points: list[Point], scheme: str, world: int, color: str) -> None:
    """The planner's prediction as a dashed line under the measured one, skipped points included."""
    pred = sorted({p.n_tokens: p.predicted_mem_bytes for p in points
                   if p.scheme == scheme and p.world == world and p.predicted_mem_bytes}.items())
    if pred:
        ax.plot([n for n, _ in pred], [b / 2**20 for _, b in pred], ls="--", lw=0.8, color=color)


def format_points(points: list[Point]) -> str:
    """One row per point; peak MiB is measured, pred MiB the planner's (meas/pred their ratio)."""
    lines = ["| scheme | W | N | phase | status | step ms | tokens/s | compute ms | MiB sent | exposed ms "
             "| peak MiB | pred MiB | meas/pred | fits |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in points:
        f = (lambda x, nd=1: "n/a" if x != x else f"{x:.{nd}f}")
        ok = p.status == "ok"
        pred = p.predicted_mem_bytes
        ratio = f"{p.peak_mem_bytes / pred:.2f}" if ok and pred else "-"
        lines.append(f"| {p.scheme} | {p.world} | {p.n_tokens} | {p.phase} | {p.status} | {f(p.step_s * 1e3)} | "
                     f"{f(p.tokens_per_s, 0)} | {f(p.compute_s * 1e3)} | {p.bytes_sent / 2**20:.2f} | "
                     f"{f(p.exposed_s * 1e3)} | {f'{p.peak_mem_bytes / 2**20:.1f}' if ok else '-'} | "
                     f"{'n/a' if pred is None else f'{pred / 2**20:.1f}'} | {ratio} | "
                     f"{'' if p.fits is None else ('yes' if p.fits else 'no')} |")
    return "\n".join(lines)


def format_max_context(rows: list[dict]) -> str:
    lines = ["| scheme | W | max N within budget | planner's max N | first N that did not fit | why |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        planned = r.get("planned_tokens")
        lines.append(f"| {r['scheme']} | {r['world']} | {r['max_tokens'] or 'none'} | "
                     f"{'-' if planned is None else planned} | "
                     f"{r['first_failing'] if r['first_failing'] is not None else '-'} | {r['limit']} |")
    return "\n".join(lines)


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
    p = sub.add_parser("sweep", help="context-length scaling: schemes x lengths x world sizes; CSV, "
                                     "throughput and memory plots, maximum context under a memory budget")
    p.add_argument("sweep", help="sweep YAML (see configs/sweeps/example.yaml)")
    p.add_argument("--out", default=None, help="output directory (default: the YAML's out_dir)")
    p.add_argument("--no-search", action="store_true", help="skip the maximum-context search")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_sweep)
    return p


def cmd_sweep(args) -> int:
    over: dict[str, Any] = {}
    if args.out:
        over["out_dir"] = args.out
    try:
        spec = load_sweep(args.sweep, over)
    except (ValueError, TypeError, OSError) as e:
        print(f"distattn sweep: {e}", file=sys.stderr)
        return 2
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
