"""Does the planner's first choice win when measured? A CPU harness over small settings.

For each setting (sequence length, document mix, heads), every candidate attention scheme and
layout runs forward + backward on 2 local ranks (`distattn.bench.attention`, one thread per rank,
wall time of the step, max over ranks) and is predicted by the planner's model
(`plan.step_model.attention_layer_time` with the documents' `plan.parallel.doc_balance`) on a
cluster model of this machine: its attention rate calibrated ONCE from a single-process run of one
document (what `--calibrate` does with `distattn bench attention --json`), its links those of gloo
on one host. The question per setting: is the planner's first choice within 5 % of the measured
best (never worse than 15 %)?

    python -m distattn.plan.validate [--quick] [--only TEXT] [--iters N] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field

from distattn.sim.cluster import Cluster, Device, Link

CANDIDATES = ["ring", "ring@doc_zigzag", "allgather", "allgather@doc_zigzag", "ulysses"]
WORLD = 2


@dataclass
class Setting:
    name: str
    seq_len: int
    doc_lens: list[int] | None = None
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64


def _lognormalish(seq: int, big: int, small: int) -> list[int]:
    """One long document and equal short ones filling the rest."""
    rest = seq - big
    n = max(1, rest // small)
    out = [big] + [small] * (n - 1)
    out.append(seq - sum(out))
    return [x for x in out if x > 0]


def settings(quick: bool = False) -> list[Setting]:
    if quick:
        return [Setting("one document", 512), Setting("long + short", 512, [384, 64, 64])]
    out = []
    for seq in (4096, 8192):
        out += [
            Setting(f"{seq // 1024}K one document", seq),
            Setting(f"{seq // 1024}K one document, GQA 8/2", seq, None, 8, 2),
            Setting(f"{seq // 1024}K four equal documents", seq, [seq // 4] * 4),
            Setting(f"{seq // 1024}K long + short", seq, _lognormalish(seq, seq * 5 // 8, seq // 32)),
            Setting(f"{seq // 1024}K short tail first", seq, list(reversed(_lognormalish(seq, seq // 2, seq // 16)))),
            Setting(f"{seq // 1024}K 3:1", seq, [seq * 3 // 4, seq // 4]),
        ]
    return out


def cpu_cluster(attn_rate: float) -> Cluster:
    """This machine as a cluster of WORLD ranks: the measured attention rate; gloo over loopback."""
    dev = Device("cpu (calibrated)", peak_flops=attn_rate, memory_bytes=16e9, attn_efficiency=1.0,
                 matmul_efficiency=1.0, half_tokens=64.0, call_overhead_s=30e-6)
    gloo = Link("gloo-loopback", 100e-6, 1.5e9)
    return Cluster("cpu", dev, WORLD, gloo, gloo, step_overhead_s=50e-6)


def calibrate_rate(seq: int = 4096, heads: int = 8, head_dim: int = 64) -> float:
    """Attention FLOP/s of one process on one document (fwd + bwd counted as 3.5 x 4 x pairs x H x d)."""
    from distattn.bench.attention import BenchSpec, _single_process_time
    spec = BenchSpec(seq_len=seq, heads=heads, kv_heads=heads, head_dim=head_dim, iters=2, warmup=1)
    t = _single_process_time(spec)
    eff = seq / (seq + 64.0)  # the cluster model's call-length correction (half_tokens = 64)
    return 3.5 * 4 * seq * (seq + 1) / 2 * heads * head_dim / t / eff


def predict(s: Setting, cluster: Cluster) -> dict[str, float]:
    from distattn.plan.parallel import doc_balance
    from distattn.plan.step_model import attention_layer_time
    from distattn.sim.model import AttnWorkload
    cu = [0]
    for n in s.doc_lens or [s.seq_len]:
        cu.append(cu[-1] + n)
    w = AttnWorkload(seq=s.seq_len, heads=s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim, dtype_bytes=4)
    out = {}
    for c in CANDIDATES:
        scheme, _, layout = c.partition("@")
        bal = doc_balance([cu], s.seq_len, WORLD, scheme, layout or "zigzag")
        out[c] = attention_layer_time(scheme, w, cluster, WORLD, bal)[0]
    return out


def measure(s: Setting, pool, iters: int = 2) -> dict[str, float]:
    from distattn.bench.attention import BenchSpec, run_attention_bench
    spec = BenchSpec(seq_len=s.seq_len, heads=s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim,
                     doc_lens=s.doc_lens, schemes=list(CANDIDATES), iters=iters, warmup=1, world_size=WORLD)
    rows, _ = run_attention_bench(spec, pool)
    return {r.scheme: r.wall_s for r in rows}


@dataclass
class Verdict:
    setting: str
    predicted: dict[str, float]
    measured: dict[str, float]
    choice: str = ""
    best: str = ""
    loss: float = 0.0          # measured time of the choice over the measured best, minus 1
    notes: list[str] = field(default_factory=list)


def judge(s: Setting, predicted: dict[str, float], measured: dict[str, float]) -> Verdict:
    choice = min(predicted, key=predicted.get)
    best = min(measured, key=measured.get)
    return Verdict(s.name, predicted, measured, choice, best, measured[choice] / measured[best] - 1)


def run(quick: bool = False, iters: int = 2, log=print, only: str | None = None) -> tuple[list[Verdict], float]:
    from distattn.multiproc import RankPool
    rate = calibrate_rate(1024 if quick else 4096)
    cluster = cpu_cluster(rate)
    log(f"attention rate {rate / 1e9:.2f} GFLOP/s (one process, one document)")
    verdicts = []
    pool = RankPool(WORLD, threads=1)
    try:
        for s in settings(quick):
            if only and only not in s.name:
                continue
            v = judge(s, predict(s, cluster), measure(s, pool, iters))
            log(f"  {s.name}: planner {v.choice}, measured best {v.best}, loss {v.loss:+.1%}")
            verdicts.append(v)
    finally:
        pool.close()
    return verdicts, rate


def format_verdicts(verdicts: list[Verdict]) -> str:
    lines = ["| setting | planner's choice | measured best | choice vs best | predicted ms (choice) | "
             "measured ms (choice / best) |", "|---|---|---|---:|---:|---:|"]
    for v in verdicts:
        lines.append(f"| {v.setting} | {v.choice} | {v.best} | {v.loss:+.1%} | {v.predicted[v.choice] * 1e3:.0f} | "
                     f"{v.measured[v.choice] * 1e3:.0f} / {v.measured[v.best] * 1e3:.0f} |")
    within = sum(v.loss <= 0.05 for v in verdicts)
    worst = max((v.loss for v in verdicts), default=0.0)
    lines.append("")
    lines.append(f"first choice within 5 % of the measured best in {within} of {len(verdicts)} settings "
                 f"({within / max(len(verdicts), 1):.0%}); worst {worst:+.1%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two tiny settings (seconds): the harness itself")
    ap.add_argument("--iters", type=int, default=2, help="timed steps per candidate (median)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the verdicts here")
    ap.add_argument("--only", default=None, metavar="TEXT", help="only the settings whose name contains TEXT")
    a = ap.parse_args(argv)
    if a.only and not any(a.only in s.name for s in settings(a.quick)):
        names = ", ".join(s.name for s in settings(a.quick))
        ap.error(f"--only {a.only!r} matches no setting; the settings are: {names}")
    verdicts, rate = run(a.quick, a.iters, only=a.only)
    print(format_verdicts(verdicts))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"attn_rate": rate, "verdicts": [asdict(v) for v in verdicts]}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
