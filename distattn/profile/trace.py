"""Chrome-trace parsing and the interval algebra behind the overlap numbers.

A trace (``torch.profiler`` ``export_chrome_trace``, plain or ``.json.gz``) is
reduced to four interval sets per rank, each a union of ``[start, end)`` spans
in trace microseconds:

``compute``
    CPU traces: the ``compute/*`` regions the kernels label
    (:mod:`distattn.profile.labels`). GPU traces: every device kernel that is
    not a communication kernel.
``transfer``
    CPU traces: the backend's own records of a transfer in flight, ``gloo:*``
    events (collectives run on gloo's worker thread; p2p ``gloo:send`` /
    ``gloo:recv`` span post to completion as seen by ``wait()``). GPU traces:
    NCCL kernels (names matching :data:`NCCL_KERNEL`, as HTA does).
``blocked``
    ``comm_wait/*`` regions: host time the caller sat waiting on communication,
    the same spans the :class:`~distattn.comm.CommLedger` records as exposed.
``issue``
    ``comm/*`` regions: the host calls that issued communication.

From those, per rank:

- communication = |transfer ∪ blocked| (a rank blocked on a peer is
  communicating even when the backend logged nothing, e.g. a late sender);
- exposed = |blocked| on CPU traces (host time lost to communication), and
  |transfer − compute| on GPU traces (NCCL time with no compute kernel running);
- overlap ratio = 1 − exposed / communication, in [0, 1]; NaN with no
  communication.

Every quantity is a measure of a union, so nested or repeated labels never
count twice. The analysis window is the union of ``distattn/step#*`` regions
when the runner wrote them (the profiled training steps), else the whole trace.
"""
from __future__ import annotations

import gzip
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from distattn.profile.labels import COMM, COMM_WAIT, COMPUTE

Interval = tuple[float, float]

__all__ = [
    "Interval", "union", "measure", "intersect", "subtract", "clip",
    "TraceEvent", "RankTrace", "load_trace", "parse_trace", "Classifier", "RankAnalysis",
    "analyze", "NCCL_KERNEL", "GLOO_EVENT", "STEP_PREFIX", "SCHEME_KEY",
]

STEP_PREFIX = "distattn/step#"
SCHEME_KEY = "distattn_scheme"  # trace metadata: the scheme `distattn profile` ran
# NCCL kernels as HTA matches them (older versions missed ncclDevKernel_*; this regex does not)
NCCL_KERNEL = r"(^nccl)|(ncclKernel)|(ncclDevKernel)"
GLOO_EVENT = r"^gloo:"
GPU_KERNEL_CATS = ("kernel",)
GPU_ANNOTATION = "gpu_user_annotation"  # a host label's copy on the device timeline


# ----------------------------------------------------------------------------- interval algebra


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint, merged spans covering the same points (empty spans dropped)."""
    spans = sorted((float(a), float(b)) for a, b in intervals if b > a)
    out: list[Interval] = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def measure(intervals: Iterable[Interval]) -> float:
    """Length of the union."""
    return sum(b - a for a, b in union(intervals))


def intersect(a: Iterable[Interval], b: Iterable[Interval]) -> list[Interval]:
    """Points in both unions, as a union."""
    ua, ub = union(a), union(b)
    out: list[Interval] = []
    i = j = 0
    while i < len(ua) and j < len(ub):
        lo = max(ua[i][0], ub[j][0])
        hi = min(ua[i][1], ub[j][1])
        if hi > lo:
            out.append((lo, hi))
        if ua[i][1] < ub[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Iterable[Interval], b: Iterable[Interval]) -> list[Interval]:
    """Points in a's union and not in b's."""
    ub = union(b)
    out: list[Interval] = []
    for lo, hi in union(a):
        cur = lo
        for blo, bhi in ub:
            if bhi <= cur:
                continue
            if blo >= hi:
                break
            if blo > cur:
                out.append((cur, blo))
            cur = max(cur, bhi)
            if cur >= hi:
                break
        if cur < hi:
            out.append((cur, hi))
    return out


def clip(intervals: Iterable[Interval], window: Sequence[Interval] | None) -> list[Interval]:
    """The union restricted to a window (itself a union); None keeps everything."""
    return union(intervals) if window is None else intersect(intervals, window)


# ----------------------------------------------------------------------------- traces


@dataclass
class TraceEvent:
    """A complete ("ph": "X") event."""

    name: str
    ts: float
    dur: float
    cat: str = ""
    pid: Any = 0
    tid: Any = 0
    args: dict = field(default_factory=dict)

    @property
    def end(self) -> float:
        return self.ts + self.dur

    @property
    def span(self) -> Interval:
        return (self.ts, self.ts + self.dur)


@dataclass
class RankTrace:
    rank: int
    events: list[TraceEvent]
    meta: dict = field(default_factory=dict)
    path: str = ""

    @property
    def has_gpu_kernels(self) -> bool:
        return any(e.cat in GPU_KERNEL_CATS for e in self.events)


def parse_trace(data: dict, rank: int | None = None, path: str = "") -> RankTrace:
    """A Chrome-trace dict -> RankTrace; the rank comes from ``distributedInfo`` unless given."""
    raw = data.get("traceEvents", data if isinstance(data, list) else [])
    events = []
    for e in raw:
        if e.get("ph") != "X" or "dur" not in e or "ts" not in e:
            continue
        events.append(TraceEvent(name=str(e.get("name", "")), ts=float(e["ts"]), dur=float(e["dur"]),
                                 cat=str(e.get("cat", "")), pid=e.get("pid", 0), tid=e.get("tid", 0),
                                 args=e.get("args") or {}))
    info = data.get("distributedInfo") or {} if isinstance(data, dict) else {}
    if rank is None:
        rank = int(info.get("rank", 0))
    meta = {k: v for k, v in data.items() if k != "traceEvents"} if isinstance(data, dict) else {}
    return RankTrace(rank=rank, events=events, meta=meta, path=path)


def load_trace(path: str | Path, rank: int | None = None) -> RankTrace:
    """Read a Chrome trace (``.json`` or ``.json.gz``)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return parse_trace(data, rank=rank, path=str(path))


# ----------------------------------------------------------------------------- classification


@dataclass
class Classifier:
    """Which event names are compute, transfers, blocking waits and issues (regexes)."""

    compute: str = "^" + re.escape(COMPUTE)
    blocked: str = "^" + re.escape(COMM_WAIT)
    issue: str = "^" + re.escape(COMM)
    transfer_cpu: str = GLOO_EVENT
    comm_kernel: str = NCCL_KERNEL

    def __post_init__(self):
        self._re = {k: re.compile(getattr(self, k)) for k in
                    ("compute", "blocked", "issue", "transfer_cpu", "comm_kernel")}

    def match(self, kind: str, name: str) -> bool:
        return self._re[kind].search(name) is not None


def _op_of(name: str, prefix: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) else name


@dataclass
class RankAnalysis:
    """Interval totals of one rank, in seconds; ``mode`` says which definitions applied."""

    rank: int
    mode: str  # "cpu" | "gpu"
    window_s: float
    compute_s: float
    comm_s: float
    exposed_s: float
    overlap: float
    blocked_s: float  # host time in comm_wait (both modes)
    transfer_s: float  # backend transfer records (gloo events / NCCL kernels)
    comm_compute_overlap_s: float  # |communication ∩ compute|
    compute_by_kind: dict[str, float] = field(default_factory=dict)
    waits_by_op: dict[str, dict[str, float]] = field(default_factory=dict)  # op -> calls, blocked_s
    issues_by_op: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    lanes: dict[str, list[Interval]] = field(default_factory=dict, repr=False)  # for timelines, in s
    t0_us: float = 0.0

    def as_dict(self, lanes: bool = False) -> dict:
        d = asdict(self)
        if not lanes:
            d.pop("lanes")
        return d


def _window(trace: RankTrace, device: bool = False) -> list[Interval] | None:
    """Union of the step regions: their host copies, or (device=True) their device-timeline copies."""
    steps = [e.span for e in trace.events if e.name.startswith(STEP_PREFIX)
             and (e.cat == GPU_ANNOTATION) == device]
    return union(steps) if steps else None


def analyze(trace: RankTrace, classifier: Classifier | None = None, mode: str = "auto",
            keep_lanes: bool = True) -> RankAnalysis:
    """Compute, communication, exposed time and overlap of one rank's trace.

    ``mode``: "cpu" (host labels + gloo events), "gpu" (device kernels, NCCL as
    communication) or "auto" (gpu when the trace holds device kernels).
    """
    cl = classifier or Classifier()
    if mode == "auto":
        mode = "gpu" if trace.has_gpu_kernels else "cpu"
    if mode not in ("cpu", "gpu"):
        raise ValueError(f"mode must be 'auto', 'cpu' or 'gpu', got {mode!r}")
    window = host_window = _window(trace)
    compute_ev, transfer_ev, blocked_ev, issue_ev = [], [], [], []
    for e in trace.events:
        if mode == "gpu" and e.cat in GPU_KERNEL_CATS:
            (transfer_ev if cl.match("comm_kernel", e.name) else compute_ev).append(e)
            continue
        if e.cat in GPU_KERNEL_CATS or e.cat == GPU_ANNOTATION:
            continue
        if cl.match("blocked", e.name):
            blocked_ev.append(e)
        elif cl.match("issue", e.name):
            issue_ev.append(e)
        elif mode == "cpu" and cl.match("compute", e.name):
            compute_ev.append(e)
        elif mode == "cpu" and cl.match("transfer_cpu", e.name):
            transfer_ev.append(e)
    if mode == "gpu":
        # device work runs after its host launch: the device copies of the step regions bound it,
        # else the span of the kernels themselves
        kernels = [e.span for e in compute_ev + transfer_ev]
        window = _window(trace, device=True) or (
            [(min(a for a, _ in kernels), max(b for _, b in kernels))] if kernels else host_window)

    def inside(evs: list[TraceEvent]) -> list[TraceEvent]:  # host events of the profiled steps
        if host_window is None:
            return evs
        lo, hi = host_window[0][0], host_window[-1][1]
        return [e for e in evs if e.end > lo and e.ts < hi]

    compute = clip((e.span for e in compute_ev), window)
    transfer = clip((e.span for e in transfer_ev), window)
    blocked = clip((e.span for e in blocked_ev), host_window)
    comm = union(transfer + blocked)
    if mode == "cpu":
        exposed = measure(blocked)
    else:
        exposed = measure(subtract(comm, compute))
    comm_len = measure(comm)
    overlap = 1.0 - exposed / comm_len if comm_len > 0 else math.nan
    if window is not None:
        span = measure(window)
        t0 = window[0][0]
    else:
        allspans = [e.span for e in trace.events]
        t0 = min((a for a, _ in allspans), default=0.0)
        span = max((b for _, b in allspans), default=0.0) - t0
    by_kind: dict[str, list[Interval]] = {}
    for e in compute_ev:
        kind = _op_of(e.name, COMPUTE) if mode == "cpu" else "kernel"
        by_kind.setdefault(kind, []).append(e.span)
    waits: dict[str, dict[str, float]] = {}
    for e in inside(blocked_ev):
        w = waits.setdefault(_op_of(e.name, COMM_WAIT), {"calls": 0, "blocked_s": 0.0})
        w["calls"] += 1
        w["blocked_s"] += e.dur * 1e-6
    issues: dict[str, int] = {}
    for e in inside(issue_ev):
        op = _op_of(e.name, COMM)
        issues[op] = issues.get(op, 0) + 1
    us = 1e-6

    def rel(iv: list[Interval]) -> list[Interval]:
        return [((a - t0) * us, (b - t0) * us) for a, b in iv]

    lanes = {}
    if keep_lanes:
        lanes = {"compute": rel(compute), "transfer": rel(transfer), "blocked": rel(blocked)}
        for kind, spans in by_kind.items():
            lanes["compute:" + kind] = rel(clip(spans, window))
    return RankAnalysis(
        rank=trace.rank, mode=mode, window_s=span * us, compute_s=measure(compute) * us,
        comm_s=comm_len * us, exposed_s=exposed * us, overlap=overlap, blocked_s=measure(blocked) * us,
        transfer_s=measure(transfer) * us, comm_compute_overlap_s=measure(intersect(comm, compute)) * us,
        compute_by_kind={k: measure(clip(v, window)) * us for k, v in sorted(by_kind.items())},
        waits_by_op=waits, issues_by_op=issues,
        steps=sum(1 for e in trace.events if e.name.startswith(STEP_PREFIX) and e.cat != GPU_ANNOTATION),
        lanes=lanes, t0_us=t0)
