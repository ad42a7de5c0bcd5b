"""Overlap reports: per rank and per scheme, cross-checked against the ledger.

A row per (scheme, rank) holds the trace's interval totals
(:class:`~distattn.profile.trace.RankAnalysis`) next to what the rank's
:class:`~distattn.comm.CommLedger` recorded over the same steps. The ledger and
the trace measure the blocked time independently (``time.perf_counter`` around
the wait vs the profiler's clock around the same region), so they should agree
to within the label overhead; the call counts must agree exactly. A scheme's
summary takes the maximum over ranks (the critical path) for times and the
pooled ratio 1 − Σexposed / Σcommunication for the overlap.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from distattn.profile.trace import RankAnalysis

__all__ = ["RankRow", "SchemeSummary", "build_rows", "summarize", "format_report", "write_report"]


@dataclass
class RankRow:
    scheme: str
    rank: int
    mode: str
    steps: int
    window_ms: float
    compute_ms: float
    comm_ms: float
    exposed_ms: float
    overlap: float
    blocked_ms: float
    transfer_ms: float
    ledger_exposed_ms: float
    ledger_calls: int
    trace_waits: int
    exposed_vs_ledger: float  # trace blocked / ledger exposed - 1 (NaN without ledger time)
    bytes_sent: int
    compute_by_kind_ms: dict[str, float] = field(default_factory=dict)
    ops: dict[str, dict[str, float]] = field(default_factory=dict)  # op -> trace/ledger calls and ms
    has_ledger: bool = True  # False for traces analysed alone (--analyze): ledger columns are n/a


@dataclass
class SchemeSummary:
    scheme: str
    ranks: int
    compute_ms: float  # max over ranks
    comm_ms: float  # max over ranks
    exposed_ms: float  # max over ranks
    overlap: float  # 1 - sum exposed / sum comm
    overlap_min: float  # worst rank
    bytes_sent: int  # max over ranks
    ledger_agrees: bool | None  # every rank: call counts equal, blocked time within tolerance; None: no ledger


def _ms(s: float) -> float:
    return s * 1e3


def build_rows(scheme: str, analyses: Sequence[RankAnalysis], ledgers: Sequence[dict] | None) -> list[RankRow]:
    """One row per rank; ``ledgers[r]`` is ``{"ops": {op: {calls, bytes_sent, exposed_s}}}``."""
    rows = []
    for i, a in enumerate(analyses):
        have = ledgers is not None and i < len(ledgers) and ledgers[i] is not None
        led = ledgers[i] if have else {"ops": {}}
        ops = led.get("ops", {})
        l_exp = sum(o.get("exposed_s", 0.0) for o in ops.values())
        l_calls = sum(int(o.get("calls", 0)) for o in ops.values())
        l_bytes = sum(int(o.get("bytes_sent", 0)) for o in ops.values())
        t_waits = sum(int(w["calls"]) for w in a.waits_by_op.values())
        t_blocked = sum(w["blocked_s"] for w in a.waits_by_op.values())
        per_op = {}
        for op in sorted(set(ops) | set(a.waits_by_op)):
            w, o = a.waits_by_op.get(op, {}), ops.get(op, {})
            per_op[op] = {"trace_waits": int(w.get("calls", 0)), "blocked_ms": _ms(w.get("blocked_s", 0.0)),
                          "ledger_calls": int(o.get("calls", 0)),
                          "ledger_exposed_ms": _ms(o.get("exposed_s", 0.0)),
                          "bytes_sent": int(o.get("bytes_sent", 0))}
        rows.append(RankRow(
            scheme=scheme, rank=a.rank, mode=a.mode, steps=a.steps, window_ms=_ms(a.window_s),
            compute_ms=_ms(a.compute_s), comm_ms=_ms(a.comm_s), exposed_ms=_ms(a.exposed_s),
            overlap=a.overlap, blocked_ms=_ms(a.blocked_s), transfer_ms=_ms(a.transfer_s),
            ledger_exposed_ms=_ms(l_exp), ledger_calls=l_calls, trace_waits=t_waits,
            exposed_vs_ledger=(t_blocked / l_exp - 1.0) if l_exp > 0 else math.nan,
            bytes_sent=l_bytes, compute_by_kind_ms={k: _ms(v) for k, v in a.compute_by_kind.items()},
            ops=per_op, has_ledger=have))
    return rows


def summarize(rows: Sequence[RankRow], tolerance: float = 0.25, slack_ms: float = 2.0,
              slack_per_wait_ms: float = 1.0) -> SchemeSummary:
    """Critical-path summary of one scheme's rows.

    The ledger agrees when call counts match exactly and the trace's blocked
    time is within ``tolerance`` (relative) or ``slack_ms + slack_per_wait_ms``
    per wait (absolute) of the ledger's: the two clocks start a few
    microseconds apart around every wait, more when the host is busy.
    """
    tot_exp = sum(r.exposed_ms for r in rows)
    tot_comm = sum(r.comm_ms for r in rows)
    agrees = None if not any(r.has_ledger for r in rows) else all(
                 not r.has_ledger or (r.ledger_calls == r.trace_waits and
                                      abs(r.blocked_ms - r.ledger_exposed_ms)
                                      <= max(slack_ms + slack_per_wait_ms * r.trace_waits,
                                             tolerance * r.ledger_exposed_ms))
                 for r in rows)
    overlaps = [r.overlap for r in rows if r.overlap == r.overlap]
    return SchemeSummary(
        scheme=rows[0].scheme if rows else "", ranks=len(rows),
        compute_ms=max((r.compute_ms for r in rows), default=0.0),
        comm_ms=max((r.comm_ms for r in rows), default=0.0),
        exposed_ms=max((r.exposed_ms for r in rows), default=0.0),
        overlap=1.0 - tot_exp / tot_comm if tot_comm > 0 else math.nan,
        overlap_min=min(overlaps) if overlaps else math.nan,
        bytes_sent=max((r.bytes_sent for r in rows), default=0), ledger_agrees=agrees)


def _f(x: float, nd: int = 1) -> str:
    return "n/a" if x != x else f"{x:.{nd}f}"


def _check(agrees: bool | None) -> str:
    return "n/a (no ledger)" if agrees is None else ("agrees" if agrees else "DIFFERS")


def format_report(rows: Sequence[RankRow], summaries: Sequence[SchemeSummary], title: str = "") -> str:
    """Markdown tables: per rank, then per scheme."""
    out = [title] if title else []
    out += ["| scheme | rank | steps | window ms | compute ms | comm ms | exposed ms | overlap "
            "| ledger exposed ms | waits (trace/ledger) | MiB sent |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        led = r.has_ledger
        out.append(f"| {r.scheme} | {r.rank} | {r.steps} | {_f(r.window_ms)} | {_f(r.compute_ms)} | "
                   f"{_f(r.comm_ms)} | {_f(r.exposed_ms)} | {_f(r.overlap, 2)} | "
                   f"{_f(r.ledger_exposed_ms) if led else 'n/a'} | "
                   f"{r.trace_waits}/{r.ledger_calls if led else 'n/a'} | "
                   f"{f'{r.bytes_sent / 2**20:.2f}' if led else 'n/a'} |")
    out += ["", "| scheme | ranks | compute ms (max) | comm ms (max) | exposed ms (max) | overlap "
                "| worst rank | MiB sent (max) | ledger check |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in summaries:
        sent = f"{s.bytes_sent / 2**20:.2f}" if s.ledger_agrees is not None else "n/a"
        out.append(f"| {s.scheme} | {s.ranks} | {_f(s.compute_ms)} | {_f(s.comm_ms)} | {_f(s.exposed_ms)} | "
                   f"{_f(s.overlap, 2)} | {_f(s.overlap_min, 2)} | {sent} | {_check(s.ledger_agrees)} |")
    out += ["", "Blocked time per op, max over ranks (trace / ledger):", "",
            "| scheme | op | calls | blocked ms (trace) | exposed ms (ledger) | MiB sent |",
            "|---|---|---:|---:|---:|---:|"]
    for s in summaries:
        mine = [r for r in rows if r.scheme == s.scheme]
        led = any(r.has_ledger for r in mine)
        for op in sorted({op for r in mine for op in r.ops}):
            vals = [r.ops.get(op, {}) for r in mine]
            calls = max(int(v.get("ledger_calls" if led else "trace_waits", 0)) for v in vals)
            exp = _f(max(v.get("ledger_exposed_ms", 0.0) for v in vals)) if led else "n/a"
            sent = f"{max(int(v.get('bytes_sent', 0)) for v in vals) / 2**20:.2f}" if led else "n/a"
            out.append(f"| {s.scheme} | {op} | {calls} | {_f(max(v.get('blocked_ms', 0.0) for v in vals))} | "
                       f"{exp} | {sent} |")
    if any(not r.has_ledger for r in rows):
        out += ["", "n/a: no ledger (traces analysed alone); calls are the trace's waits."]
    return "\n".join(out)


def write_report(out_dir: str | Path, rows: Sequence[RankRow], summaries: Sequence[SchemeSummary],
                 extra: dict | None = None, title: str = "") -> dict[str, Path]:
    """report.json, report.csv (per rank) and report.md under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "csv": out / "report.csv", "md": out / "report.md"}
    payload = {"ranks": [asdict(r) for r in rows], "schemes": [asdict(s) for s in summaries],
               **(extra or {})}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str))
    cols = [f for f in RankRow.__dataclass_fields__ if f not in ("compute_by_kind_ms", "ops")]
    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([getattr(r, c) for c in cols])
    paths["md"].write_text(format_report(rows, summaries, title) + "\n")
    return paths
