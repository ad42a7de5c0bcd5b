"""One sweep point on W local ranks: the rank side (inputs, timed fwd+bwd, the memory pass) and the
pools of ranks that run points. The measurement is described in :mod:`distattn.sweep`."""
from __future__ import annotations

import ctypes
import statistics
import threading
import time
from typing import Any, Callable

from distattn.bench.rss import peak_bytes, reset_peak, trim_heap
from distattn.comm import Comm
from distattn.sweep_spec import SweepSpec

__all__ = ["rank_point", "classify_failure", "Pools"]


def _scheme(name: str):
    """'ring', 'usp:2' (ulysses degree), 'ring@contiguous' (layout)."""
    from distattn.plan.attention import build_scheme
    return build_scheme(name)


class _MemProbe:
    """Peak memory of this process over a block (see the module docstring)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.source = ""

    def start(self) -> None:
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.source = "cuda_allocator"
            return
        trim_heap()
        self.base, self.source = reset_peak()

    def peak(self) -> tuple[int, int]:
        """(peak - base, absolute peak) in bytes."""
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            p = torch.cuda.max_memory_allocated()
            return max(0, p - self.base), p
        p = peak_bytes(self.source)
        return max(0, p - self.base), p


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_TRACK = {"mmap": 64 << 10, "trim": 0}            # every tensor mmapped, returned when freed
_DEFAULT = {"mmap": 32 << 20, "trim": 64 << 20}   # glibc's dynamic thresholds at their ceiling


def _malloc_tracks_tensors(on: bool) -> bool:
    """Make freed tensors leave the resident set at once (on), or restore glibc's usual reuse.

    glibc raises its mmap threshold after the first large free; from then on a
    freed tensor stays in the heap and VmHWM reports the allocator's
    high-water mark, which depends on allocation order and history (two ranks
    running the same code differ by 20%). With the threshold pinned at 64 KiB
    and trimming at once, the resident peak is the peak of live tensor bytes:
    what the planner predicts and what a GPU allocator's peak reports. Every
    allocation then pays fresh page faults, so timed passes run with the
    thresholds at glibc's dynamic ceiling instead. False where there is no glibc.
    """
    vals = _TRACK if on else _DEFAULT
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, vals["mmap"])
                    and libc.mallopt(_M_TRIM_THRESHOLD, vals["trim"]))
    except (OSError, AttributeError):
        return False


_MEM_GROUP: list = []


def _memory_group():
    """A process group (over all ranks) used only by memory passes.

    Gloo runs collectives on its own worker threads, whose glibc arenas keep
    the free space that timed passes leave at their top (malloc_trim does not
    return it for threads other than the main one); a memory pass on those
    threads would reuse it without growing the resident set and be
    under-counted. This group's threads only ever allocate with glibc returning
    memory at once. Made on first use, by every rank in the same call.
    """
    import torch.distributed as dist
    if not _MEM_GROUP:
        _MEM_GROUP.append(dist.new_group(backend=dist.get_backend()))
    return _MEM_GROUP[0]


def _on_fresh_thread(fn: Callable[[], Any]) -> Any:
    """fn() on a new thread, its exception re-raised here.

    A new thread allocates from its own glibc arena, which the timed passes on
    the main thread never filled. In the main arena, chunks those passes freed
    would be reused before any new mapping and stay resident after their next
    free, whatever the mmap threshold, so the peak would again be a
    high-water mark rather than live bytes.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            box["error"] = e

    t = threading.Thread(target=run, name="distattn-memory-pass")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


_WARM_TOKENS = 2048  # per rank: large enough for the kernels' largest tiles (>= 768 query rows)
_WARM: set[str] = set()  # schemes this process has already run once (lazy one-time allocations done)


def _rank_point(spec_dict: dict, scheme_name: str, n_tokens: int, _warming: bool = False) -> dict:
    """Rank side of one point: make the local shard, time fwd+bwd, measure memory.

    The first time a process runs a scheme it first runs a tiny point of it and
    one of 2048 tokens per rank, so one-time allocations (thread pools, backend
    buffers, lazily loaded kernels, and the code the CPU flash kernel generates
    for its large bf16 tiles, ~2 MiB per tile shape) are resident before the
    memory baseline is taken and are not charged to the point.
    """
    import torch
    import torch.distributed as dist

    import distattn
    from distattn.comm import CommLedger

    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    s = SweepSpec(**{k: v for k, v in spec_dict.items() if k != "search"})
    cuda = torch.cuda.is_available() and dist.get_backend() == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[s.dtype]
    try:
        scheme = _scheme(scheme_name)
        scheme.validate(heads=s.heads, kv_heads=s.kv_heads, world=world)
        local = scheme.layout(n_tokens, world).size(rank)
    except ValueError as e:
        return {"status": "invalid", "error": str(e)}
    linear = scheme.kind == "linear"
    if not _warming and scheme_name not in _WARM:
        for small in sorted({min(n_tokens, 64 * world), min(n_tokens, _WARM_TOKENS * world)}):
            _rank_point({**spec_dict, "iters": 1, "warmup": 0}, scheme_name, small, _warming=True)
        _WARM.add(scheme_name)
    ledger = CommLedger()
    scale = 0.3 if linear else 1.0  # keeps linear-attention sums (no normalisation) in range

    def make_inputs():
        g = torch.Generator(device=dev).manual_seed(1000 + rank)

        def rnd(h):
            return torch.randn(local, h, s.head_dim, generator=g, device=dev, dtype=torch.float32).to(dt)

        return rnd(s.heads) * scale, rnd(s.kv_heads) * scale, rnd(s.kv_heads), rnd(s.heads)

    def step(q, k, v, do, group=group):
        a, b, c = (x.detach().requires_grad_(True) for x in (q, k, v))
        if linear:
            out = distattn.linear_attention(a, b, c, scheme=scheme, group=group, ledger=ledger,
                                            n_tokens=n_tokens)
        else:
            out = distattn.attention(a, b, c, scheme=scheme, group=group, causal=s.causal, ledger=ledger,
                                     n_tokens=n_tokens)
        out.backward(do)
        if cuda:
            torch.cuda.synchronize()

    probe = _MemProbe(cuda)

    def memory_pass():
        """The inputs and one untimed fwd+bwd under the probe, glibc returning freed memory."""
        tracking = not cuda and _malloc_tracks_tensors(True)
        try:
            probe.start()
            x = make_inputs()
            step(*x, group=group if cuda else _memory_group())
            return x, probe.peak()
        finally:
            if tracking:
                _malloc_tracks_tensors(False)

    inputs, (mem, peak) = memory_pass() if cuda else _on_fresh_thread(memory_pass)
    for _ in range(s.warmup):
        step(*inputs)
    ledger.reset()
    walls, cpus = [], []
    for _ in range(s.iters):
        Comm(group).barrier()
        c0, w0 = time.thread_time(), time.perf_counter()
        step(*inputs)
        cpus.append(time.thread_time() - c0)
        walls.append(time.perf_counter() - w0)
    if cuda:  # the allocator's peak covers the timed passes too
        mem, peak = probe.peak()
    tot = ledger.totals()
    return {"status": "ok", "step_s": statistics.median(walls), "compute_s": statistics.median(cpus),
            "bytes_sent": tot.bytes_sent // s.iters, "exposed_s": tot.exposed_s / s.iters,
            "peak_mem_bytes": mem, "peak_rss_bytes": peak, "mem_source": probe.source}


def _classify_failure(msg: str) -> str:
    low = msg.lower()
    if any(t in low for t in ("out of memory", "memoryerror", "can't allocate", "cannot allocate",
                              "bad_alloc", "exit codes [-9]", "exit codes [137]")):
        return "oom"
    if "timed out" in low or "timeout" in low:
        return "timeout"
    return "failed"


class _Pools:
    """One RankPool per world size, replaced after a failure."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.pools: dict[int, Any] = {}

    def backend(self) -> str:
        import torch
        if self.spec.backend != "auto":
            return self.spec.backend
        return "nccl" if torch.cuda.is_available() else "gloo"

    def get(self, world: int):
        from distattn.multiproc import RankPool
        p = self.pools.get(world)
        if p is None or not p.alive:
            p = self.pools[world] = RankPool(world, backend=self.backend(), threads=self.spec.threads)
        return p

    def drop(self, world: int) -> None:
        p = self.pools.pop(world, None)
        if p is not None:
            p.close(force=True)

    def close(self) -> None:
        for p in self.pools.values():
            p.close()
        self.pools.clear()


# public names for the driver
rank_point, classify_failure, Pools = _rank_point, _classify_failure, _Pools
