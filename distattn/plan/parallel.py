"""`distattn plan parallel`: choose the scheme, cp x tp x dp, layout, sharding and recomputation.

Every combination for the given device count is built as a config (`Config` validation and the
scheme's own head checks refuse the impossible ones, with their messages as the reason), judged
for memory by the memory planner (`plan.memory.predict_memory`) against the per-device budget and
scored by the step-time model (`plan.step_model.estimate_step`), with the attention work of the
data's real document lengths on each layout (`doc_balance`). The result is a ranked list:
candidates that fit, fastest first, each with the term that makes it lose to the winner, and the
dropped ones with why.
"""
from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, field
from typing import Sequence

from distattn.config import ConfigError
from distattn.plan.memory import GIB
from distattn.plan.step_model import DocBalance, StepEstimate, estimate_step

SHARDS = ("none", "zero1", "zero2", "fsdp")
RECOMPUTES = ("none", "selective", "full")
MAX_TP = 8          # tensor parallelism stays inside one node
WINDOWS = 32        # sequences sampled from the document lengths
TILE = 4096         # tokens per loss / MLP tile when a candidate tiles them


@dataclass
class Candidate:
    """One way to run the job: what differs from the user's config, as `--set` overrides."""

    tp: int
    cp: int
    dp: int
    scheme: str              # attention.scheme ('-' when the model has no softmax layers)
    ulysses: int = 1
    layout: str = "zigzag"
    linear_scheme: str = "-"
    shard: str = "none"      # none | zero1 | zero2 | fsdp
    recompute: str = "none"
    tiles: bool = False      # model.loss_tile and model.mlp_tile of TILE tokens
    estimate: StepEstimate | None = None
    reason: str = ""         # why it was dropped or why it loses

    @property
    def label(self) -> str:
        s = f"usp:{self.ulysses}" if self.scheme == "usp" else self.scheme
        lay = "" if self.scheme in ("-", "local", "ulysses") else f"@{self.layout}"
        lin = f" + {self.linear_scheme}" if self.linear_scheme != "-" else ""
        return f"{s}{lay}{lin}"

    def overrides(self) -> list[str]:
        out = [f"parallel.tp={self.tp}", f"parallel.cp={self.cp}", f"parallel.dp={self.dp}",
               "parallel.world_size=null", "parallel.ring=null", f"parallel.ulysses={self.ulysses}",
               f"model.recompute={self.recompute}",
               f"train.shard={'fsdp' if self.shard == 'fsdp' else 'none'}",
               f"train.zero_stage={self.shard[-1] if self.shard.startswith('zero') else 0}"]
        if self.tiles:
            out += [f"model.loss_tile={TILE}", f"model.mlp_tile={TILE}"]
        if self.scheme != "-":
            out += [f"attention.scheme={self.scheme}", f"attention.layout={self.layout}"]
        if self.linear_scheme != "-":
            out.append(f"attention.linear_scheme={self.linear_scheme}")
        return out


@dataclass
class ParallelPlan:
    ranked: list[Candidate]
    dropped: list[Candidate]
    gpus: int
    budget_bytes: float
    lengths_from: str
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> Candidate | None:
        return self.ranked[0] if self.ranked else None


# ----------------------------------------------------------------------------- documents


def sample_windows(lengths: Sequence[int] | None, seq_len: int, windows: int = WINDOWS,
                   seed: int = 0) -> list[list[int]]:
    """cu_seqlens of `windows` training sequences packed from the documents (shuffled, cut at the
    window's end, as the data stream packs them); one whole-sequence document without lengths."""
    if not lengths:
        return [[0, seq_len]]
    rng = random.Random(seed)
    docs = [int(x) for x in lengths if int(x) > 0]
    out, cur, order = [], [0], []
    while len(out) < windows:
        if not order:
            order = docs[:]
            rng.shuffle(order)
        n = order.pop()
        while n > 0:
            take = min(n, seq_len - cur[-1])
            cur.append(cur[-1] + take)
            n -= take
            if cur[-1] == seq_len:
                out.append(cur)
                cur = [0]
                if len(out) == windows:
                    break
    return out


def doc_balance(windows: list[list[int]], seq_len: int, cp: int, scheme: str, layout: str,
                ulysses: int = 1, tolerance: float = 0.05) -> DocBalance:
    """Same-document pairs over all causal pairs, and the busiest rank's work over the mean's, averaged
    over the sampled sequences, for how `scheme` places queries."""
    from distattn.layout import causal_cost, get_layout
    full = seq_len * (seq_len + 1) / 2
    fracs, imbs = [], []
    for cu in windows:
        pairs = sum((b - a) * (b - a + 1) / 2 for a, b in zip(cu, cu[1:]))
        fracs.append(pairs / full)
        if scheme in ("ulysses", "local") or cp == 1:
            imbs.append(1.0)        # every rank computes every token of its heads
            continue
        if scheme == "cad":
            imbs.append(1.0 + tolerance)   # the planner balances to within its tolerance
            continue
        ranks = cp // ulysses if scheme == "usp" else cp
        if ranks == 1:
            imbs.append(1.0)
            continue
        lay = get_layout(layout, seq_len, ranks, cu)
        loads = [causal_cost(lay, r) for r in range(ranks)]
        mean = sum(loads) / ranks
        imbs.append(max(loads) / mean if mean > 0 else 1.0)
    return DocBalance(pairs=sum(fracs) / len(fracs), imbalance=sum(imbs) / len(imbs))


# ----------------------------------------------------------------------------- candidates


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _schemes(kinds: str, cp: int) -> list[tuple[str, int, str]]:
    """(scheme, ulysses degree, layout) for the softmax layers at this cp."""
    if "N" not in kinds:
        return [("-", 1, "zigzag")]
    if cp == 1:
        return [("local", 1, "contiguous")]
    out = [(s, 1, lay) for s in ("ring", "allgather") for lay in ("zigzag", "doc_zigzag")]
    out.append(("ulysses", cp, "zigzag"))
    out += [("usp", u, lay) for u in _divisors(cp) if 1 < u < cp for lay in ("zigzag", "doc_zigzag")]
    out.append(("cad", 1, "contiguous"))
    return out


def _scheme_problem(cfg, c: Candidate) -> str | None:
    """The scheme's own refusal of the model's heads at this cp (what a rank would say at start)."""
    import distattn
    m = cfg.model
    heads, kv = m.num_attention_heads // c.tp, max(1, m.num_query_groups // c.tp)
    try:
        if c.scheme == "ulysses":
            distattn.get_scheme("ulysses").validate(heads=heads, kv_heads=kv, world=c.cp)
        elif c.scheme == "usp":
            distattn.get_scheme("usp", ulysses=c.ulysses).validate(heads=heads, kv_heads=kv, world=c.cp)
    except ValueError as e:
        return str(e)
    return None


def _first_line(e: Exception) -> str:
    """The first problem of a refusal, without the `--set KEY=VALUE:` that names the candidate's key."""
    text = str(e).strip().splitlines()
    body = [t.strip(" -") for t in text if t.strip() and not t.startswith("invalid")]
    line = body[0] if body else str(e)
    return re.sub(r"^(--)?set [\w.]+=\S*: ", "", line)


def enumerate_candidates(cfg_path, base_overrides: list[str], gpus: int):
    """Every (parallel layout, scheme) combination at `gpus` devices, validated: (config, candidate)
    pairs that load, and the refused candidates with the reason."""
    from distattn.config import load_config
    base = load_config(cfg_path, base_overrides)
    kinds = base.model.layer_kinds()
    linear = [s for s in ("lasp2", "lasp1")] if set("LDK") & set(kinds) else ["-"]
    ok, dropped = [], []
    for tp in [t for t in _divisors(gpus) if t <= MAX_TP]:
        for cp in _divisors(gpus // tp):
            dp = gpus // (tp * cp)
            for (scheme, u, lay), lin in itertools.product(_schemes(kinds, cp), linear):
                c = Candidate(tp=tp, cp=cp, dp=dp, scheme=scheme, ulysses=u, layout=lay,
                              linear_scheme=lin if cp > 1 or lin == "-" else "local")
                if scheme == "-" and lin != "-" and cp == 1:
                    c.linear_scheme = "local"
                try:
                    cfg = load_config(cfg_path, base_overrides + c.overrides())
                except ConfigError as e:
                    c.reason = _first_line(e)
                    dropped.append(c)
                    continue
                problem = _scheme_problem(cfg, c)
                if problem:
                    c.reason = problem
                    dropped.append(c)
                    continue
                ok.append((cfg, c))
    return base, ok, dropped


def _memory_variants(cfg, c: Candidate):
    """The shard x recompute x tiles variants of a candidate's config (ZeRO needs tp = 1; tiles are
    tried when the config has none)."""
    tiled = (False, True) if not (cfg.model.loss_tile or cfg.model.mlp_tile) else (False,)
    for shard, rc, tiles in itertools.product(SHARDS, RECOMPUTES, tiled):
        if shard.startswith("zero") and cfg.parallel.tp > 1:
            continue
        upd = {"recompute": rc}
        if tiles:
            upd.update(loss_tile=TILE, mlp_tile=TILE)
        model = cfg.model.model_copy(update=upd)
        train = cfg.train.model_copy(update={"shard": "fsdp" if shard == "fsdp" else "none",
                                             "zero_stage": int(shard[-1]) if shard.startswith("zero") else 0})
        v = Candidate(**{**c.__dict__, "shard": shard, "recompute": rc, "tiles": tiles, "estimate": None,
                         "reason": ""})
        yield cfg.model_copy(update={"model": model, "train": train}), v


def _why_slower(c: Candidate, best: Candidate) -> str:
    e, b = c.estimate, best.estimate
    if e.exposed_fraction > b.exposed_fraction + 0.05:
        return f"exposed comm {e.exposed_fraction:.0%} of the step"
    if e.balance.work > b.balance.work * 1.05:
        return f"attention work x{e.balance.work / b.balance.work:.2f} of the best's (document imbalance " \
               f"{e.balance.imbalance:.2f})"
    if e.dense_s > b.dense_s * 1.05:
        return f"dense work x{e.dense_s / b.dense_s:.2f} (recomputation or tensor parallelism)"
    if e.grad_sync_s > b.grad_sync_s * 1.5 and e.grad_sync_s > 0.02 * e.step_s:
        return f"gradient sync {e.grad_sync_s:.3g} s"
    return f"{1 - e.tokens_per_s_per_gpu / b.tokens_per_s_per_gpu:.0%} slower"


def plan_parallel(cfg_path, base_overrides: list[str], gpus: int, cluster, budget_gib: float | None = None,
                  lengths: Sequence[int] | None = None, lengths_from: str = "one document",
                  step_overhead_s: float = 0.0) -> ParallelPlan:
    """Rank every feasible way to run the config on `gpus` devices of `cluster`."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"--gpus {gpus!r}: expected a whole number of devices >= 1")
    budget = cluster.device.memory_bytes if budget_gib is None else budget_gib * GIB
    base, ok, dropped = enumerate_candidates(cfg_path, base_overrides, gpus)
    seq = base.data.seq_len
    windows = sample_windows(lengths, seq, seed=base.run.seed)
    balances: dict = {}
    ranked: list[Candidate] = []
    for cfg, c in ok:
        key = (c.cp, c.scheme, c.layout, c.ulysses)
        if key not in balances:
            balances[key] = doc_balance(windows, seq, c.cp, c.scheme, c.layout, c.ulysses,
                                        base.attention.cad_tolerance)
        for vcfg, v in _memory_variants(cfg, c):
            try:
                v.estimate = estimate_step(vcfg, cluster, balances[key], step_overhead_s, budget)
            except (ConfigError, ValueError) as e:
                v.reason = _first_line(e)
                dropped.append(v)
                continue
            if not v.estimate.fits:
                v.reason = f"doesn't fit: {v.estimate.mem_bytes / GIB:.1f} GiB > {budget / GIB:.1f} GiB"
                dropped.append(v)
                continue
            ranked.append(v)
    ranked.sort(key=lambda v: (-v.estimate.tokens_per_s_per_gpu, v.estimate.mem_bytes))
    for v in ranked[1:]:
        v.reason = _why_slower(v, ranked[0])
    if ranked:
        ranked[0].reason = "fastest that fits"
    return ParallelPlan(ranked=ranked, dropped=dropped, gpus=gpus, budget_bytes=budget,
                        lengths_from=lengths_from)


def best_config(cfg_path, base_overrides: list[str], plan: ParallelPlan):
    """The winner as a full config, loadable by `load_config`."""
    from distattn.config import load_config
    b = plan.best
    if b is None:
        raise ConfigError("no candidate fits; see the reasons above (raise --budget-gib, add --gpus, or "
                          "lower data.seq_len)")
    return load_config(cfg_path, base_overrides + b.overrides())


__all__ = ["Candidate", "ParallelPlan", "best_config", "doc_balance", "enumerate_candidates",
           "plan_parallel", "sample_windows"]
