"""`distattn simulate`: schemes side by side at a chosen scale, scaling curves, validation."""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

DEFAULT_SCHEMES = "ring,ring-basic,allgather,ulysses,usp:8,lasp2,lasp1"
ALIASES = {"ring@contiguous": "ring-basic", "ring@zigzag": "ring"}
MAX_GPUS = 8192  # the ring model builds W x W step tables: beyond this, minutes and gigabytes


def gpu_count(text: str) -> int:
    """GPUs of one projection: an integer in [1, MAX_GPUS]."""
    from distattn.cli_args import positive_int
    n = positive_int(text)
    if n > MAX_GPUS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_GPUS} GPUs, got {text!r}")
    return n


def gpu_list(text: str) -> list[int]:
    """Comma-separated GPU counts, each in [1, MAX_GPUS]."""
    from distattn.cli_args import int_list
    vals = int_list(text)
    if max(vals) > MAX_GPUS:
        raise argparse.ArgumentTypeError(f"expected GPU counts of at most {MAX_GPUS}, got {text!r}")
    return vals


def sim_scheme_list(text: str) -> list[str]:
    """Comma-separated simulator schemes: the model's names, their NAME@LAYOUT aliases, or usp:U."""
    from distattn.cli_args import choice_list
    from distattn.sim.model import SIM_SCHEMES
    return choice_list(SIM_SCHEMES + tuple(ALIASES) + ("usp:U",), accept=_is_usp)(text)


def _is_usp(name: str) -> bool:
    base, _, deg = name.partition(":")
    return base == "usp" and deg.isdigit() and int(deg) >= 1


def add_parser(sub) -> argparse.ArgumentParser:
    from distattn.cli_args import HelpFormatter, nonneg_float, nonneg_int, positive_int
    from distattn.sim.cluster import PRESETS
    from distattn.sim.training import MODELS

    p = sub.add_parser("simulate", formatter_class=HelpFormatter,
                       help="project the schemes to 8-1024 GPUs with an alpha-beta cluster model "
                            "(same traffic formulas as the code); --validate checks it against "
                            "published results")
    p.add_argument("--gpus", type=gpu_count, default=64, help=f"context-parallel GPUs, 1 to {MAX_GPUS}")
    p.add_argument("--seq", type=positive_int, default=None,
                   help="sequence length in tokens, at least one per GPU (default: 131072, or "
                        "--tokens-per-gpu x GPUs)")
    p.add_argument("--tokens-per-gpu", type=positive_int, default=None,
                   help="weak scaling: sequence = this x GPUs (overrides --seq)")
    p.add_argument("--cluster", default="h100", choices=sorted(PRESETS), help="cluster preset")
    p.add_argument("--heads", type=positive_int, default=32, help="attention (query) heads")
    p.add_argument("--kv-heads", type=positive_int, default=8, help="KV heads; must divide --heads")
    p.add_argument("--head-dim", type=positive_int, default=128, help="head dimension")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="element type of q, k, v")
    p.add_argument("--rule", choices=("decay", "gated_delta", "kda"), default="decay",
                   help="the linear schemes' layer: decayed linear attention, or the delta rule of Gated "
                        "DeltaNet / Kimi Delta Attention (lasp2, lasp1; --model takes it from its layer kinds)")
    p.add_argument("--model", default=None, choices=sorted(MODELS),
                   help="project a whole training step of this model (tokens/s, memory, max context) "
                        "instead of one attention layer")
    p.add_argument("--schemes", type=sim_scheme_list, default=DEFAULT_SCHEMES, metavar="S1,S2,...",
                   help="comma-separated; ring-basic = ring on the contiguous layout; usp:U = ulysses U x "
                        "ring; ring-linear = the K/V ring on linear attention")
    p.add_argument("--zero", type=int, choices=(0, 1, 2), default=2,
                   help="--model: ZeRO stage over the GPUs for optimizer state / gradients")
    p.add_argument("--no-recompute", action="store_true",
                   help="--model: keep all activations (default: full activation recomputation)")
    p.add_argument("--loss-tile", type=nonneg_int, default=0, metavar="TOKENS",
                   help="--model: the output layer and loss over tiles of this many tokens (model.loss_tile; "
                        "0: the whole logits, which set the peak at long contexts)")
    p.add_argument("--overhead", type=nonneg_float, default=0.0,
                   help="--model: framework overhead per step in seconds")
    p.add_argument("--calibrate", default=None, metavar="JSON",
                   help="measured benchmark: `distattn bench attention --json` output, or a JSON with "
                        "attn_flops_per_s / matmul_flops_per_s / call_overhead_s")
    p.add_argument("--scaling", type=gpu_list, default=None, metavar="W1,W2,...",
                   help="also project over these GPU counts (CSV + PNG)")
    p.add_argument("--png", default=None, metavar="PATH",
                   help="scaling plot path (default: simulate_scaling.png in --out)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write table.md, table.csv, table.json (and the scaling files) here")
    p.add_argument("--validate", action="store_true",
                   help="compare with published relative results (ring zigzag vs basic, LASP-2 vs LASP-1 "
                        "and Ring Attention) and exit non-zero if a claimed comparison is off by > 15%%")
    p.set_defaults(fn=cmd_simulate)
    return p


def _cluster(args):
    from distattn.sim.cluster import calibrate, get_cluster
    c = get_cluster(args.cluster)
    note = ""
    if args.calibrate:
        cal = calibrate(args.calibrate, c)
        c = cal.apply(c)
        note = "; ".join(cal.notes) or f"calibrated from {args.calibrate}"
    return c, note


def _seq(args, world: int) -> int:
    if args.tokens_per_gpu:
        return args.tokens_per_gpu * world
    return args.seq or 131072


def _workload(args, seq: int):
    from distattn.sim.model import AttnWorkload
    return AttnWorkload(seq=seq, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                        dtype_bytes=2 if args.dtype == "bf16" else 4)


def layer_rows(args, cluster, world: int, schemes: list[str]) -> list[dict]:
    from distattn.sim.model import layer_time, single_device_time
    seq = _seq(args, world)
    w = _workload(args, seq)
    single = single_device_time(w, cluster)
    rows = []
    for s in schemes:
        row = {"scheme": s, "gpus": world, "seq": seq}
        linear = s in ("lasp2", "lasp1", "ring-linear")
        try:
            if linear and args.rule != "decay" and s == "ring-linear":
                raise ValueError("no K/V ring model of the delta rule; use lasp2 or lasp1")
            lt = layer_time(s, w, cluster, world, **({"rule": args.rule} if linear and args.rule != "decay" else {}))
        except (ValueError, AssertionError) as e:
            row.update(status=f"n/a: {str(e).splitlines()[0][:90]}")
            rows.append(row)
            continue
        row.update(status="ok", fwd_ms=lt.fwd_s * 1e3, bwd_ms=lt.bwd_s * 1e3, layer_ms=lt.total_s * 1e3,
                   compute_ms=lt.compute_s * 1e3, comm_ms=lt.comm_s * 1e3, exposed_ms=lt.exposed_s * 1e3,
                   mib_sent=lt.bytes_sent / 2**20, mem_gib=lt.mem_bytes / 2**30,
                   efficiency=math.nan if linear else single / (world * lt.total_s), notes=lt.notes)
        rows.append(row)
    return rows


def model_rows(args, cluster, world: int, schemes: list[str]) -> list[dict]:
    from distattn.sim.training import MODELS, max_context, step_time
    model = MODELS[args.model]
    seq = _seq(args, world)
    rows = []
    kinds = model.kinds
    mixers = set(kinds) - {"N"}                        # linear ('L') and delta-rule ('D', 'K') layers
    for s in schemes:
        linear = s in ("lasp2", "lasp1", "ring-linear")
        if linear and not mixers or not linear and "N" not in kinds:
            continue
        if s == "ring-linear" and mixers & set("DK"):  # no K/V ring model of the delta rule
            continue
        kw = {"linear_scheme": s} if linear else {"softmax_scheme": s}
        if linear and "N" in kinds:
            kw["softmax_scheme"] = "allgather"
        row = {"scheme": s, "gpus": world, "seq": seq, "model": model.name}
        try:
            mem_kw = {"zero_stage": args.zero, "recompute": not args.no_recompute, "loss_tile": args.loss_tile}
            st = step_time(model, seq, world, cluster, step_overhead_s=args.overhead,
                           lasp1_sync_every_layer=False, **kw, **mem_kw)
            mc = max_context(model, world, cluster, **kw, **mem_kw)
        except (ValueError, AssertionError) as e:
            row.update(status=f"n/a: {str(e).splitlines()[0][:90]}")
            rows.append(row)
            continue
        row.update(status="ok", step_s=st.step_s, tokens_per_s=st.tokens_per_s, attention_s=st.attention_s,
                   dense_s=st.dense_s, grad_sync_s=st.grad_sync_s, mem_gib=st.mem_bytes / 2**30,
                   fits=st.fits, max_context=mc, schemes=_layer_schemes(kinds, st))
        rows.append(row)
    return rows


def _layer_schemes(kinds: str, st) -> str:
    """Which scheme each layer kind of the model ran on, e.g. 'N:ring D:lasp2'."""
    return " ".join(f"{k}:{st.softmax_scheme if k == 'N' else st.linear_scheme}" for k in "NLDK" if k in kinds)


def _fmt(v, nd=1):
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:,.{nd}f}"
    return str(v)


def format_rows(rows: list[dict], model: bool) -> str:
    if model:
        cols = [("scheme", "scheme"), ("gpus", "GPUs"), ("schemes", "layers"), ("tokens_per_s", "tokens/s"), ("step_s", "step s"),
                ("attention_s", "attention s"), ("dense_s", "dense s"), ("grad_sync_s", "grad sync s"),
                ("mem_gib", "GiB/GPU"), ("fits", "fits"), ("max_context", "max context")]
    else:
        cols = [("scheme", "scheme"), ("gpus", "GPUs"), ("layer_ms", "fwd+bwd ms"), ("fwd_ms", "fwd ms"), ("bwd_ms", "bwd ms"),
                ("compute_ms", "compute ms"), ("comm_ms", "comm ms"), ("exposed_ms", "exposed ms"),
                ("mib_sent", "MiB sent/GPU"), ("mem_gib", "attn GiB/GPU"), ("efficiency", "efficiency")]
    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r.get("status") != "ok":
            out.append(f"| {r['scheme']} | {r.get('status')} |" + " |" * (len(cols) - 2))
            continue
        nd = {"step_s": 3, "attention_s": 3, "dense_s": 3, "grad_sync_s": 3, "efficiency": 3, "tokens_per_s": 0}
        out.append("| " + " | ".join(_fmt(r.get(k, ""), nd.get(k, 1)) for k, _ in cols) + " |")
    return "\n".join(out)


def plot_scaling(rows: list[dict], path: Path, model: bool, title: str) -> Path:
    """Scaling curves: time (or tokens/s), efficiency (attention layers) and exposed communication."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if model:
        panels = [("tokens_per_s", "tokens / s per training step", True),
                  ("mem_gib", "GiB per GPU", True)]
    else:
        panels = [("layer_ms", "one attention layer, fwd+bwd (ms)", True),
                  ("efficiency", "efficiency (softmax schemes)", False),
                  ("exposed_ms", "exposed communication (ms)", True)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.4, 3.4))
    for s in dict.fromkeys(r["scheme"] for r in rows):
        pts = [r for r in rows if r["scheme"] == s and r.get("status") == "ok"]
        for ax, (key, _, _) in zip(axes, panels):
            xy = [(r["gpus"], r[key]) for r in pts if r.get(key) == r.get(key)]
            if key == "exposed_ms":
                xy = [(x, max(y, 1e-3)) for x, y in xy]
            if xy:
                ax.plot(*zip(*xy), marker="o", ms=3, label=s)
    for ax, (key, ylabel, logy) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1.05)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlabel("GPUs", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _write(out: Path, stem: str, rows: list[dict], text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=2, default=str))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (out / f"{stem}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def check_args(args) -> None:
    """What argparse cannot see alone: options that must agree with each other."""
    from distattn.cli_args import UsageError
    if args.heads % args.kv_heads:
        raise UsageError(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}; pick "
                         f"--kv-heads among {', '.join(str(d) for d in range(1, args.heads + 1) if args.heads % d == 0)}")
    if args.tokens_per_gpu is None:
        seq = _seq(args, 1)
        worlds = [args.gpus] + list(args.scaling or [])
        if seq < max(worlds):
            opt = f"--seq {args.seq}" if args.seq else f"the default sequence of {seq} tokens"
            raise UsageError(f"{opt} is smaller than {max(worlds)} GPUs: every GPU needs at least one "
                             f"token; use --seq >= {max(worlds)} or --tokens-per-gpu")
    if args.calibrate and not Path(args.calibrate).is_file():
        raise UsageError(f"--calibrate {args.calibrate}: no such file; pass the JSON of "
                         f"`distattn bench attention --json PATH`")


def cmd_simulate(args) -> int:
    if args.validate:
        from distattn.sim.validate import format_validation, table6_check, validate
        rows = validate()
        text = "Simulator vs published results\n\n" + format_validation(rows)
        text += "\n\nLASP-2 throughput vs the paper's Table 6 (informational)\n\n" + format_validation(table6_check())
        print(text)
        if args.out:
            _write(Path(args.out), "validation", [r.as_dict() for r in rows], text)
        bad = [r for r in rows if not r.ok and not r.known_gap]
        return 1 if bad else 0
    check_args(args)
    try:
        cluster, note = _cluster(args)
    except (ValueError, OSError, KeyError) as e:
        print(f"distattn simulate: --calibrate: {e}", file=sys.stderr)
        return 2
    schemes = [ALIASES.get(s, s) for s in args.schemes]
    model = args.model is not None
    rowfn = model_rows if model else layer_rows
    rows = rowfn(args, cluster, args.gpus, schemes)
    seq = _seq(args, args.gpus)
    what = (f"model {args.model}, one training step (ZeRO-{args.zero}, "
            f"{'no' if args.no_recompute else 'full'} recomputation"
            + (f", loss tiles of {args.loss_tile}" if args.loss_tile else "") + ")" if model else
            f"one attention layer: {args.heads}/{args.kv_heads} heads x {args.head_dim}, {args.dtype}, causal"
            + (f"; linear schemes run the {args.rule} rule" if args.rule != "decay" else ""))
    head = (f"distattn simulate: {args.gpus} GPUs, sequence {seq:,} tokens; {what}\n{cluster.describe()}"
            + (f"\ncalibration: {note}" if note else ""))
    text = head + "\n\n" + format_rows(rows, model)
    print(text)
    if not model:
        print("\nefficiency = single-GPU time of the whole sequence / (GPUs x layer time); n/a for linear "
              "attention (no quadratic single-GPU reference)")
    out = Path(args.out) if args.out else None
    if out:
        _write(out, "table", rows, text)
    if args.scaling:
        srows = []
        for w in args.scaling:
            srows += rowfn(args, cluster, w, schemes)
        stext = format_rows(srows, model).replace("| scheme |", "| scheme |", 1)
        title = (f"{cluster.name} cluster model: " + (f"{args.model}, " if model else
                                                     f"{args.heads}/{args.kv_heads} heads x {args.head_dim}, ")
                 + (f"{args.tokens_per_gpu:,} tokens per GPU" if args.tokens_per_gpu
                    else f"sequence {_seq(args, 1):,} tokens"))
        png = Path(args.png) if args.png else (out or Path(".")) / "simulate_scaling.png"
        plot_scaling(srows, png, model, title)
        if out:
            _write(out, "scaling", srows, stext)
        print(f"\nscaling over {args.scaling} GPUs: {png}")
    return 0
