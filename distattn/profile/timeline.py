"""Per-rank timeline PNG: compute and communication lanes for every rank.

Each rank gets three lanes over the analysed window: compute (coloured by
kind: softmax forward/backward, linear attention, or device kernels),
communication in flight (backend transfer records), and the time the host was
blocked waiting on communication (the exposed part).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from distattn.profile.trace import RankAnalysis

__all__ = ["plot_timeline"]

_KIND_COLORS = {
    "attn_fwd": "#2b8cbe", "attn_bwd": "#08589e", "linear_fwd": "#41ae76", "linear_bwd": "#006d2c",
    "linear_state": "#99d8c9", "kernel": "#2b8cbe",
}
_TRANSFER = "#fdae6b"
_BLOCKED = "#d7301f"


def plot_timeline(analyses: Sequence[RankAnalysis], path: str | Path, title: str = "",
                  max_seconds: float | None = None, dpi: int = 90) -> Path:
    """Draw the lanes of every rank's analysis (its ``lanes`` must be kept) into ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ranks = sorted(analyses, key=lambda a: a.rank)
    n = len(ranks)
    height = 1.5 + 0.75 * n  # inches: lanes plus fixed margins for title, axis and legend
    fig, ax = plt.subplots(figsize=(10, height))
    fig.subplots_adjust(left=1.25 / 10, right=1 - 0.95 / 10, top=1 - 0.35 / height, bottom=0.95 / height)
    yticks, ylabels = [], []
    kinds_seen: set[str] = set()
    lane_h = 0.26
    for i, a in enumerate(ranks):
        base = (n - 1 - i) * 1.0
        lanes = a.lanes
        kinds = [k for k in lanes if k.startswith("compute:")]
        if kinds:
            for k in kinds:
                kind = k.split(":", 1)[1]
                kinds_seen.add(kind)
                ax.broken_barh(_bars(lanes[k], max_seconds), (base + 0.66, lane_h),
                               facecolors=_KIND_COLORS.get(kind, "#6baed6"), linewidth=0)
        else:
            ax.broken_barh(_bars(lanes.get("compute", []), max_seconds), (base + 0.66, lane_h),
                           facecolors="#2b8cbe", linewidth=0)
        ax.broken_barh(_bars(lanes.get("transfer", []), max_seconds), (base + 0.36, lane_h),
                       facecolors=_TRANSFER, linewidth=0)
        ax.broken_barh(_bars(lanes.get("blocked", []), max_seconds), (base + 0.06, lane_h),
                       facecolors=_BLOCKED, linewidth=0)
        for off, name in ((0.79, "compute"), (0.49, "comm"), (0.19, "blocked")):
            yticks.append(base + off)
            ylabels.append(f"rank {a.rank} {name}")
        ov = "n/a" if a.overlap != a.overlap else f"{a.overlap:.2f}"
        ax.text(1.01, base + 0.5, f"overlap\n{ov}", transform=ax.get_yaxis_transform(),
                fontsize=7, va="center")
    ax.set_yticks(yticks)
    ax.set_yticklabels(ylabels, fontsize=7)
    ax.set_ylim(-0.05, n)
    span = max((a.window_s for a in ranks), default=1.0)
    ax.set_xlim(0, max_seconds if max_seconds else span)
    ax.set_xlabel("seconds from the first profiled step", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    handles = [Patch(color=_KIND_COLORS.get(k, "#6baed6"), label=f"compute: {k}") for k in sorted(kinds_seen)]
    handles += [Patch(color=_TRANSFER, label="communication in flight"),
                Patch(color=_BLOCKED, label="blocked on communication (exposed)")]
    fig.legend(handles=handles, fontsize=7, loc="lower center", ncol=min(len(handles), 5), frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _bars(spans, max_seconds):
    out = []
    for a, b in spans:
        if max_seconds is not None:
            if a >= max_seconds:
                continue
            b = min(b, max_seconds)
        out.append((a, b - a))
    return out
