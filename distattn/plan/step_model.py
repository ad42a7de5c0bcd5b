"""Predicted time of one training step of a config on a modelled cluster (dp x cp x tp).

The pieces, per rank (T = seq_len / cp tokens, micro-batches of one sequence):
- dense work: 6 FLOPs per parameter and token, forward + backward, on this rank's 1/tp of the
  split weights (the projections, the MLP, the output layer), at the device's GEMM rate; one more
  forward (8 instead of 6) with selective or full recomputation;
- attention: the simulator's layer model of the scheme (`distattn.sim.model.layer_time`: compute
  from exact causal pairs, communication from the scheme's `comm_bytes`, the overlap its schedule
  reaches) on H/tp heads over the cp group, then corrected for the documents of the data: with
  packed documents a rank computes only same-document pairs, so the compute part scales by
  `DocBalance.work` (the busiest rank's pairs over the balanced single-document share), while the
  bytes stay those of the layout; full recomputation runs the forward again;
- tensor parallelism: megatron's per-layer collectives (`tp_step_bytes`), exposed;
- gradient synchronisation over the dp x cp replicas of each weight: an all-reduce (ZeRO-0/1), a
  reduce-scatter plus an all-gather (ZeRO-2), or FSDP's two all-gathers and one reduce-scatter,
  which overlap the dense work except for one layer's worth;
- nothing else: optimizer steps, launch gaps and host work are one `step_overhead_s`, which a
  measurement calibrates.
Memory comes from the memory planner (`distattn.plan.memory.predict_memory`), so `plan memory`,
`plan parallel` and `simulate` give one answer.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from distattn.plan.memory import param_count, predict_memory
from distattn.sim.cluster import Cluster
from distattn.sim.delta import RULE_OF_KIND
from distattn.sim.model import AttnWorkload, LayerTime, layer_time

# schemes whose transfers run beside their kernels (the layer's time is the larger of the two)
OVERLAPPED = ("ring", "usp", "lasp2", "cad")


@dataclass(frozen=True)
class DocBalance:
    """What the data's documents do to attention work on one layout.

    `pairs`: same-document causal pairs over all of a sequence's pairs (1 for one document);
    `imbalance`: the busiest rank's pairs over the mean rank's; `work` = pairs * imbalance, the
    busiest rank's attention compute relative to one balanced document.
    """

    pairs: float = 1.0
    imbalance: float = 1.0

    @property
    def work(self) -> float:
        return self.pairs * self.imbalance


@dataclass
class StepEstimate:
    step_s: float
    tokens_per_s_per_gpu: float
    dense_s: float
    attention_s: float
    attention_compute_s: float
    exposed_comm_s: float          # attention transfers not hidden + tp collectives + gradient sync
    tp_s: float
    grad_sync_s: float
    mem_bytes: float
    fits: bool
    balance: DocBalance
    layer_times: dict = field(default_factory=dict)  # layer kind -> the simulator's LayerTime (as a dict)

    @property
    def exposed_fraction(self) -> float:
        return self.exposed_comm_s / self.step_s if self.step_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["exposed_fraction"] = self.exposed_fraction
        return d


def attention_layer_time(name: str, w: AttnWorkload, cluster: Cluster, cp: int,
                         balance: DocBalance | None = None, **opts) -> tuple[float, float, float, float]:
    """(time, compute, exposed transfers, forward time) of one attention layer, forward + backward, of
    scheme `name` (a simulator name) over `cp` ranks, corrected for the documents' `balance`; `opts`
    go to the simulator's `layer_time` (`rule=` for a delta-rule layer)."""
    return _layer(name, w, cluster, cp, balance, **opts)[0]


def _layer(name: str, w: AttnWorkload, cluster: Cluster, cp: int, balance: DocBalance | None = None,
           **opts) -> tuple[tuple[float, float, float, float], LayerTime]:
    """`attention_layer_time` and the simulator's LayerTime it came from."""
    balance = balance or DocBalance()
    if cp == 1:  # one rank: the one-step model of the scheme is the local kernel
        name = "lasp2" if opts.get("rule") else "ring"
    lt = layer_time(name, w, cluster, cp, **opts)
    base = name.partition(":")[0]
    compute = lt.compute_s * balance.work
    if base in OVERLAPPED:
        fixed = max(lt.total_s - max(lt.compute_s, lt.comm_s), 0.0)
        total = fixed + max(compute, lt.comm_s)
    else:
        total = lt.total_s - lt.compute_s + compute
    fwd = lt.fwd_s * (total / lt.total_s if lt.total_s > 0 else 1.0)
    return (total, compute, max(total - compute, 0.0), fwd), lt


def _attention(name: str, cfg, cluster: Cluster, balance: DocBalance, **opts):
    """`_layer` on this config's heads per tp rank and cp group."""
    m, par = cfg.model, cfg.parallel
    w = AttnWorkload(seq=cfg.data.seq_len, heads=m.num_attention_heads // par.tp,
                     kv_heads=max(1, m.num_query_groups // par.tp), head_dim=m.head_dim,
                     dtype_bytes=2 if m.dtype == "bf16" else 4)
    return _layer(name, w, cluster, par.cp, balance, **opts)


def sim_scheme_name(scheme: str, ulysses: int = 1) -> str:
    """The simulator's name of a config scheme ('usp' carries its ulysses degree; cad plans like a
    balanced ring)."""
    if scheme == "usp":
        return f"usp:{ulysses}"
    if scheme in ("cad", "hetero", "local"):
        return "ring"
    return scheme


def estimate_step(cfg, cluster: Cluster, balance: DocBalance | None = None,
                  step_overhead_s: float = 0.0, budget_bytes: float | None = None,
                  layers: dict[str, tuple[str, dict]] | None = None) -> StepEstimate:
    """One training step of `cfg` (its model, parallel, attention, train sections) on `cluster`.

    `layers` sets, per layer kind, the simulator's scheme name and `layer_time` options where the
    config cannot say them (`simulate`'s ring-basic, ring-linear, lasp1 synchronised every layer)."""
    from distattn.model.tensor_parallel import tp_step_bytes
    balance = balance or DocBalance()
    m, par, a, t = cfg.model, cfg.parallel, cfg.attention, cfg.train
    tp, cp, dp = par.tp, par.cp, par.dp
    n = cfg.data.seq_len
    T = math.ceil(n / cp)
    micro = cfg.data.micro_batch_size * t.grad_accum
    s = 2 if m.dtype == "bf16" else 4
    P = param_count(m)
    root = (1 if m.tie_embeddings else 2) * m.vocab_size * m.hidden_size
    layer_dense = (P - root) / m.num_layers
    redo = m.recompute in ("selective", "full")
    per_token = 6.0 * (layer_dense * m.num_layers + m.vocab_size * m.hidden_size) / tp
    if redo:  # the layers' forward again
        per_token += 2.0 * layer_dense * m.num_layers / tp
    elif m.mlp_tile:  # a tiled MLP rebuilds its activations in the backward: its forward again
        per_token += 2.0 * 3 * m.hidden_size * m.ffn_hidden_size * m.num_layers / tp
    dense = cluster.device.matmul_time(per_token * T, calls=21 * m.num_layers)
    kinds = m.layer_kinds()
    cache: dict[str, tuple] = {}
    lts: dict[str, LayerTime] = {}
    for k in set(kinds):
        name = sim_scheme_name(a.scheme, par.ulysses) if k == "N" else a.linear_scheme
        if name == "local":
            name = "lasp2"
        opts = {"rule": RULE_OF_KIND[k]} if k in RULE_OF_KIND else {}  # 'D', 'K': the delta rule's own cost
        if layers and k in layers:
            name, opts = layers[k]
        bal = balance if k == "N" else DocBalance()
        cache[k], lts[k] = _attention(name, cfg, cluster, bal, **opts)
    attn = sum(cache[k][0] for k in kinds)
    attn_compute = sum(cache[k][1] for k in kinds)
    exposed_attn = sum(cache[k][2] for k in kinds)
    if m.recompute == "full":
        attn += sum(cache[k][3] for k in kinds)
    tp_s = 0.0
    if tp > 1:
        sp = par.sequence_parallel
        tb = tp_step_bytes(m.num_layers, T, m.hidden_size, s, tp, sp, m.recompute)
        per_op = tb["bytes"] / max(tb["ops"], 1)
        tp_s = tb["ops"] * (cluster.all_gather(per_op, tp) if sp else cluster.all_reduce(per_op * tp / (2 * (tp - 1)), tp))
    replicas = dp * cp
    grad_bytes = P / tp * 4
    if t.shard == "fsdp":
        sync = 1.5 * cluster.all_reduce(grad_bytes * s / 4, replicas, stride=tp)
        grad = max(sync / m.num_layers, sync - 0.9 * dense)  # overlapped but for about one layer
    else:
        grad = cluster.all_reduce(grad_bytes, replicas, stride=tp)
    per_micro = dense + attn + tp_s
    step = micro * per_micro + grad + step_overhead_s
    mem = predict_memory(cfg).total
    budget = cluster.device.memory_bytes if budget_bytes is None else budget_bytes
    return StepEstimate(step_s=step, tokens_per_s_per_gpu=n * micro * dp / step / (dp * cp * tp),
                        dense_s=micro * dense, attention_s=micro * attn,
                        attention_compute_s=micro * attn_compute,
                        exposed_comm_s=micro * (exposed_attn + tp_s) + grad, tp_s=micro * tp_s,
                        grad_sync_s=grad, mem_bytes=mem, fits=mem <= budget, balance=balance,
                        layer_times={k: lt.as_dict() for k, lt in lts.items()})


__all__ = ["DocBalance", "StepEstimate", "attention_layer_time", "estimate_step", "sim_scheme_name"]
