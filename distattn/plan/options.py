"""`distattn plan memory --options`: every combination of the long-context memory options, and the
cheapest one that fits the config's context.

The options trade memory for time; "cheapest" orders them by what they cost a
step, roughly: tiling the loss or the MLP (a few extra kernel launches), FSDP
(its gathers and scatters, mostly overlapped), selective then full
recomputation (a fraction of, then a whole, forward again), offloading saved
activations to the host (the transfers). Tensor parallelism trades cp ranks for
tp ranks at the same device count (cp x tp of the config): its per-layer
activation traffic costs more the wider it is (2 log2 tp). A combination's cost
is the sum of its options' ranks; ties go to the longer context.
"""
from __future__ import annotations

import itertools
import math

from distattn.plan.memory import GIB, MIB, longest_context, predict_memory

TILE = 4096
COST = {"loss_tile": 1, "mlp_tile": 1, "fsdp": 2, "selective": 3, "full": 5, "offload": 8}


MAX_TP = 8  # tensor parallelism stays inside one node


def _with(cfg, shard: str, recompute: str, loss_tile: int, mlp_tile: int, offload: bool, tp: int, cp: int):
    model = cfg.model.model_copy(update={"recompute": recompute, "loss_tile": loss_tile, "mlp_tile": mlp_tile,
                                         "offload_activations": offload})
    train = cfg.train.model_copy(update={"shard": shard, "zero_stage": 0 if shard == "fsdp" else
                                         cfg.train.zero_stage})
    parallel = cfg.parallel.model_copy(update={"tp": tp, "cp": cp})
    return cfg.model_copy(update={"model": model, "train": train, "parallel": parallel})


def tp_choices(cfg) -> list[int]:
    """tp sizes that split the config's cp x tp devices and the model's heads, query groups, FFN and vocabulary;
    only tp=1 for a model with delta-rule layers ('D', 'K'), which run without tensor parallelism."""
    m, devices = cfg.model, cfg.parallel.cp * cfg.parallel.tp
    if set(m.layer_kinds()) & set("DK"):
        return [1]
    return [t for t in range(1, min(devices, MAX_TP) + 1)
            if devices % t == 0 and not (m.num_attention_heads % t or m.num_query_groups % t
                                         or m.ffn_hidden_size % t or m.vocab_size % t)]


def cost(row: dict) -> int:
    return (COST["loss_tile"] * bool(row["loss_tile"]) + COST["mlp_tile"] * bool(row["mlp_tile"])
            + COST["fsdp"] * (row["shard"] == "fsdp") + COST.get(row["recompute"], 0)
            + COST["offload"] * row["offload"] + int(2 * math.log2(row.get("tp", 1))))


def option_rows(cfg, budget_gib: float) -> list[dict]:
    """One row per combination at the config's devices (cp x tp), scheme and seq_len: peak, host
    memory, longest context."""
    devices, dp = cfg.parallel.cp * cfg.parallel.tp, cfg.parallel.dp
    rows = []
    for tp, shard, rc, lt, mt, off in itertools.product(tp_choices(cfg), ("none", "fsdp"),
                                                        ("none", "selective", "full"),
                                                        (0, TILE), (0, TILE), (False, True)):
        if off and rc != "full":  # offload moves the layer inputs that full recomputation keeps
            continue
        cp = devices // tp
        scheme = cfg.attention.scheme if cp > 1 else "local"
        c = _with(cfg, shard, rc, lt, mt, off, tp, cp)
        plan = predict_memory(c, scheme=scheme)
        row = {"tp": tp, "cp": cp, "shard": shard, "recompute": rc, "loss_tile": lt, "mlp_tile": mt,
               "offload": off, "seq_len": plan.seq_len, "peak_mib": plan.total / MIB,
               "host_mib": plan.host / MIB, "fits": plan.total <= budget_gib * GIB,
               "longest": longest_context(c, budget_gib * GIB, cp, scheme, rc, dp=dp)}
        row["cost"] = cost(row)
        rows.append(row)
    return rows


def cheapest(rows: list[dict]) -> dict | None:
    fitting = [r for r in rows if r["fits"]]
    return min(fitting, key=lambda r: (r["cost"], -r["longest"])) if fitting else None


def as_settings(row: dict) -> str:
    parts = [f"--set parallel.tp={row['tp']}", f"--set parallel.cp={row['cp']}"] if "tp" in row else []
    parts += [f"--set train.shard={row['shard']}", f"--set model.recompute={row['recompute']}"]
    if row["loss_tile"]:
        parts.append(f"--set model.loss_tile={row['loss_tile']}")
    if row["mlp_tile"]:
        parts.append(f"--set model.mlp_tile={row['mlp_tile']}")
    if row["offload"]:
        parts.append("--set model.offload_activations=true")
    return " ".join(parts)


def format_options(rows: list[dict], budget_gib: float, seq_len: int) -> str:
    head = (f"{'tp':>2} {'cp':>4} {'shard':<5} {'recompute':<9} {'loss_tile':>9} {'mlp_tile':>8} {'offload':<7} "
            f"{'peak MiB':>10} {'host MiB':>10} {'fits':<4} {'cost':>4}  longest @ {budget_gib:g} GiB")
    lines = [f"peak at seq_len={seq_len} per rank, every combination of the memory options:", head,
             "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["cost"], -r["longest"])):
        lines.append(f"{r['tp']:>2} {r['cp']:>4} {r['shard']:<5} {r['recompute']:<9} {r['loss_tile']:>9} "
                     f"{r['mlp_tile']:>8} "
                     f"{'yes' if r['offload'] else 'no':<7} {r['peak_mib']:>10.1f} {r['host_mib']:>10.1f} "
                     f"{'yes' if r['fits'] else 'no':<4} {r['cost']:>4}  {r['longest']:>10}")
    best = cheapest(rows)
    if best is None:
        lines.append(f"nothing fits {seq_len} tokens in {budget_gib:g} GiB per rank; raise parallel.cp or "
                     f"lower data.seq_len (longest with every option: {max(r['longest'] for r in rows)})")
    else:
        lines.append(f"cheapest that fits {seq_len} tokens: {as_settings(best)}")
    return "\n".join(lines)


__all__ = ["as_settings", "cheapest", "cost", "format_options", "option_rows"]
