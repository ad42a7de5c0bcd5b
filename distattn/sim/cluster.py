"""Cluster model: devices by FLOP/s and memory, links by latency and bandwidth (alpha-beta).

A message of ``b`` bytes over a link costs ``alpha + b / bandwidth``. Nodes hold
``gpus_per_node`` devices joined by the intra-node link (NVLink/NVSwitch);
nodes are joined by the inter-node link (InfiniBand/RoCE, one NIC per GPU). A
collective whose ranks span nodes runs at the pace of its slowest link, as a
ring algorithm does (every ring step has a node-crossing hop).

Compute is priced by FLOPs at a device rate, with two corrections taken from
how attention kernels behave:

- a call over L query/key tokens runs at ``rate * L / (L + half_tokens)``
  (short calls leave tiles idle and pay their ramp-up; ``half_tokens`` is the
  length at which a call reaches half the asymptotic rate);
- every kernel call costs ``call_overhead_s`` (launch and tail).

The presets give public peak numbers and typical achieved fractions; a measured
benchmark replaces the attention rate (:func:`calibrate`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

__all__ = ["Link", "Device", "Cluster", "PRESETS", "get_cluster", "calibrate", "Calibration"]


@dataclass(frozen=True)
class Link:
    name: str
    alpha_s: float  # per-message latency
    bandwidth: float  # bytes/s per GPU and direction, as achieved by the collective library

    def time(self, nbytes: float, messages: int = 1) -> float:
        return messages * self.alpha_s + nbytes / self.bandwidth


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float  # dense bf16/fp16 FLOP/s
    memory_bytes: float
    attn_efficiency: float  # fraction of peak reached by fused attention kernels on long calls
    matmul_efficiency: float  # fraction of peak reached by large GEMMs (MLP, projections, states)
    half_tokens: float = 512.0  # call length at which attention runs at half its asymptotic rate
    call_overhead_s: float = 10e-6  # per kernel call

    @property
    def attn_rate(self) -> float:
        return self.peak_flops * self.attn_efficiency

    @property
    def matmul_rate(self) -> float:
        return self.peak_flops * self.matmul_efficiency

    def attn_time(self, flops: float, tokens: float, calls: int = 1) -> float:
        """Time of attention kernel work: ``flops`` over calls of ``tokens`` query/key tokens."""
        if flops <= 0:
            return 0.0
        eff = tokens / (tokens + self.half_tokens) if tokens > 0 else 1.0
        return flops / (self.attn_rate * eff) + calls * self.call_overhead_s

    def matmul_time(self, flops: float, calls: int = 1) -> float:
        if flops <= 0:
            return 0.0
        return flops / self.matmul_rate + calls * self.call_overhead_s


@dataclass(frozen=True)
class Cluster:
    name: str
    device: Device
    gpus_per_node: int
    intra: Link
    inter: Link
    step_overhead_s: float = 20e-6  # per ring step / p2p round (event sync, launch of the transfer)

    def nodes(self, world: int) -> int:
        return math.ceil(world / self.gpus_per_node)

    def ring_link(self, world: int, stride: int = 1) -> Link:
        """The slowest link of a ring over ``world`` ranks spaced ``stride`` apart."""
        return self.inter if world * stride > self.gpus_per_node and world > 1 else self.intra

    # -- collectives (time per call, from the bytes ONE rank sends) ------------------------
    def p2p(self, nbytes: float, world: int, stride: int = 1) -> float:
        return self.ring_link(world, stride).time(nbytes)

    def all_gather(self, sent: float, world: int, stride: int = 1) -> float:
        """Ring all-gather / reduce-scatter: W-1 steps, ``sent`` bytes out of every rank."""
        if world <= 1:
            return 0.0
        return self.ring_link(world, stride).time(sent, messages=world - 1)

    reduce_scatter = all_gather

    def all_reduce(self, nbytes_payload: float, world: int, stride: int = 1) -> float:
        if world <= 1:
            return 0.0
        sent = 2 * (world - 1) * nbytes_payload / world
        return self.ring_link(world, stride).time(sent, messages=2 * (world - 1))

    def all_to_all(self, sent: float, world: int, stride: int = 1) -> float:
        """Pairwise exchange: the share of ``sent`` that leaves the node goes at the inter-node rate."""
        if world <= 1:
            return 0.0
        span = world * stride
        if span <= self.gpus_per_node:
            return self.intra.time(sent)
        per_node = max(1, self.gpus_per_node // max(stride, 1)) if stride < self.gpus_per_node else 1
        frac_out = (world - min(per_node, world)) / (world - 1)
        return max(self.intra.time(sent * (1 - frac_out)), self.inter.time(sent * frac_out))

    def describe(self) -> str:
        d = self.device
        return (f"{self.name}: {d.name} {d.peak_flops / 1e12:.0f} TFLOP/s peak "
                f"(attention {d.attn_efficiency:.0%}, GEMM {d.matmul_efficiency:.0%}), "
                f"{d.memory_bytes / 2**30:.0f} GiB; {self.gpus_per_node}/node, intra "
                f"{self.intra.bandwidth / 1e9:.0f} GB/s a={self.intra.alpha_s * 1e6:.0f}us, inter "
                f"{self.inter.bandwidth / 1e9:.0f} GB/s a={self.inter.alpha_s * 1e6:.0f}us per GPU")


A100 = Device("A100-SXM4-80GB", peak_flops=312e12, memory_bytes=80e9, attn_efficiency=0.60,
              matmul_efficiency=0.60, half_tokens=512.0, call_overhead_s=10e-6)
H100 = Device("H100-SXM5-80GB", peak_flops=989e12, memory_bytes=80e9, attn_efficiency=0.35,
              matmul_efficiency=0.55, half_tokens=768.0, call_overhead_s=8e-6)
H200 = replace(H100, name="H200-SXM-141GB", memory_bytes=141e9)

PRESETS: dict[str, Cluster] = {
    # DGX A100: NVSwitch 600 GB/s per GPU both ways (~230 GB/s achieved one way by NCCL p2p),
    # 8x HDR 200 Gb/s InfiniBand per node, one NIC per GPU (~23 GB/s achieved)
    "a100": Cluster("a100", A100, 8, Link("nvswitch", 8e-6, 230e9), Link("ib-hdr", 15e-6, 23e9)),
    # DGX H100: NVLink4 900 GB/s both ways (~370 GB/s one way), 8x NDR 400 Gb/s (~45 GB/s)
    "h100": Cluster("h100", H100, 8, Link("nvlink4", 6e-6, 370e9), Link("ib-ndr", 12e-6, 45e9)),
    "h200": Cluster("h200", H200, 8, Link("nvlink4", 6e-6, 370e9), Link("ib-ndr", 12e-6, 45e9)),
    # H800: NVLink cut to 400 GB/s both ways
    "h800": Cluster("h800", replace(H100, name="H800-SXM5-80GB"), 8, Link("nvlink-h800", 6e-6, 160e9),
                    Link("ib-ndr", 12e-6, 45e9)),
}


def get_cluster(name: str) -> Cluster:
    if name not in PRESETS:
        raise ValueError(f"unknown cluster preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


@dataclass
class Calibration:
    """What a measured benchmark says about the device."""

    attn_flops_per_s: float | None = None  # asymptotic attention rate (after the call-length correction)
    matmul_flops_per_s: float | None = None
    call_overhead_s: float | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def apply(self, cluster: Cluster) -> Cluster:
        d = cluster.device
        upd = {}
        if self.attn_flops_per_s:
            upd["attn_efficiency"] = self.attn_flops_per_s / d.peak_flops
        if self.matmul_flops_per_s:
            upd["matmul_efficiency"] = self.matmul_flops_per_s / d.peak_flops
        if self.call_overhead_s is not None:
            upd["call_overhead_s"] = self.call_overhead_s
        return replace(cluster, device=replace(d, **upd)) if upd else cluster

    def as_dict(self) -> dict:
        return asdict(self)


def _causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def calibrate(path: str | Path, cluster: Cluster) -> Calibration:
    """Read a measured benchmark and turn it into device rates.

    Accepted: the JSON of ``distattn bench attention --json`` (its single-process
    fwd+bwd time of the whole sequence gives the attention rate: 3.5 x 4 x pairs
    x heads x head_dim FLOPs, corrected for the call length), or a JSON object
    with any of ``attn_flops_per_s``, ``matmul_flops_per_s``, ``call_overhead_s``
    (rates measured elsewhere, e.g. ``tools/kernel_bench.py`` on a GPU).
    """
    data = json.loads(Path(path).read_text())
    cal = Calibration(source=str(path))
    if "single_s" in data and "spec" in data:
        s = data["spec"]
        n = int(s["seq_len"])
        if s.get("doc_lens"):
            pairs = sum(_causal_pairs(int(x)) for x in s["doc_lens"]) if s.get("causal", True) else \
                sum(int(x) ** 2 for x in s["doc_lens"])
            call = max(int(x) for x in s["doc_lens"])
        else:
            pairs = _causal_pairs(n) if s.get("causal", True) else n * n
            call = n
        flops = 3.5 * 4 * pairs * int(s["heads"]) * int(s["head_dim"])
        measured = flops / float(data["single_s"])
        eff = call / (call + cluster.device.half_tokens)
        cal.attn_flops_per_s = measured / eff
        cal.notes.append(f"attention: {measured / 1e9:.2f} GFLOP/s measured at {call} tokens "
                         f"({s.get('dtype', '?')}, {s['heads']} heads x {s['head_dim']}), "
                         f"{cal.attn_flops_per_s / 1e9:.2f} GFLOP/s asymptotic")
        return cal
    for key in ("attn_flops_per_s", "matmul_flops_per_s", "call_overhead_s"):
        if key in data:
            setattr(cal, key, float(data[key]))
    if not any((cal.attn_flops_per_s, cal.matmul_flops_per_s, cal.call_overhead_s is not None)):
        raise ValueError(f"{path}: not a `distattn bench attention --json` result and has none of "
                         f"attn_flops_per_s, matmul_flops_per_s, call_overhead_s")
    return cal
