"""Linear attention across a CP group (LASP-2 vs LASP-1) next to softmax attention (ring, allgather).

`rule` picks what the linear schemes run: (decayed) linear attention, or the delta rule (Gated
DeltaNet's scalar gate or KDA's per-channel gate), where lasp2 all-gathers each rank's affine
state map and lasp1 passes the state rank to rank.

Every scheme runs forward + backward on the same inputs, on local gloo ranks with
one thread each, for every (world size, sequence length) pair. Per scheme and
rank it measures the main thread's CPU time, the wall time of the step (from a
barrier), bytes sent (ledger) and exposed communication (host time blocked in
waits). Rows report the max over ranks: CPU max is the critical path of ranks
that never wait on each other; wall is what a run on this machine actually took.

Read the two time columns with the machine in mind: with W ranks on fewer than
W cores, wall time measures total work (ranks time-share cores) and exposed
time includes waiting for a starved peer, so the critical path is the CPU
column; with a core per rank, wall is the truth, including serial chains that
per-rank CPU time cannot see (LASP-1's state hops).
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch
from distattn.bench.timing import random_qkvdo, timed_steps

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LINEAR_SCHEMES = ("lasp2", "lasp1")
SOFTMAX_SCHEMES = ("ring", "allgather")
RULES = ("decay", "gated_delta", "kda")


@dataclass
class LinearBenchSpec:
    """Shapes, lengths, world sizes and schemes of one linear-attention benchmark."""

    lengths: list[int] = field(default_factory=lambda: [4096, 8192, 16384])
    worlds: list[int] = field(default_factory=lambda: [2, 4])
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "fp32"
    schemes: list[str] = field(default_factory=lambda: ["lasp2", "lasp1", "ring", "allgather"])
    decay: float | None = None
    rule: str = "decay"  # decay: (decayed) linear attention; gated_delta / kda: the delta rule
    block: int = 64
    iters: int = 3
    warmup: int = 1
    softmax_max_len: int | None = 16384  # softmax is quadratic: skip longer sequences (None: never)

    def __post_init__(self):
        bad = [s for s in self.schemes if s not in LINEAR_SCHEMES + SOFTMAX_SCHEMES]
        if bad:
            raise ValueError(f"bench linear schemes must be among {LINEAR_SCHEMES + SOFTMAX_SCHEMES}, "
                             f"got {bad}")
        if self.dtype not in DTYPES:
            raise ValueError(f"bench linear dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"bench linear lengths must be positive, got {self.lengths}")
        if not self.worlds or any(w < 1 for w in self.worlds):
            raise ValueError(f"bench linear worlds must be positive, got {self.worlds}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.rule not in RULES:
            raise ValueError(f"bench linear rule must be one of {RULES}, got {self.rule!r}")
        if self.rule != "decay" and self.kv_heads != self.heads:
            raise ValueError(f"rule={self.rule} shares q, k and v heads: set kv_heads equal to heads "
                             f"({self.heads}), got {self.kv_heads}")
        if self.rule != "decay" and self.decay is not None:
            raise ValueError(f"rule={self.rule} takes its decay from the gate; drop decay={self.decay}")

    def runs(self, name: str, n: int) -> bool:
        return not (name in SOFTMAX_SCHEMES and self.softmax_max_len is not None
                    and n > self.softmax_max_len)


@dataclass
class LinearRow:
    scheme: str
    world: int
    n_tokens: int
    cpu_s: float  # max over ranks of the step's thread CPU time (critical path, one core per rank)
    wall_s: float  # max over ranks of the step's wall time on this machine
    bytes_per_rank: int  # max over ranks, bytes sent per step (forward + backward)
    exposed_s: float  # max over ranks, host time blocked on communication per step


def _inputs(spec: LinearBenchSpec, n: int, seed: int = 0):
    return random_qkvdo(n, spec.heads, spec.kv_heads, spec.head_dim, DTYPES[spec.dtype], seed)


def _delta_inputs(spec: LinearBenchSpec, n: int, q, k, seed: int = 1):
    """What a delta-rule layer feeds its kernel: L2-normalised q (scaled) and k, gates in (0.9, 1),
    beta in (0, 1); fp32 gates like the layers'."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    shape = (n, spec.heads, *((spec.head_dim,) if spec.rule == "kda" else ()))
    gate = 0.9 + 0.1 * torch.rand(shape, generator=g)
    beta = torch.rand(n, spec.heads, generator=g)
    q = (F.normalize(q.float(), dim=-1) * spec.head_dim ** -0.5).to(q.dtype)
    return q, F.normalize(k.float(), dim=-1).to(k.dtype), gate, beta


def _scheme(name: str, spec: LinearBenchSpec):
    import distattn
    if name in LINEAR_SCHEMES:
        return distattn.get_scheme(name, block=spec.block)
    return distattn.get_scheme(name)


def _rank_bench(spec: LinearBenchSpec, name: str, n: int) -> dict:
    """On every rank: warm up, then time `iters` forward + backward steps."""
    import torch.distributed as dist

    import distattn
    from distattn.comm import CommLedger

    group = dist.group.WORLD
    scheme = _scheme(name, spec)
    q, k, v, do = _inputs(spec, n)
    ledger = CommLedger()
    linear = name in LINEAR_SCHEMES
    delta = linear and spec.rule != "decay"
    gl = bl = None
    if delta:
        q, k, gate, beta = _delta_inputs(spec, n, q, k)
        gl, bl = (distattn.shard(x, scheme=scheme, group=group) for x in (gate, beta))
    ql, kl, vl, dl = (distattn.shard(x, scheme=scheme, group=group) for x in (q, k, v, do))

    def step():
        a, b, c = (x.detach().requires_grad_(True) for x in (ql, kl, vl))
        if delta:
            ga, be = (x.detach().requires_grad_(True) for x in (gl, bl))
            out = distattn.linear_attention(a, b, c, scheme=scheme, group=group, rule=spec.rule, gate=ga,
                                            beta=be, ledger=ledger, n_tokens=n)
        elif linear:
            out = distattn.linear_attention(a, b, c, scheme=scheme, group=group, decay=spec.decay,
                                            ledger=ledger, n_tokens=n)
        else:
            out = distattn.attention(a, b, c, scheme=scheme, group=group, causal=True, ledger=ledger,
                                     n_tokens=n)
        out.backward(dl)

    for _ in range(spec.warmup):
        step()
    ledger.reset()
    cpus, walls = timed_steps(step, spec.iters, group)
    tot = ledger.totals()
    return dict(cpu_s=statistics.median(cpus), wall_s=statistics.median(walls),
                bytes_sent=tot.bytes_sent // spec.iters, exposed_s=tot.exposed_s / spec.iters)


def run_linear_bench(spec: LinearBenchSpec, pools: dict | None = None, log=None) -> list[LinearRow]:
    """Every (world, length, scheme) on local ranks (one thread each); pools by world are reused."""
    from distattn.multiproc import RankPool

    rows: list[LinearRow] = []
    for world in spec.worlds:
        own = pools is None or world not in pools
        pool = RankPool(world, threads=1) if own else pools[world]
        try:
            for n in spec.lengths:
                for name in spec.schemes:
                    if not spec.runs(name, n):
                        continue
                    res = pool.run(_rank_bench, spec, name, n, timeout=3600)
                    row = LinearRow(scheme=name, world=world, n_tokens=n,
                                    cpu_s=max(r["cpu_s"] for r in res),
                                    wall_s=max(r["wall_s"] for r in res),
                                    bytes_per_rank=max(r["bytes_sent"] for r in res),
                                    exposed_s=max(r["exposed_s"] for r in res))
                    rows.append(row)
                    if log is not None:
                        log(f"  W={world} N={n} {name}: cpu {row.cpu_s * 1e3:.1f} ms, "
                            f"wall {row.wall_s * 1e3:.1f} ms")
        finally:
            if own:
                pool.close()
    return rows


def _fmt_bytes(b: int) -> str:
    return f"{b / 2**20:.3f}" if b < 2**20 else f"{b / 2**20:.2f}"


def format_table(rows: list[LinearRow], spec: LinearBenchSpec) -> str:
    """One table (all rows) and a summary: lasp2 vs lasp1, and growth with N per scheme."""
    head = (f"linear vs softmax attention fwd+bwd  heads={spec.heads}/{spec.kv_heads} d={spec.head_dim} "
            f"{spec.dtype} rule={spec.rule} decay={spec.decay} block={spec.block} iters={spec.iters} "
            f"(one thread per rank; max over ranks)\n")
    cols = ["W", "N", "scheme", "cpu ms", "wall ms", "MB/rank", "exposed ms"]
    lines = [cols]
    for r in rows:
        lines.append([str(r.world), str(r.n_tokens), r.scheme, f"{r.cpu_s * 1e3:.1f}",
                      f"{r.wall_s * 1e3:.1f}", _fmt_bytes(r.bytes_per_rank), f"{r.exposed_s * 1e3:.1f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    body = [fmt.format(*line) for line in lines]
    body.insert(1, "-" * len(body[0]))
    return head + "\n".join(body) + "\n" + summarize(rows)


def summarize(rows: list[LinearRow]) -> str:
    by = {(r.scheme, r.world, r.n_tokens): r for r in rows}
    out = []
    worlds = sorted({r.world for r in rows})
    lengths = sorted({r.n_tokens for r in rows})
    for w in worlds:
        pairs = [(n, by[("lasp1", w, n)], by[("lasp2", w, n)]) for n in lengths
                 if ("lasp1", w, n) in by and ("lasp2", w, n) in by]
        if pairs:
            out.append(f"W={w} lasp2 vs lasp1 (time saved): " + ", ".join(
                f"N={n}: cpu {1 - b.cpu_s / a.cpu_s:+.0%}, wall {1 - b.wall_s / a.wall_s:+.0%}"
                for n, a, b in pairs))
    for w in worlds:
        for s in sorted({r.scheme for r in rows}):
            pts = [(n, by[(s, w, n)]) for n in lengths if (s, w, n) in by]
            if len(pts) >= 2:
                (n0, r0), (n1, r1) = pts[0], pts[-1]
                out.append(f"W={w} {s}: N x{n1 / n0:g} -> cpu x{r1.cpu_s / r0.cpu_s:.2f}, "
                           f"bytes x{r1.bytes_per_rank / max(r0.bytes_per_rank, 1):.2f}")
    return "\n".join(out)


def rows_as_dicts(rows: list[LinearRow]) -> list[dict]:
    return [asdict(r) for r in rows]
