"""Core attention disaggregation against packing and per-document CP, on long-tailed lengths.

The data: W ranks, each with its own packed batch of ``T`` tokens (documents
drawn from a length distribution, the last one cut at the batch end, as the
data loader packs). Two distributions:

- ``stdlib``: the file sizes in bytes of the Python standard library's ``*.py``
  files (the embedded corpus, ``distattn.train.data.StdlibSource``): median
  ~7 KB, p90 ~48 KB, max ~760 KB;
- ``lognormal``: a synthetic lognormal, median 8192 tokens, sigma 1.5.

The same batches run under four regimes:

- ``packing``: every rank attends its own documents (no communication);
- ``per-doc CP``: ``ring`` with the ``doc_zigzag`` layout over the W ranks
  (every document split head/tail over all ranks);
- ``cad colocated`` (optionally ``+pingpong``): the W ranks keep their
  batches (contiguous layout) and also serve the planned attention tasks;
- ``cad dedicated``: the W ranks own the tokens and S extra ranks compute all
  attention (``distattn.cad.server.serve``).

Two parts:

1. *Planner figures* at realistic sizes (64K-512K tokens per rank): max/mean
   attention pairs per computing rank and bytes per rank for a model shape,
   computed from the plans and layouts (no attention is run).
2. *Measured* forward + backward at a size this machine runs (default W=4,
   T=8192, lengths scaled by 1/8): per rank the main thread's CPU time
   (compute, pack/unpack, kernel planning), bytes sent (ledger) and exposed
   communication (host time blocked in waits), plus the same step with a null
   kernel (communication alone). The critical path is the max over ranks of
   per-rank CPU time; on a machine with fewer cores than ranks, wall time
   measures total work, not the critical path.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from distattn.bench.timing import random_qkvdo, timed_steps
from distattn.comm import Comm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DISTS = ("stdlib", "lognormal")
MODES = ("packing", "per-doc CP", "cad colocated", "cad colocated+pingpong", "cad dedicated")


@dataclass
class CadBenchSpec:
    """What `distattn bench cad` runs."""

    dists: list[str] = field(default_factory=lambda: list(DISTS))
    # measured part
    world: int = 4
    servers: int = 0               # dedicated pool size; 0: same as world
    tokens_per_rank: int = 8192
    length_scale: float = 1 / 8    # document lengths are multiplied by this for the measured part
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    dtype: str = "fp32"
    iters: int = 2
    warmup: int = 1
    modes: list[str] = field(default_factory=lambda: list(MODES))
    # planner part
    plan_world: int = 8
    plan_tokens: list[int] = field(default_factory=lambda: [65536, 131072, 262144, 524288])
    plan_batches: int = 5
    model_heads: int = 32          # model shape for the planner part's bytes
    model_kv_heads: int = 8
    model_head_dim: int = 128
    # both
    tolerance: float = 0.02
    min_shard: int = 128
    token_cost: float | None = None  # measured part's planner token_cost; None: calibrate
    seed: int = 0

    def __post_init__(self):
        from distattn.config import ConfigError
        for name in ("world", "tokens_per_rank", "heads", "kv_heads", "head_dim", "iters", "plan_world",
                     "plan_batches", "min_shard", "model_heads", "model_kv_heads", "model_head_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"bench cad {name}={v!r}: expected an integer >= 1")
        for name in ("servers", "warmup"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"bench cad {name}={v!r}: expected an integer >= 0")
        if not self.length_scale > 0 or not self.tolerance >= 0:
            raise ConfigError(f"bench cad length_scale={self.length_scale!r} must be > 0 and "
                              f"tolerance={self.tolerance!r} >= 0")
        if not self.plan_tokens or any(not isinstance(t, int) or t < 1 for t in self.plan_tokens):
            raise ConfigError(f"bench cad plan_tokens={self.plan_tokens!r}: expected positive integers")
        bad = [d for d in self.dists if d not in DISTS]
        if bad:
            raise ValueError(f"bench cad dists must be among {DISTS}, got {bad}")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"bench cad modes must be among {MODES}, got {bad}")
        if self.dtype not in DTYPES:
            raise ValueError(f"bench cad dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def n_servers(self) -> int:
        return self.servers or self.world


# ----------------------------------------------------------------------------- data


_STDLIB: np.ndarray | None = None


def _stdlib_lengths() -> np.ndarray:
    global _STDLIB
    if _STDLIB is None:
        from distattn.train.data import StdlibSource
        _STDLIB = np.asarray(StdlibSource().lengths, dtype=np.int64)
    return _STDLIB


def draw_lengths(dist: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` document lengths from a distribution (tokens)."""
    if dist == "stdlib":
        return rng.choice(_stdlib_lengths(), size=n, replace=True)
    if dist == "lognormal":
        return np.maximum(1, rng.lognormal(np.log(8192), 1.5, size=n)).astype(np.int64)
    raise ValueError(f"unknown length distribution {dist!r}; choose from {DISTS}")


def pack_batches(dist: str, world: int, tokens_per_rank: int, seed: int, scale: float = 1.0) -> list[int]:
    """Document lengths of W per-rank batches of T tokens, concatenated (cut at every rank end)."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for _ in range(world):
        left = tokens_per_rank
        while left > 0:
            x = int(max(1, round(float(draw_lengths(dist, rng, 1)[0]) * scale)))
            x = min(x, left)
            out.append(x)
            left -= x
    return out


def _cu(doc_lens):
    cu = [0]
    for x in doc_lens:
        cu.append(cu[-1] + x)
    return cu


# ----------------------------------------------------------------------------- planner part


@dataclass
class PlanRow:
    dist: str
    world: int
    tokens_per_rank: int
    docs: float
    packing: float        # max/mean attention pairs per rank
    per_doc_cp: float
    cad_colocated: float
    cad_dedicated: float
    packing_max: float    # worst batch
    cad_colocated_max: float
    cad_bytes: float      # max over ranks of bytes sent per fwd+bwd, colocated (mean over batches)
    cad_ded_bytes: float
    per_doc_cp_bytes: float
    plan_ms: float


def planner_rows(spec: CadBenchSpec, log=None) -> list[PlanRow]:
    from distattn.layout import DocZigzag
    from distattn.sched.cad import plan
    from distattn.schemes.base import AttnShape
    from distattn.schemes.ring import Ring

    W = spec.plan_world
    H, Hk, D, e = spec.model_heads, spec.model_kv_heads, spec.model_head_dim, 2  # bf16 model
    qb, kvb = H * D * e, 2 * Hk * D * e
    rows = []
    for dist in spec.dists:
        for T in spec.plan_tokens:
            acc: dict[str, list[float]] = {k: [] for k in ("docs", "pack", "cp", "co", "de", "cob",
                                                            "deb", "cpb", "ms")}
            for b in range(spec.plan_batches):
                L = pack_batches(dist, W, T, spec.seed + 1000 * b)
                cu = _cu(L)
                t0 = time.perf_counter()
                co = plan(L, W, spec.tolerance, spec.min_shard, q_bytes=qb, kv_bytes=kvb)
                ms = (time.perf_counter() - t0) * 1e3
                de = plan(L, W, spec.tolerance, spec.min_shard, colocated=False, q_bytes=qb, kv_bytes=kvb)
                costs = DocZigzag(sum(L), W, cu).costs()
                cp = max(costs) / (sum(costs) / W)
                tco = co.traffic(H, Hk, D, e)
                tde = de.traffic(H, Hk, D, e)
                ring = Ring(layout_name="doc_zigzag")
                shape = AttnShape(sum(L), H, Hk, D, e, tuple(cu))
                cpb = max(ring.comm_bytes(shape, W, r).total for r in range(W))
                acc["docs"].append(len(L))
                acc["pack"].append(co.packing_imbalance)
                acc["cp"].append(cp)
                acc["co"].append(co.imbalance)
                acc["de"].append(de.imbalance)
                acc["cob"].append(max(tco.total_sent(r) for r in range(co.n_ranks)))
                acc["deb"].append(max(tde.total_sent(r) for r in range(de.n_ranks)))
                acc["cpb"].append(cpb)
                acc["ms"].append(ms)
            m = {k: statistics.mean(v) for k, v in acc.items()}
            rows.append(PlanRow(dist, W, T, m["docs"], m["pack"], m["cp"], m["co"], m["de"],
                                max(acc["pack"]), max(acc["co"]), m["cob"], m["deb"], m["cpb"], m["ms"]))
            if log:
                log(f"planner {dist} T={T}: packing {m['pack']:.3f} -> cad {m['co']:.4f}")
    return rows


# ----------------------------------------------------------------------------- measured part


def calibrate_token_cost(spec: CadBenchSpec, reps: int = 2) -> tuple[float, float, float]:
    """Fit kernel time = a * pairs + b * query_tokens (fwd+bwd, one thread) on this machine.

    Batches of ``tokens_per_rank`` tokens made of equal documents of T, T/2,
    T/4, ... down to ``min_shard`` tokens; least squares over them. Returns
    ``(token_cost = b / a, a, b)`` (seconds per pair and per query token).
    The CPU kernel's real overhead is not exactly linear in tokens (its tiles
    waste part of every diagonal block), so this is a fit, not a law.
    """
    from distattn.kernels.softmax import block_backward, block_forward, plan_calls
    from distattn.layout import Contiguous

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        T = spec.tokens_per_rank
        q, k, v, do = _inputs(spec, T, seed=1)
        xs, ys = [], []
        size = T
        while size >= max(1, spec.min_shard):
            lens = [size] * (T // size) + ([T % size] if T % size else [])
            lay = Contiguous(T, 1, _cu(lens))
            calls = plan_calls(lay.runs(0), lay.runs(0), True)
            best = float("inf")
            for _ in range(reps):
                t0 = time.thread_time()
                o, lse = block_forward(q, k, v, calls, 0.1)
                block_backward(do, q, k, v, o.to(q.dtype), lse, calls, 0.1)
                best = min(best, time.thread_time() - t0)
            xs.append((float(lay.cost(0)), float(T)))
            ys.append(best)
            size //= 2
    finally:
        torch.set_num_threads(threads)
    if len(xs) < 2:
        return 0.0, ys[0] / max(xs[0][0], 1.0), 0.0
    sol = np.linalg.lstsq(np.asarray(xs), np.asarray(ys), rcond=None)[0]
    a, b = float(sol[0]), max(0.0, float(sol[1]))
    return (b / a if a > 0 else 0.0), a, b


@dataclass
class RankStat:
    role: str
    pairs: int
    cpu_s: float
    wall_s: float
    bytes_sent: int
    exposed_s: float
    alone_s: float


def _inputs(spec: CadBenchSpec, n: int, seed: int = 0):
    return random_qkvdo(n, spec.heads, spec.kv_heads, spec.head_dim, DTYPES[spec.dtype], seed)


def _rank_bench(spec: CadBenchSpec, mode: str, doc_lens: list[int], token_cost: float = 0.0) -> dict:
    import torch.distributed as dist

    import distattn
    from distattn.cad.server import serve
    from distattn.comm import CommLedger
    from distattn.kernels.backends import NullKernel, override_backend
    from distattn.layout import Contiguous
    from distattn.schemes.local import block_attention

    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    cu = _cu(doc_lens)
    n = cu[-1]
    q, k, v, do = _inputs(spec, n)
    ledger = CommLedger()
    role, pairs = "rank", 0

    if mode == "packing":
        lay = Contiguous(n, world, cu)
        local = lay.runs(rank)  # documents never cross a rank boundary here: all keys are local
        ql, kl, vl, dl = (lay.shard(x, rank) for x in (q, k, v, do))
        pairs = lay.cost(rank)

        def step():
            a, b, c = (x.detach().requires_grad_(True) for x in (ql, kl, vl))
            block_attention(a, b, c, local, local, True).backward(dl)
    elif mode == "cad dedicated":
        servers = list(range(spec.world, world))
        scheme = distattn.get_scheme("cad", tolerance=spec.tolerance, min_shard=spec.min_shard,
                                     token_cost=token_cost, server_ranks=servers)
        roles = scheme.roles(world)
        if rank in servers:
            role = "server"

            def step():
                serve(scheme, group, passes=2, ledger=ledger)
        else:
            role = "trainer"
            lay = scheme.layout(n, len(roles.sources), cu)
            ql, kl, vl, dl = (lay.shard(x, rank) for x in (q, k, v, do))

            def step():
                a, b, c = (x.detach().requires_grad_(True) for x in (ql, kl, vl))
                distattn.attention(a, b, c, scheme=scheme, group=group, cu_seqlens=cu, ledger=ledger,
                                   n_tokens=n).backward(dl)
    else:
        if mode == "per-doc CP":
            scheme = distattn.get_scheme("ring", layout_name="doc_zigzag")
        else:
            scheme = distattn.get_scheme("cad", tolerance=spec.tolerance, min_shard=spec.min_shard,
                                         token_cost=token_cost, pingpong=mode.endswith("pingpong"))
        lay = scheme.layout(n, world, cu)
        ql, kl, vl, dl = (lay.shard(x, rank) for x in (q, k, v, do))
        if mode == "per-doc CP":
            pairs = lay.cost(rank)

        def step():
            a, b, c = (x.detach().requires_grad_(True) for x in (ql, kl, vl))
            distattn.attention(a, b, c, scheme=scheme, group=group, cu_seqlens=cu, ledger=ledger,
                               n_tokens=n).backward(dl)

    for _ in range(spec.warmup):
        step()
    if mode.startswith("cad") and role != "trainer":  # this rank's planned attention pairs
        s = scheme.roles(world).servers.index(rank)
        pairs = sum(p.server_flops[s] for p in scheme.last_plans)
    ledger.reset()
    cpus, walls = timed_steps(step, spec.iters, group)
    tot = ledger.totals()
    alone = 0.0
    if mode != "packing":  # the same step with a null kernel: how long the transfers take alone
        with override_backend(NullKernel()):
            step()
            ledger.reset()
            for _ in range(spec.iters):
                Comm(group).barrier()
                step()
        alone = ledger.totals().exposed_s / spec.iters
    return asdict(RankStat(role=role, pairs=pairs, cpu_s=statistics.median(cpus),
                           wall_s=statistics.median(walls), bytes_sent=tot.bytes_sent // spec.iters,
                           exposed_s=tot.exposed_s / spec.iters, alone_s=alone))


@dataclass
class RunRow:
    dist: str
    mode: str
    ranks: int
    docs: int
    pairs_imbalance: float   # max/mean attention pairs over ranks that compute attention
    cpu_imbalance: float     # max/mean measured CPU time over the same ranks
    critical_s: float        # max over all ranks of per-rank CPU time
    wall_s: float
    bytes_per_rank: int      # max over ranks
    exposed_s: float         # max over ranks
    comm_alone_s: float      # max over ranks, null kernel


def measured_rows(spec: CadBenchSpec, log=None, token_cost: float = 0.0) -> list[RunRow]:
    from distattn.multiproc import RankPool

    rows: list[RunRow] = []
    pools: dict[int, RankPool] = {}
    try:
        for dist in spec.dists:
            L = pack_batches(dist, spec.world, spec.tokens_per_rank, spec.seed, spec.length_scale)
            for mode in spec.modes:
                w = spec.world + (spec.n_servers if mode == "cad dedicated" else 0)
                if w not in pools:
                    pools[w] = RankPool(w, threads=1)
                res = [RankStat(**r) for r in pools[w].run(_rank_bench, spec, mode, L, token_cost,
                                                           timeout=3600)]
                comp = [r for r in res if r.role != "trainer"]
                mean_p = statistics.mean(r.pairs for r in comp)
                mean_c = statistics.mean(r.cpu_s for r in comp)
                rows.append(RunRow(
                    dist=dist, mode=mode, ranks=w, docs=len(L),
                    pairs_imbalance=max(r.pairs for r in comp) / mean_p if mean_p else float("nan"),
                    cpu_imbalance=max(r.cpu_s for r in comp) / mean_c if mean_c else float("nan"),
                    critical_s=max(r.cpu_s for r in res), wall_s=max(r.wall_s for r in res),
                    bytes_per_rank=max(r.bytes_sent for r in res),
                    exposed_s=max(r.exposed_s for r in res), comm_alone_s=max(r.alone_s for r in res)))
                if log:
                    log(f"measured {dist} {mode}: critical {rows[-1].critical_s * 1e3:.0f} ms")
    finally:
        for p in pools.values():
            p.close()
    return rows


# ----------------------------------------------------------------------------- report


def _table(cols: list[str], body: list[list[str]]) -> str:
    lines = [cols] + body
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*line) for line in lines]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def format_planner(rows: list[PlanRow], spec: CadBenchSpec) -> str:
    head = (f"planner (no attention run): W={spec.plan_world} ranks, {spec.plan_batches} batches per row "
            f"(mean; 'worst' = max over batches), tolerance={spec.tolerance}, min_shard={spec.min_shard}; "
            f"bytes/rank = max over ranks of fwd+bwd bytes sent for H={spec.model_heads}/"
            f"{spec.model_kv_heads} D={spec.model_head_dim} bf16\n")
    cols = ["dist", "tok/rank", "docs", "packing", "(worst)", "per-doc CP", "cad co", "(worst)",
            "cad ded", "cad co MB", "cad ded MB", "per-doc CP MB", "plan ms"]
    body = [[r.dist, f"{r.tokens_per_rank // 1024}K", f"{r.docs:.0f}", f"{r.packing:.3f}",
             f"{r.packing_max:.3f}", f"{r.per_doc_cp:.4f}", f"{r.cad_colocated:.4f}",
             f"{r.cad_colocated_max:.4f}", f"{r.cad_dedicated:.4f}", f"{r.cad_bytes / 2**20:.0f}",
             f"{r.cad_ded_bytes / 2**20:.0f}", f"{r.per_doc_cp_bytes / 2**20:.0f}", f"{r.plan_ms:.1f}"]
            for r in rows]
    return head + _table(cols, body)


def format_measured(rows: list[RunRow], spec: CadBenchSpec, token_cost: float = 0.0) -> str:
    head = (f"measured fwd+bwd: W={spec.world} token-owning ranks (+{spec.n_servers} servers for "
            f"'cad dedicated'), {spec.tokens_per_rank} tokens/rank, lengths x{spec.length_scale:g}, "
            f"H={spec.heads}/{spec.kv_heads} D={spec.head_dim} {spec.dtype}, median of {spec.iters}; "
            f"max/mean over ranks that compute attention; cad token_cost={token_cost:.0f} pairs/token\n")
    cols = ["dist", "mode", "ranks", "pairs max/mean", "cpu max/mean", "critical ms", "wall ms",
            "MB/rank", "exposed ms", "comm alone ms"]
    body = [[r.dist, r.mode, str(r.ranks), f"{r.pairs_imbalance:.3f}", f"{r.cpu_imbalance:.3f}",
             f"{r.critical_s * 1e3:.0f}", f"{r.wall_s * 1e3:.0f}", f"{r.bytes_per_rank / 2**20:.2f}",
             f"{r.exposed_s * 1e3:.0f}", f"{r.comm_alone_s * 1e3:.0f}" if r.mode != "packing" else "-"]
            for r in rows]
    return head + _table(cols, body)


def run_cad_bench(spec: CadBenchSpec, planner: bool = True, measured: bool = True, log=None) -> dict:
    out: dict = {"spec": asdict(spec)}
    if planner:
        out["planner"] = [asdict(r) for r in planner_rows(spec, log)]
    if measured:
        if spec.token_cost is None:
            tc, a, b = calibrate_token_cost(spec)
            out["calibration"] = {"token_cost": tc, "s_per_pair": a, "s_per_query_token": b}
            if log:
                log(f"kernel: {a * 1e9:.1f} ns/pair + {b * 1e6:.2f} us/query token -> token_cost {tc:.0f}")
        else:
            tc = float(spec.token_cost)
        out["token_cost"] = tc
        out["measured"] = [asdict(r) for r in measured_rows(spec, log, tc)]
    return out
