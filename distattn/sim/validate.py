"""Check the simulator against published relative results.

1. Ring attention efficiency, zigzag vs basic (zhuzilin/ring-flash-attention
   README; 8 GPUs, Llama-3.1-8B shapes: 32 query / 8 KV heads, head dim 128,
   8K tokens per GPU, bf16, forward + backward). Efficiency = the ring's speed
   over the single-GPU speed on 8K tokens divided by 8 (the README's
   "theoretic"). Published: A100 basic 52.5 %, zigzag 89.8 %; H800 53.9 % and
   90.2 %. Nothing is fitted: device presets only.

2. LASP-2 vs LASP-1 and vs Ring Attention on Linear-Llama3-1B, 64 A100 GPUs,
   pure basic linear attention, batch 1 (LASP-2 paper, arXiv 2502.07563,
   Fig. 3 text: +17.8 % / +7.3 % at 512K, +36.6 % / +15.2 % at 2048K).
   Calibration, on LASP-2 alone: the GEMM rate and the per-step framework
   overhead are solved so the simulated LASP-2 throughput matches the paper's
   Table 6 at 64 GPUs for 2K and 1024K tokens (1285 and 442221 tokens/s).
   LASP-1 and Ring Attention are then predicted, not fitted. LASP-1 follows
   its reference implementation, which synchronises every layer (a global
   barrier in its forward), so its chain of W-1 hops is paid per layer.

Known gap: Ring Attention on the linear model. The paper says only that its
Ring Attention baseline runs without the right-product trick, i.e. rotates K/V
chunks (C x d) instead of d x d states. Modelled that way (``ring-linear``,
the traffic of distattn's ``ring`` formula on this model's shapes) it is an
order of magnitude slower than published: the K/V of 16 layers, forward and
backward with fp32 dK/dV, is about a terabyte per GPU per step at 2048K, and
the published gap leaves time for it only at several hundred GB/s per GPU,
beyond InfiniBand (25 GB/s per GPU) and even NVSwitch. The baseline must have
moved far less than full K/V chunks, and the paper does not say how, so this
comparison is reported (with the bandwidth it would need) but not claimed.

A comparison passes when the simulated value is within ``tolerance`` (15 %)
of the published one, relative: efficiencies directly, and for throughput
gains the gain itself (so +36.6 % must come out between +31.1 % and +42.1 %).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from distattn.sim.cluster import Cluster, get_cluster
from distattn.sim.model import AttnWorkload, layer_time, single_device_time
from distattn.sim.training import MODELS, step_time

__all__ = ["ValidationRow", "PUBLISHED", "ring_efficiency", "calibrate_lasp2", "lasp_gains", "validate",
           "format_validation"]

PUBLISHED = {
    "ring_efficiency": {
        "source": "zhuzilin/ring-flash-attention README, batch fwd+bwd, 8 GPUs, Llama-3.1-8B shapes, "
                  "8K tokens/GPU, bf16",
        "a100": {"ring-basic": 0.525, "ring": 0.898},
        "h800": {"ring-basic": 0.539, "ring": 0.902},
    },
    "lasp2_gain": {
        "source": "LASP-2 (arXiv 2502.07563) Fig. 3: Linear-Llama3-1B, 64 A100, SP=64, batch 1",
        524288: {"ring-linear": 0.178, "lasp1": 0.073},
        2097152: {"ring-linear": 0.366, "lasp1": 0.152},
    },
    "lasp2_table6_64gpu": {  # tokens/s of LASP-2 (Table 6, 64 GPUs)
        2048: 1285, 4096: 2327, 8192: 4693, 16384: 9305, 32768: 17835, 65536: 34118, 131072: 67344,
        262144: 130215, 524288: 245353, 1048576: 442221,
    },
}


@dataclass
class ValidationRow:
    check: str
    published: float
    simulated: float
    rel_error: float
    ok: bool
    note: str = ""
    known_gap: bool = False  # a comparison the model is not expected to reproduce (see KNOWN_GAPS)

    def as_dict(self) -> dict:
        return asdict(self)


def ring_efficiency(cluster: Cluster, scheme: str, world: int = 8, tokens_per_gpu: int = 8192) -> float:
    w = AttnWorkload(seq=world * tokens_per_gpu, heads=32, kv_heads=8, head_dim=128, dtype_bytes=2)
    single = single_device_time(w, cluster, tokens=tokens_per_gpu)
    return world * single / layer_time(scheme, w, cluster, world).total_s


def calibrate_lasp2(cluster: Cluster, world: int = 64, points=(2048, 1048576)) -> tuple[Cluster, float]:
    """GEMM rate and per-step overhead so simulated LASP-2 tokens/s match Table 6 at ``points``."""
    model = MODELS["linear-llama3-1b"]
    table = PUBLISHED["lasp2_table6_64gpu"]
    (n1, n2) = points
    t1, t2 = n1 / table[n1], n2 / table[n2]

    def with_eff(eff: float) -> Cluster:
        return replace(cluster, device=replace(cluster.device, matmul_efficiency=eff))

    def delta(eff: float) -> float:
        c = with_eff(eff)
        return (step_time(model, n2, world, c, linear_scheme="lasp2").step_s
                - step_time(model, n1, world, c, linear_scheme="lasp2").step_s)

    lo, hi = 0.01, 1.0  # a higher GEMM efficiency shrinks the time difference: bisect on it
    target = t2 - t1
    for _ in range(60):
        mid = (lo + hi) / 2
        if delta(mid) > target:
            lo = mid
        else:
            hi = mid
    c = with_eff((lo + hi) / 2)
    overhead = t1 - step_time(model, n1, world, c, linear_scheme="lasp2").step_s
    return c, max(0.0, overhead)


def lasp_gains(cluster: Cluster, overhead: float, seq: int, world: int = 64) -> dict[str, float]:
    """Throughput gain of LASP-2 over each baseline: tokens/s(lasp2) / tokens/s(baseline) - 1."""
    model = MODELS["linear-llama3-1b"]
    t = {s: step_time(model, seq, world, cluster, linear_scheme=s, step_overhead_s=overhead,
                      lasp1_sync_every_layer=True).step_s
         for s in ("lasp2", "lasp1", "ring-linear")}
    return {s: t[s] / t["lasp2"] - 1.0 for s in ("lasp1", "ring-linear")} | {"lasp2_step_s": t["lasp2"]}


def _row(check: str, pub: float, sim: float, tol: float, note: str = "") -> ValidationRow:
    err = sim / pub - 1.0 if pub else float("nan")
    return ValidationRow(check, pub, sim, err, abs(err) <= tol, note)


def validate(tolerance: float = 0.15) -> list[ValidationRow]:
    rows = []
    eff = PUBLISHED["ring_efficiency"]
    for preset in ("a100", "h800"):
        c = get_cluster(preset)
        for scheme, label in (("ring-basic", "basic (contiguous)"), ("ring", "zigzag")):
            rows.append(_row(f"ring {label} efficiency, 8x{preset.upper()}", eff[preset][scheme],
                             ring_efficiency(c, scheme), tolerance))
    c, overhead = calibrate_lasp2(get_cluster("a100"))
    note = (f"calibrated on LASP-2 Table 6: GEMM {c.device.matmul_efficiency:.0%} of peak, "
            f"{overhead:.2f} s/step framework overhead")
    model = MODELS["linear-llama3-1b"]
    for seq, pub in ((k, v) for k, v in PUBLISHED["lasp2_gain"].items() if isinstance(k, int)):
        g = lasp_gains(c, overhead, seq)
        rows.append(_row(f"LASP-2 gain over LASP-1, 64xA100, {seq // 1024}K", pub["lasp1"], g["lasp1"],
                         tolerance, note))
        # the K/V traffic the published ring gap would have to fit into
        ring = layer_time("ring-linear", model.attn(seq), c, 64)
        extra = pub["ring-linear"] * g["lasp2_step_s"]
        need = ring.bytes_sent * model.layers / extra if extra > 0 else float("inf")
        row = _row(f"LASP-2 gain over Ring Attention (K/V chunks), 64xA100, {seq // 1024}K",
                   pub["ring-linear"], g["ring-linear"], tolerance,
                   f"known gap: K/V ring moves {ring.bytes_sent * model.layers / 1e9:.0f} GB/GPU/step at "
                   f"{seq // 1024}K; the published gap needs {need / 1e9:.0f} GB/s per GPU")
        row.known_gap = True
        rows.append(row)
    return rows


def table6_check(tolerance: float = 0.15) -> list[ValidationRow]:
    """LASP-2 tokens/s at the Table 6 lengths not used for calibration (informational)."""
    c, overhead = calibrate_lasp2(get_cluster("a100"))
    model = MODELS["linear-llama3-1b"]
    rows = []
    for n, pub in PUBLISHED["lasp2_table6_64gpu"].items():
        sim = step_time(model, n, 64, c, linear_scheme="lasp2", step_overhead_s=overhead).tokens_per_s
        rows.append(_row(f"LASP-2 tokens/s, 64xA100, {n // 1024}K", pub, sim, tolerance,
                         "calibration point" if n in (2048, 1048576) else ""))
    return rows


def format_validation(rows: list[ValidationRow]) -> str:
    out = ["| check | published | simulated | error | within 15% |", "|---|---:|---:|---:|---|"]
    for r in rows:
        pub = f"{r.published:.3f}" if r.published < 10 else f"{r.published:,.0f}"
        sim = f"{r.simulated:.3f}" if r.simulated < 10 else f"{r.simulated:,.0f}"
        verdict = "yes" if r.ok else ("no (known gap)" if r.known_gap else "NO")
        out.append(f"| {r.check} | {pub} | {sim} | {r.rel_error:+.1%} | {verdict} |")
    notes = sorted({r.note for r in rows if r.note})
    return "\n".join(out + ([""] + [f"- {n}" for n in notes] if notes else []))
