"""The sweep's outputs: sweep.csv, the throughput and memory plots, and the Markdown tables."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from distattn.sweep_spec import Point, SweepSpec

__all__ = ["write_csv", "plot_sweep", "format_points", "format_max_context"]


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
