"""Linear attention across a CP group (LASP-2 vs LASP-1) next to softmax attention (ring, allgather).

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
    ql, kl, vl, dl = (distattn.shard(x, scheme=scheme, group=group) for x in (q, k, v, do))
    ledger = CommLedger()
    linear = name in LINEAR_SCHEMES

    def step():
        a, b, c = (x.detach().requires_grad_(True) for x in (ql, kl, vl))
        if linear:
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
            f"{spec.dtype} decay={spec.decay} block={spec.block} iters={spec.iters} "
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
