"""Heterogeneous per-head shards (`hetero`) against dense ring attention, over sequence lengths.

For every length N both schemes run forward + backward on the same inputs, on
`world` local ranks with one thread each. Per rank: thread CPU time of the
step (compute), wall time, bytes sent (ledger) and (head, query, key) pairs
computed; the critical path is the max over ranks. Reported:

    density     hetero pairs / dense causal pairs   (the mask density, exact)
    speed-up    ring critical compute / hetero critical compute
    bytes ratio hetero bytes per rank / ring bytes per rank (max over ranks); 1 when
                neither sends anything (world_size 1, e.g. one GPU)
    vs d*ring   hetero critical compute / (density * ring critical compute): 1 is a
                sparse kernel exactly as fast per computed pair as the dense one

`device="cuda"` runs the ranks on GPUs (NCCL, one GPU per rank, so world_size
<= the GPUs there); compute is then the wall time of the step with the device
synchronised at its end (host CPU time says nothing there). `kernel` sets
DISTATTN_HETERO_KERNEL in the ranks (None: as set where the bench starts, else
auto: the fused flex_attention path on CUDA, the blockwise path on CPU); the
kernel hetero ran is in the header.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass, field

import torch
from distattn.bench.timing import timed_steps

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICES = ("cpu", "cuda")


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
    device: str = "cpu"              # "cpu" (gloo ranks) or "cuda" (NCCL, one GPU per rank)
    kernel: str | None = None        # DISTATTN_HETERO_KERNEL in the ranks (None: as set, else auto)

    def __post_init__(self):
        from distattn.schemes.hetero_fused import KERNELS
        if self.device not in DEVICES:
            raise ValueError(f"hetero bench device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.kernel is not None and self.kernel not in KERNELS:
            raise ValueError(f"hetero bench kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")

    @property
    def hetero_kernel(self) -> str:
        """The DISTATTN_HETERO_KERNEL value the ranks run with."""
        from distattn.schemes.hetero_fused import ENV
        return self.kernel or os.environ.get(ENV, "auto")

    def check_devices(self) -> None:
        """Refuse a run this host cannot do: CUDA needs one GPU per rank; flex needs CUDA
        (flex_attention has no backward on CPU)."""
        if self.device != "cuda":
            if self.hetero_kernel == "flex":
                raise ValueError("hetero bench kernel 'flex' (kernel= or DISTATTN_HETERO_KERNEL) needs "
                                 "device='cuda' (flex_attention has no backward on CPU); use 'auto' "
                                 "or 'blocks' on cpu")
            return
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if self.world_size > have:
            raise ValueError(f"hetero bench on cuda needs one GPU per rank: world_size="
                             f"{self.world_size}, GPUs here: {have}; use world_size <= {have} "
                             f"or device='cpu'")

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
    vs_density: float = 0.0  # hetero compute / (density * ring compute)
    kernel: str = "blocks"   # the path hetero ran: blocks or flex


def _rank_bench(spec: HeteroBenchSpec, n: int, which: str) -> dict:
    from distattn.schemes.hetero_fused import ENV
    old = os.environ.get(ENV)
    os.environ[ENV] = spec.hetero_kernel
    try:
        return _rank_bench_on(spec, n, which)
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def _rank_bench_on(spec: HeteroBenchSpec, n: int, which: str) -> dict:
    import torch.distributed as dist

    import distattn
    from distattn.comm import CommLedger
    from distattn.schemes.hetero_fused import hetero_kernel

    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = spec.device == "cuda"
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    scheme = spec.scheme(which)
    scheme.validate(heads=spec.heads, kv_heads=spec.kv_heads, world=world)
    g = torch.Generator().manual_seed(0)
    dt = DTYPES[spec.dtype]
    q = torch.randn(n, spec.heads, spec.head_dim, generator=g).to(dev, dt)
    k = torch.randn(n, spec.kv_heads, spec.head_dim, generator=g).to(dev, dt)
    v = torch.randn(n, spec.kv_heads, spec.head_dim, generator=g).to(dev, dt)
    do = torch.randn(n, spec.heads, spec.head_dim, generator=g).to(dev, dt)
    ql, kl, vl, dl = (distattn.shard(x, scheme=scheme, group=group) for x in (q, k, v, do))
    ledger = CommLedger()

    def step():
        a, b, c = (x.detach().requires_grad_(True) for x in (ql, kl, vl))
        distattn.attention(a, b, c, scheme=scheme, group=group, ledger=ledger, n_tokens=n).backward(dl)
        if cuda:
            torch.cuda.synchronize(dev)

    for _ in range(spec.warmup):
        step()
    ledger.reset()
    computes, walls = timed_steps(step, spec.iters, group)
    if cuda:
        computes = walls  # the host's CPU time does not see the device's work
    if which == "ring":
        pairs = scheme.layout(n, world).cost(rank) * spec.heads
        kernel = "ring"
    else:
        pairs = scheme.plan(n, spec.heads, spec.kv_heads, world, rank).pairs
        kernel = hetero_kernel(dev, True)
    return dict(compute_s=statistics.median(computes), wall_s=statistics.median(walls),
                bytes=ledger.totals().bytes_sent // spec.iters, pairs=pairs, kernel=kernel)


def _ratio(a: int, b: int) -> float:
    """a / b for byte counts; 1 when both are 0 (nothing sent, as at world_size 1)."""
    if b:
        return a / b
    return 1.0 if a == 0 else float("inf")


def run_hetero_bench(spec: HeteroBenchSpec, log=None, pool=None) -> list[HeteroRow]:
    from distattn.multiproc import RankPool

    spec.check_devices()
    own = pool is None
    pool = pool or RankPool(spec.world_size, backend="nccl" if spec.device == "cuda" else "gloo",
                            threads=1)
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
                            byts["ring"], byts["hetero"], _ratio(byts["hetero"], byts["ring"]),
                            crit["hetero"] / (dens * crit["ring"]), res["hetero"][0]["kernel"])
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
            f"W={spec.world_size} (1 thread/rank) layout={spec.layout} iters={spec.iters} "
            f"device={spec.device} hetero kernel={rows[0].kernel if rows else spec.hetero_kernel}\n"
            f"pattern: {', '.join(f'{k}={v}' for k, v in h.items())}\n")
    cols = ["N", "density", "ring ms", "hetero ms", "speed-up", "ring wall ms", "hetero wall ms",
            "wall speed-up", "ring MB/rank", "hetero MB/rank", "bytes ratio", "vs d*ring"]
    lines = [cols]
    for r in rows:
        lines.append([str(r.n_tokens), f"{r.density:.3f}", f"{r.ring_compute_s * 1e3:.0f}",
                      f"{r.hetero_compute_s * 1e3:.0f}", f"{r.speedup:.2f}x",
                      f"{r.ring_wall_s * 1e3:.0f}", f"{r.hetero_wall_s * 1e3:.0f}",
                      f"{r.wall_speedup:.2f}x", f"{r.ring_bytes / 2**20:.2f}",
                      f"{r.hetero_bytes / 2**20:.2f}", f"{r.bytes_ratio:.3f}", f"{r.vs_density:.2f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    body = [fmt.format(*line) for line in lines]
    body.insert(1, "-" * len(body[0]))
    return head + "\n".join(body)


def rows_as_dicts(rows: list[HeteroRow]) -> list[dict]:
    return [asdict(r) for r in rows]
