"""Heterogeneous per-head shards (`hetero`) against dense ring attention, over sequence lengths.

For every length N both schemes run forward + backward on the same inputs, on
`world` local ranks with one thread each. Per rank: thread CPU time of the
step (compute), wall time, bytes sent (ledger) and (head, query, key) pairs
computed; the critical path is the max over ranks. Reported:

    density     hetero pairs / dense causal pairs   (the mask density, exact)
    speed-up    ring critical compute / hetero critical compute
    bytes ratio hetero bytes per rank / ring bytes per rank (max over ranks)
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch
from distattn.bench.timing import timed_steps

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class HeteroBenchSpec:
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "fp32"
    world_size: int = 2
    iters: int = 3
    warmup: int = 1
    layout: str = "zigzag"
    hetero: dict = field(default_factory=dict)  # Hetero options (block, local_blocks, stride, ...)

    def scheme(self, which: str):
        import distattn
        if which == "ring":
            return distattn.get_scheme("ring", layout_name=self.layout)
        return distattn.get_scheme("hetero", layout_name=self.layout, **self.hetero)


@dataclass
class HeteroRow:
    n_tokens: int
    density: float
    ring_compute_s: float
    hetero_compute_s: float
    speedup: float
    ring_wall_s: float
    hetero_wall_s: float
    wall_speedup: float
    ring_bytes: int
    hetero_bytes: int
    bytes_ratio: float


def _rank_bench(spec: HeteroBenchSpec, n: int, which: str) -> dict:
    import torch.distributed as dist

    import distattn
    from distattn.comm import CommLedger

    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    scheme = spec.scheme(which)
    scheme.validate(heads=spec.heads, kv_heads=spec.kv_heads, world=world)
    g = torch.Generator().manual_seed(0)
    dt = DTYPES[spec.dtype]
    q = torch.randn(n, spec.heads, spec.head_dim, generator=g).to(dt)
    k = torch.randn(n, spec.kv_heads, spec.head_dim, generator=g).to(dt)
    v = torch.randn(n, spec.kv_heads, spec.head_dim, generator=g).to(dt)
    do = torch.randn(n, spec.heads, spec.head_dim, generator=g).to(dt)
    ql, kl, vl, dl = (distattn.shard(x, scheme=scheme, group=group) for x in (q, k, v, do))
    ledger = CommLedger()

    def step():
        a, b, c = (x.detach().requires_grad_(True) for x in (ql, kl, vl))
        distattn.attention(a, b, c, scheme=scheme, group=group, ledger=ledger, n_tokens=n).backward(dl)

    for _ in range(spec.warmup):
        step()
    ledger.reset()
    computes, walls = timed_steps(step, spec.iters, group)
    if which == "ring":
        pairs = scheme.layout(n, world).cost(rank) * spec.heads
    else:
        pairs = scheme.plan(n, spec.heads, spec.kv_heads, world, rank).pairs
    return dict(compute_s=statistics.median(computes), wall_s=statistics.median(walls),
                bytes=ledger.totals().bytes_sent // spec.iters, pairs=pairs)


def run_hetero_bench(spec: HeteroBenchSpec, log=None, pool=None) -> list[HeteroRow]:
    from distattn.multiproc import RankPool

    own = pool is None
    pool = pool or RankPool(spec.world_size, threads=1)
    rows = []
    try:
        for n in spec.lengths:
            res = {w: pool.run(_rank_bench, spec, n, w, timeout=3600) for w in ("ring", "hetero")}
            crit = {w: max(r["compute_s"] for r in res[w]) for w in res}
            wall = {w: max(r["wall_s"] for r in res[w]) for w in res}
            byts = {w: max(r["bytes"] for r in res[w]) for w in res}
            dens = sum(r["pairs"] for r in res["hetero"]) / sum(r["pairs"] for r in res["ring"])
            row = HeteroRow(n, dens, crit["ring"], crit["hetero"], crit["ring"] / crit["hetero"],
                            wall["ring"], wall["hetero"], wall["ring"] / wall["hetero"],
                            byts["ring"], byts["hetero"], byts["hetero"] / byts["ring"])
            rows.append(row)
            if log:
                log(f"N={n}: density {dens:.3f}, speed-up {row.speedup:.2f}x, bytes {row.bytes_ratio:.3f}")
    finally:
        if own:
            pool.close()
    return rows


def format_table(rows: list[HeteroRow], spec: HeteroBenchSpec) -> str:
    h = spec.hetero
    head = (f"hetero vs ring, fwd+bwd  heads={spec.heads}/{spec.kv_heads} d={spec.head_dim} {spec.dtype} "
            f"W={spec.world_size} (1 thread/rank) layout={spec.layout} iters={spec.iters}\n"
            f"pattern: {', '.join(f'{k}={v}' for k, v in h.items())}\n")
    cols = ["N", "density", "ring ms", "hetero ms", "speed-up", "ring wall ms", "hetero wall ms",
            "wall speed-up", "ring MB/rank", "hetero MB/rank", "bytes ratio"]
    lines = [cols]
    for r in rows:
        lines.append([str(r.n_tokens), f"{r.density:.3f}", f"{r.ring_compute_s * 1e3:.0f}",
                      f"{r.hetero_compute_s * 1e3:.0f}", f"{r.speedup:.2f}x",
                      f"{r.ring_wall_s * 1e3:.0f}", f"{r.hetero_wall_s * 1e3:.0f}",
                      f"{r.wall_speedup:.2f}x", f"{r.ring_bytes / 2**20:.2f}",
                      f"{r.hetero_bytes / 2**20:.2f}", f"{r.bytes_ratio:.3f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    body = [fmt.format(*line) for line in lines]
    body.insert(1, "-" * len(body[0]))
    return head + "\n".join(body)


def rows_as_dicts(rows: list[HeteroRow]) -> list[dict]:
    return [asdict(r) for r in rows]
