"""Side-by-side benchmark of context-parallel attention schemes (forward + backward).

Per scheme and rank it measures: compute CPU time of the main thread, wall time,
bytes sent, and exposed communication (host time blocked in waits). The critical
path is the max over ranks. A second, compute-free pass (kernels replaced by a
null kernel) times the scheme's communication alone, so

    overlap = 1 - exposed / comm_alone

says how much of the transfer time compute hid, with `exposed` the blocked
time of the critical-path rank (the one with the most compute): it never waits
for a slower peer, so its blocked time is transfer left unhidden, where other
ranks' blocked time also holds load imbalance. Overlap can still fall below 0
when ranks share too few cores for compute and transfers to run at once. Efficiency compares with one
process computing the whole sequence: single_time / (W * critical_compute).

Peers run in the same job on the same inputs: DeepSpeed-Ulysses
(`deepspeed.sequence.layer.DistributedAttention` around our local kernel; its
all-to-alls go through DeepSpeed's backend, which `comm.ledgered_backend`
counts in the same ledger, so its bytes, exposed time and overlap are measured
like ours), a plain,
non-balanced ring (`ring` with the contiguous layout), and ring-flash-attn's
zigzag ring on the same CPU kernel as ours (`peer_ring.py`: a small shim gives
it flash-attn's kernel entry points; it runs one document, causal, with
seq_len divisible by 2W, and is skipped with a message otherwise or when not
installed). The table's footer gives our ring's time over that peer's.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from distattn.bench.timing import random_qkvdo, timed_steps
from distattn.comm import Comm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEERS = ("deepspeed-ulysses", "ring-unbalanced", "ring-flash-attn")


@dataclass
class BenchSpec:
    """One benchmark run: shapes and the schemes to compare."""

    seq_len: int = 4096
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "fp32"
    causal: bool = True
    doc_lens: list[int] | None = None
    schemes: list[str] = field(default_factory=lambda: ["ring", "allgather", "ulysses"])
    iters: int = 3
    warmup: int = 1
    world_size: int = 2

    @property
    def cu_seqlens(self) -> list[int] | None:
        if not self.doc_lens:
            return None
        cu = [0]
        for n in self.doc_lens:
            cu.append(cu[-1] + n)
        if cu[-1] != self.seq_len:
            raise ValueError(f"bench.doc_lens sum to {cu[-1]} but bench.seq_len is {self.seq_len}")
        return cu


@dataclass
class RankResult:
    compute_s: float
    wall_s: float
    bytes_sent: int
    exposed_s: float
    comm_alone_s: float
    pairs: int = 0


def _scheme_for(name: str):
    """'ring', 'usp:2' (ulysses degree), 'ring@doc_zigzag' (layout), or a peer name."""
    import distattn
    if name == "ring-unbalanced":
        return distattn.get_scheme("ring", layout_name="contiguous")
    name, _, layout = name.partition("@")
    opts = {"layout_name": layout} if layout else {}
    if name.startswith("usp"):
        u = int(name.split(":", 1)[1]) if ":" in name else 2
        return distattn.get_scheme("usp", ulysses=u, **opts)
    return distattn.get_scheme(name, **opts)


def _inputs(spec: BenchSpec, seed: int = 0):
    return random_qkvdo(spec.seq_len, spec.heads, spec.kv_heads, spec.head_dim, DTYPES[spec.dtype], seed)


def _ds_ulysses_step(spec: BenchSpec, group):
    """DeepSpeed-Ulysses around our local kernel: returns a fwd+bwd callable."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    from distattn.layout import Contiguous
    from distattn.schemes.local import block_attention

    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)
    full = Contiguous(spec.seq_len, 1, spec.cu_seqlens)
    runs = full.runs(0)

    class _Local(torch.nn.Module):
        def forward(self, q, k, v, *args, **kwargs):  # [S, B, h, d]
            o = block_attention(q[:, 0], k[:, 0], v[:, 0], runs, runs, spec.causal)
            return o.unsqueeze(1)

    attn = DistributedAttention(_Local(), group, scatter_idx=2, gather_idx=0)
    return attn


def _peer_ring_step(spec: BenchSpec, group, ledger, q, k, v, do):
    """ring-flash-attn's zigzag ring on our zigzag shards (its layout too): a fwd+bwd callable."""
    import distattn
    from distattn.bench.peer_ring import counted, zigzag_attention

    ql, kl, vl, dl = (distattn.shard(x, scheme="ring", group=group) for x in (q, k, v, do))

    def step():  # its point-to-point traffic is counted in our ledger while it runs
        a, b, c = (x.detach().requires_grad_(True) for x in (ql, kl, vl))
        with counted(ledger):
            zigzag_attention(a, b, c, group).backward(dl)
    return step


def _make_step(spec: BenchSpec, name: str, group, ledger):
    """One fwd+bwd of scheme or peer `name` on this rank's shard of the benchmark's inputs."""
    import torch.distributed as dist

    import distattn

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    q, k, v, do = _inputs(spec)
    cu = spec.cu_seqlens
    if name == "ring-flash-attn":
        return _peer_ring_step(spec, group, ledger, q, k, v, do)
    if name == "deepspeed-ulysses":
        attn = _ds_ulysses_step(spec, group)
        from deepspeed.comm import comm as ds_comm

        from distattn.comm import ledgered_backend
        from distattn.layout import Contiguous
        lay = Contiguous(spec.seq_len, world, cu)
        ql, kl, vl, dl = (lay.shard(x, rank).unsqueeze(1) for x in (q, k, v, do))

        def ds_step():  # its all-to-alls go through DeepSpeed's backend: counted in our ledger
            a, b, c = (x.detach().requires_grad_(True) for x in (ql, kl, vl))
            with ledgered_backend(ds_comm.cdb, ledger, tag=""):
                attn(a, b, c, 1).backward(dl)
        return ds_step
    scheme = _scheme_for(name)
    scheme.validate(heads=spec.heads, kv_heads=spec.kv_heads, world=world)
    ql, kl, vl, dl = (distattn.shard(x, scheme=scheme, group=group, cu_seqlens=cu) for x in (q, k, v, do))

    def step():
        a, b, c = (x.detach().requires_grad_(True) for x in (ql, kl, vl))
        out = distattn.attention(a, b, c, scheme=scheme, group=group, cu_seqlens=cu,
                                 causal=spec.causal, ledger=ledger, n_tokens=spec.seq_len)
        out.backward(dl)
    return step


def _rank_bench(spec: BenchSpec, name: str) -> dict:
    """One rank's timings of `name`. Ring buffers are kept between steps, as a training step's
    layers keep them between calls (`kept_ring_buffers`)."""
    from distattn.schemes.ring import kept_ring_buffers
    with kept_ring_buffers():
        return _rank_bench_steps(spec, name)


def _rank_bench_steps(spec: BenchSpec, name: str) -> dict:
    import torch.distributed as dist

    from distattn.comm import CommLedger
    from distattn.kernels.backends import NullKernel, override_backend

    group = dist.group.WORLD
    ledger = CommLedger()
    step = _make_step(spec, name, group, ledger)
    for _ in range(spec.warmup):
        step()
    ledger.reset()
    computes, walls = timed_steps(step, spec.iters, group)
    tot = ledger.totals()
    # the same communication with compute removed: how long the transfers take alone
    ledger.reset()
    with override_backend(NullKernel()):
        step()
        ledger.reset()
        Comm(group).barrier()
        for _ in range(spec.iters):
            step()
    alone = ledger.totals().exposed_s / spec.iters
    return asdict(RankResult(
        compute_s=statistics.median(computes), wall_s=statistics.median(walls),
        bytes_sent=tot.bytes_sent // spec.iters, exposed_s=tot.exposed_s / spec.iters,
        comm_alone_s=alone))


def _rank_pair(spec: BenchSpec, names: tuple[str, str], rounds: int) -> dict[str, list[float]]:
    """Compute seconds of single steps of two schemes interleaved A B B A per round, so that a
    change in the machine's load during the job weighs on both alike."""
    import torch.distributed as dist

    from distattn.comm import CommLedger
    from distattn.schemes.ring import kept_ring_buffers

    group = dist.group.WORLD
    got: dict[str, list[float]] = {n: [] for n in names}
    with kept_ring_buffers():  # as in _rank_bench
        steps = {n: _make_step(spec, n, group, CommLedger()) for n in names}
        for step in steps.values():
            for _ in range(max(1, spec.warmup)):
                step()
        a, b = names
        for _ in range(rounds):
            for n in (a, b, b, a):
                got[n] += timed_steps(steps[n], 1, group)[0]
    return got


def ds_ulysses_bytes(spec: BenchSpec, world: int) -> int:
    """DeepSpeed-Ulysses traffic per rank by its formula: q, k, v in and out back each way
    (equal all-to-all splits), for checking the ledger."""
    el = DTYPES[spec.dtype].itemsize
    t = spec.seq_len // world
    per = (world - 1) * t * spec.head_dim * (2 * spec.heads + 2 * spec.kv_heads) * el // world
    return 2 * per


def _single_process_time(spec: BenchSpec) -> float:
    """CPU time of fwd+bwd of the whole sequence in one process, one thread.

    K and V are made head-major first (inside the timed region) where the kernel prefers it,
    as the ring's blocks are: the reference gets the same kernel speed-up as the schemes."""
    from distattn.kernels.softmax import prefers_head_major
    from distattn.layout import Contiguous
    from distattn.schemes.local import block_attention

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q, k, v, do = _inputs(spec)
        runs = Contiguous(spec.seq_len, 1, spec.cu_seqlens).runs(0)
        times = []
        for i in range(spec.warmup + spec.iters):
            a, b, c = (x.detach().requires_grad_(True) for x in (q, k, v))
            t0 = time.thread_time()
            if prefers_head_major(b.device):
                b, c = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (b, c))
            block_attention(a, b, c, runs, runs, spec.causal).backward(do)
            if i >= spec.warmup:
                times.append(time.thread_time() - t0)
        return statistics.median(times)
    finally:
        torch.set_num_threads(threads)


@dataclass
class Row:
    scheme: str
    world: int
    critical_compute_s: float
    compute_imbalance: float
    wall_s: float
    bytes_per_rank: int
    exposed_s: float
    comm_alone_s: float
    overlap: float
    efficiency: float
    # the peer ring's row: our ring's critical compute over its, from steps interleaved A B B A
    paired_ratio: float | None = None


def run_attention_bench(spec: BenchSpec, pool=None) -> tuple[list[Row], float]:
    """Run every scheme (and peers) on `spec.world_size` local ranks; return rows and the single time."""
    from distattn.multiproc import RankPool

    own = pool is None
    pool = pool or RankPool(spec.world_size, threads=1)
    rows: list[Row] = []
    try:
        single = _single_process_time(spec)
        for name in spec.schemes:
            if name == "ring-flash-attn":
                from distattn.bench.peer_ring import peer_problem
                why = peer_problem(spec.seq_len, spec.world_size, spec.causal, spec.doc_lens)
                if why:
                    print(f"skipping peer ring-flash-attn: {why}", file=sys.stderr, flush=True)
                    continue
            res = [RankResult(**r) for r in pool.run(_rank_bench, spec, name, timeout=3600)]
            slowest = max(res, key=lambda r: r.compute_s)
            crit = slowest.compute_s
            mean = statistics.mean(r.compute_s for r in res)
            # the critical-path rank never waits for a slower peer's compute, so what it is
            # blocked for is transfer time compute did not hide; other ranks' blocked time
            # also holds load imbalance (and made the ratio negative)
            exposed = slowest.exposed_s
            alone = max(r.comm_alone_s for r in res)
            overlap = 1.0 - exposed / alone if alone and alone == alone and alone > 0 else float("nan")
            rows.append(Row(
                scheme=name, world=spec.world_size, critical_compute_s=crit,
                compute_imbalance=crit / mean if mean > 0 else float("nan"),
                wall_s=max(r.wall_s for r in res), bytes_per_rank=max(r.bytes_sent for r in res),
                exposed_s=exposed, comm_alone_s=alone, overlap=overlap,
                efficiency=single / (spec.world_size * crit) if crit > 0 else float("nan")))
        by = {r.scheme: r for r in rows}
        if "ring" in by and "ring-flash-attn" in by:
            got = pool.run(_rank_pair, spec, ("ring", "ring-flash-attn"), max(1, (spec.iters + 1) // 2),
                           timeout=3600)
            crit = {n: max(statistics.median(g[n]) for g in got) for n in ("ring", "ring-flash-attn")}
            by["ring-flash-attn"].paired_ratio = crit["ring"] / crit["ring-flash-attn"]
    finally:
        if own:
            pool.close()
    return rows, single


def format_table(rows: list[Row], single: float, spec: BenchSpec) -> str:
    head = (f"attention fwd+bwd  N={spec.seq_len} heads={spec.heads}/{spec.kv_heads} d={spec.head_dim} "
            f"{spec.dtype} causal={spec.causal} docs={len(spec.doc_lens) if spec.doc_lens else 1} "
            f"W={spec.world_size} iters={spec.iters}\n"
            f"single-process time (1 thread): {single * 1e3:.1f} ms\n")
    cols = ["scheme", "crit compute ms", "max/mean", "wall ms", "MB/rank", "crit exposed ms",
            "comm alone ms", "overlap", "efficiency"]
    lines = [cols]
    for r in rows:
        lines.append([r.scheme, f"{r.critical_compute_s * 1e3:.1f}", f"{r.compute_imbalance:.3f}",
                      f"{r.wall_s * 1e3:.1f}", f"{r.bytes_per_rank / 2**20:.2f}",
                      _fmt_ms(r.exposed_s), _fmt_ms(r.comm_alone_s),
                      "n/a" if r.overlap != r.overlap else f"{r.overlap:.2f}", f"{r.efficiency:.3f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    body = [fmt.format(*line) for line in lines]
    body.insert(1, "-" * len(body[0]))
    return head + "\n".join(body) + "\n" + peer_ratio_footer(rows) + overlap_footer(rows)


def peer_ratio_footer(rows: list[Row]) -> str:
    """Our zigzag ring's time over ring-flash-attn's (same kernel, same job), where both ran."""
    by = {r.scheme: r for r in rows}
    ours, peer = by.get("ring"), by.get("ring-flash-attn")
    if ours is None or peer is None or not peer.critical_compute_s or not peer.wall_s:
        return ""
    text = (f"ring / ring-flash-attn (same kernel, same job): critical compute "
            f"{ours.critical_compute_s / peer.critical_compute_s:.3f}x, wall {ours.wall_s / peer.wall_s:.3f}x")
    if peer.paired_ratio is not None:
        text += f"; steps interleaved A B B A: critical compute {peer.paired_ratio:.3f}x"
    return text + "\n"


def overlap_footer(rows: list[Row]) -> str:
    """What the overlap column means, and why a value can be negative (said where one is)."""
    text = ("overlap = 1 - crit exposed / comm alone: the share of the transfer time (measured alone, with "
            "a null kernel) that the critical-path rank did not spend blocked; 1 = fully hidden, 0 = none.")
    neg = [r.scheme for r in rows if r.overlap == r.overlap and r.overlap < 0]
    if neg:
        text += (f"\noverlap < 0 ({', '.join(neg)}): the critical-path rank was blocked longer than the "
                 f"transfers take alone, so compute hid none of them and they ran slower during the step "
                 f"than alone. On CPU, gloo's transfer threads compete with the ranks' compute for cores, "
                 f"and a wait also holds a peer's late start (step-to-step skew). Read it as no overlap; "
                 f"the magnitude is that slowdown, not communication hidden or lost.")
    return text


def _fmt_ms(x: float) -> str:
    return "n/a" if x != x else f"{x * 1e3:.1f}"
