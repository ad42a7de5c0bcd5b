"""Per-rank peak memory of a training step, and the longest context under a budget.

The model is the trainer's megatron GPT (RMSNorm, SwiGLU, no biases, untied
embedding and output layer) with distattn core attention. Per rank:

static      parameters P*s, gradients P*s plus the fp32 flat all-reduce copy
            4P, AdamW moments 2*P*s_opt (fp32 master copy and moments with
            bf16 through DeepSpeed). ZeRO-1 divides the optimizer state by
            the dp*cp ranks, ZeRO-2 the gradients too.
activations saved tensors per local token (T = seq_len / cp), counted from
            what autograd keeps in each layer (element size s, fp32 stats):
            attention block: norm input, rstd, normalised and scaled output
            (3h + 1), q h, k and v 2*Hkv*D, attention out h, lse H (fp32),
            output-projection input h;  MLP block: norm 3h + 1, fc1 output
            2F, SwiGLU gate, activation and product 3F;
            once per model: tokens and labels (int64), RoPE cos/sin 2D
            (fp32), log-softmax of the logits V (fp32), per-token loss.
            recompute=full keeps only each layer's input h (+ one layer's
            working set while it is recomputed); recompute=selective keeps
            each layer's input plus its core attention's inputs and saved
            tensors (q, k, v twice: before and after RoPE, out, lse).
transient   the backward's largest live temporaries, the larger of: the
            gradient of the logits and of the log-softmax (2V fp32 per
            token) with the residual-stream gradient (2h); or one layer's
            recomputed activations (recompute modes) with the gradients of
            the residual stream and the layer's widest activation (2h + 2F).
comm        the scheme's communication buffers for one layer:
              ring       two K/V blocks in flight plus the fp32 dK/dV
                         accumulator in flight and at home
              allgather  the gathered K/V of the whole sequence and its
                         fp32 gradient
              ulysses    the head-sharded full-sequence q, k, v, out (and
                         their gradients in backward)
              lasp2      the gathered per-rank states (H*D*D per rank, fp32)

runtime     a fixed 6 MiB a first step allocates whatever the length.

The longest context is the largest seq_len (a multiple of 2*cp, as zigzag
needs) whose predicted peak fits the budget, found by bisection.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 1024 ** 3
MIB = 1024 ** 2
# Allocations a first training step makes regardless of length (autograd engine,
# kernel workspaces, optimizer bookkeeping), measured on CPU for the tiny model.
RUNTIME_BYTES = 6 * MIB


@dataclass
class MemoryPlan:
    seq_len: int
    world: int            # cp ranks splitting the sequence
    scheme: str
    recompute: str
    params: int
    grads: int
    optimizer: int
    activations: int
    transient: int
    comm: int
    runtime: int = 0      # fixed first-step allocations (autograd engine, kernel workspaces)

    @property
    def static(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.static + self.activations + self.transient + self.comm + self.runtime

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d


def param_count(m) -> int:
    """Parameters of the GPT model for ModelConfig `m` (untied embeddings, no biases)."""
    h, d, kv, f, v = m.hidden_size, m.head_dim, m.num_query_groups, m.ffn_hidden_size, m.vocab_size
    layer = h * (h + 2 * kv * d) + h * h + 2 * h + h * 2 * f + f * h
    return 2 * v * h + m.num_layers * layer


def _layer_saved(m, s: int) -> tuple[float, float, float]:
    """Per-token bytes one layer saves: (non-attention part, core attention part, attention inputs)."""
    h, H, d, kv, f = m.hidden_size, m.num_attention_heads, m.head_dim, m.num_query_groups, m.ffn_hidden_size
    norm = (3 * h) * s + 4
    core = (h + 2 * kv * d + h) * s + 4 * H          # q (roped), k, v, out, lse
    rest = norm + h * s + norm + 5 * f * s           # attention norm, proj input, MLP norm, SwiGLU
    inputs = (h + 2 * kv * d) * s                    # core attention inputs (before RoPE)
    return rest, core, inputs


def predict_memory(cfg, seq_len: int | None = None, cp: int | None = None, dp: int | None = None,
                   scheme: str | None = None, recompute: str | None = None) -> MemoryPlan:
    """Predicted per-rank peak bytes of one training step of `cfg` (overrides optional)."""
    m, t = cfg.model, cfg.train
    n = int(seq_len or cfg.data.seq_len)
    cp = int(cp or cfg.parallel.cp)
    dp = int(dp or cfg.parallel.dp)
    scheme = scheme or cfg.attention.scheme
    recompute = recompute or m.recompute
    s = 2 if m.dtype == "bf16" else 4
    h, H, d, kv, f, V = (m.hidden_size, m.num_attention_heads, m.head_dim, m.num_query_groups,
                         m.ffn_hidden_size, m.vocab_size)
    T = -(-n // cp)  # tokens on this rank
    P = param_count(m)
    shards = dp * cp
    params = P * s
    if t.zero_stage == 0:
        grads, optim = P * s + 4 * P, 2 * P * s
    else:  # DeepSpeed: fp32 moments (and an fp32 master copy with bf16 weights)
        opt_full = 8 * P + (4 * P if s == 2 else 0)
        optim = opt_full // shards
        grads = P * s + (4 * P // shards if t.zero_stage == 2 else 4 * P)

    rest, core, inputs = _layer_saved(m, s)
    L = m.num_layers
    per_layer_full = rest + core
    if recompute == "none":
        layers = L * per_layer_full
        redo = 0.0
    elif recompute == "full":
        layers = L * h * s
        redo = per_layer_full                 # one layer's activations while it is recomputed
    elif recompute == "selective":
        layers = L * (h * s + core + inputs)
        redo = rest
    else:
        raise ValueError(f"recompute={recompute!r}; choose none, selective or full")
    once = 8 + 8 + 2 * d * 4 + 4 * V + 4   # tokens, labels, rope cos/sin, log-softmax, loss
    activations = int(T * (layers + once))
    # the loss's temporaries are freed before the layers' backward (and recomputation) begins
    loss_part = 2 * 4 * V + 2 * h * s
    layer_part = redo + (2 * h + 2 * f) * s
    transient = int(T * max(loss_part, layer_part))

    kv_local = 2 * T * kv * d
    if cp == 1 or scheme == "local":
        comm = 0
    elif scheme in ("ring", "hetero", "cad"):
        comm = 2 * kv_local * s + 2 * kv_local * 4
    elif scheme == "allgather":
        comm = kv_local * cp * (s + 4)
    elif scheme in ("ulysses", "usp"):
        # u ranks hold T*u tokens of H/u heads each: q, k, v, out and their gradients
        comm = 2 * T * (2 * H * d + 2 * kv * d) * s
    elif scheme in ("lasp2", "lasp1"):
        comm = 2 * cp * H * d * d * 4
    else:
        comm = 2 * kv_local * (s + 4)
    return MemoryPlan(seq_len=n, world=cp, scheme=scheme, recompute=recompute, params=params,
                      grads=grads, optimizer=optim, activations=activations, transient=transient,
                      comm=int(comm), runtime=RUNTIME_BYTES)


def longest_context(cfg, budget_bytes: float, cp: int, scheme: str | None = None,
                    recompute: str | None = None, dp: int = 1, hi: int = 1 << 34) -> int:
    """Largest seq_len (multiple of 2*cp) whose predicted per-rank peak fits `budget_bytes`; 0: none."""
    step = 2 * cp

    def fits(n: int) -> bool:
        return predict_memory(cfg, n, cp=cp, dp=dp, scheme=scheme, recompute=recompute).total <= budget_bytes

    if not fits(step):
        return 0
    lo, up = 1, step
    while fits(up * step) and up * step < hi:
        lo, up = up, up * 2
    while up - lo > 1:
        mid = (lo + up) // 2
        if fits(mid * step):
            lo = mid
        else:
            up = mid
    return lo * step


def plan_table(cfg, budget_gib: float, worlds: list[int], schemes: list[str],
               recomputes: list[str]) -> list[dict]:
    rows, seen = [], set()
    for scheme in schemes:
        for w in worlds:
            for rc in recomputes:
                sch = "local" if w == 1 else scheme
                if (sch, w, rc) in seen:  # one process needs no scheme: list W=1 once
                    continue
                seen.add((sch, w, rc))
                longest = longest_context(cfg, budget_gib * GIB, w, sch, rc)
                here = predict_memory(cfg, cp=w, scheme=sch, recompute=rc)
                rows.append({"scheme": sch, "cp": w, "recompute": rc, "seq_len": here.seq_len,
                             "peak_mib": here.total / MIB, "static_mib": here.static / MIB,
                             "act_mib": here.activations / MIB,
                             "transient_mib": (here.transient + here.comm) / MIB,
                             "longest": longest})
    return rows


def format_table(rows: list[dict], budget_gib: float) -> str:
    head = (f"{'scheme':<10} {'cp':>3} {'recompute':<9} {'seq_len':>9} {'peak MiB':>9} {'static':>8} "
            f"{'activ.':>8} {'transient':>9}  longest @ {budget_gib:g} GiB")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['scheme']:<10} {r['cp']:>3} {r['recompute']:<9} {r['seq_len']:>9} "
                     f"{r['peak_mib']:>9.1f} {r['static_mib']:>8.1f} {r['act_mib']:>8.1f} "
                     f"{r['transient_mib']:>9.1f}  {r['longest']:>10}")
    return "\n".join(lines)


def _plan_subparsers(sub):
    """The `plan` command's subcommands: the existing group, or a new `plan` command."""
    import argparse
    existing = sub.choices.get("plan")
    if existing is None:
        p = sub.add_parser("plan", help="predict without launching anything")
        return p.add_subparsers(dest="what", required=True)
    for action in existing._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return existing.add_subparsers(dest="what", required=True)


def add_parser(sub):
    psub = _plan_subparsers(sub)
    pm = psub.add_parser("memory", help="predicted per-rank peak memory and the longest context "
                                        "that fits a per-device budget, per scheme and world size")
    pm.add_argument("config", nargs="?", default=None,
                    help="YAML config (default: the embedded configs/default.yaml)")
    pm.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable)")
    pm.add_argument("--budget-gib", type=float, default=80.0, help="per-device memory budget in GiB")
    pm.add_argument("--worlds", default=None,
                    help="comma-separated cp sizes (default: 1 and the config's parallel.cp)")
    pm.add_argument("--schemes", default=None,
                    help="comma-separated schemes (default: the config's attention.scheme)")
    pm.add_argument("--recompute", default=None,
                    help="comma-separated recompute modes (default: the config's model.recompute)")
    pm.add_argument("--json", default=None, help="also write the rows as JSON here")
    pm.set_defaults(fn=cmd_plan_memory)
    return pm


def cmd_plan_memory(args) -> int:
    import json
    from pathlib import Path

    from distattn.config import load_config
    cfg = load_config(args.config, args.overrides)
    worlds = [int(x) for x in args.worlds.split(",")] if args.worlds else sorted({1, cfg.parallel.cp})
    schemes = args.schemes.split(",") if args.schemes else [cfg.attention.scheme]
    rcs = args.recompute.split(",") if args.recompute else [cfg.model.recompute]
    rows = plan_table(cfg, args.budget_gib, worlds, schemes, rcs)
    print(format_table(rows, args.budget_gib))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")
    return 0
