"""`distattn eval`'s outputs: CSV and PNG for the loss-by-position curve and the retrieval heatmap,
the same numbers in TensorBoard."""
from __future__ import annotations

import csv
import math
from pathlib import Path


def write_curve(out: Path, curve: dict, title: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    rows = list(zip(curve["starts"], curve["loss"], curve["tokens"]))
    with open(out / "position_loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["position_from", "loss", "perplexity", "tokens"])
        for start, loss, n in rows:
            w.writerow([start, f"{loss:.6f}", f"{math.exp(min(loss, 50)):.4f}", n])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o")
    ax.set_xlabel("position in document (bucket start)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "position_loss.png", dpi=120)
    plt.close(fig)
    return [out / "position_loss.csv", out / "position_loss.png"]


def write_grid(out: Path, grid: dict, title: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    acc, lengths, depths = grid["accuracy"], grid["lengths"], grid["depths"]
    with open(out / "retrieval.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["length", "depth", "accuracy", "trials"])
        for i, L in enumerate(lengths):
            for j, d in enumerate(depths):
                w.writerow([L, d, f"{acc[i][j]:.4f}", grid["trials"]])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.55 * len(depths)))
    cols = [[acc[i][j] for i in range(len(lengths))] for j in range(len(depths))]
    im = ax.imshow(cols, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("context length")
    ax.set_ylabel("answer depth")
    for i in range(len(lengths)):
        for j in range(len(depths)):
            ax.text(i, j, f"{acc[i][j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.05)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "retrieval.png", dpi=120)
    plt.close(fig)
    return [out / "retrieval.csv", out / "retrieval.png"]


def write_tensorboard(out: Path, curve: dict, grid: dict, step: int) -> Path:
    from torch.utils.tensorboard import SummaryWriter
    tb = out / "tensorboard"
    w = SummaryWriter(str(tb))
    for start, loss in zip(curve["starts"], curve["loss"]):
        if not math.isnan(loss):
            w.add_scalar(f"eval/loss_from_position_{start:08d}", loss, step)
    for i, L in enumerate(grid["lengths"]):
        for j, d in enumerate(grid["depths"]):
            w.add_scalar(f"eval/{grid['task']}_accuracy/len{L:07d}_depth{d:.2f}", grid["accuracy"][i][j], step)
        w.add_scalar(f"eval/{grid['task']}_accuracy/len{L:07d}_mean",
                     sum(grid["accuracy"][i]) / len(grid["depths"]), step)
    w.close()
    return tb


def format_summary(curve: dict, grid: dict) -> str:
    lines = [f"loss by position ({curve['length']} tokens): "
             + "  ".join(f"{s}:{v:.3f}" for s, v in zip(curve["starts"], curve["loss"]))]
    head = "depth \\ length " + " ".join(f"{L:>7}" for L in grid["lengths"])
    lines += [f"{grid['task']} accuracy ({grid['trials']} probes per cell):", head]
    for j, d in enumerate(grid["depths"]):
        lines.append(f"{d:>14.2f} " + " ".join(f"{grid['accuracy'][i][j]:>7.2f}" for i in range(len(grid["lengths"]))))
    return "\n".join(lines)


__all__ = ["format_summary", "write_curve", "write_grid", "write_tensorboard"]
