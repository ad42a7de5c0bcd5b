"""`distattn profile CONFIG`: a few training steps under torch.profiler, then the overlap report.

For every requested scheme the runner starts ``parallel.world_size`` local ranks
(the same spawned-process pool as ``--launcher local``), builds the trainer of
the config with that scheme, runs ``warmup`` unprofiled steps, then ``steps``
steps under ``torch.profiler`` (CPU activity, plus CUDA when the ranks use
NCCL). Each profiled step is wrapped in a ``distattn/step#i`` region, which
bounds the analysis window. Each rank writes its Chrome trace (open it in
https://ui.perfetto.dev) and returns the communication its ledger recorded over
the profiled steps; the parent then analyses the traces
(:mod:`distattn.profile.trace`), writes the report (``report.md``, ``.csv``,
``.json``), one timeline PNG per scheme, and the overlap ratios to TensorBoard.

A linear scheme name (``lasp2``, ``lasp1``) profiles the config's model with
that linear scheme, which runs its linear ('L') and delta-rule ('D', 'K')
layers; a model with none of them is switched to all-linear layers
(``model.layer_pattern = L...L``) so the scheme is actually exercised.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from distattn.profile.report import RankRow, SchemeSummary, build_rows, summarize, write_report
from distattn.profile.native_log import quiet_kineto
from distattn.profile.trace import SCHEME_KEY, STEP_PREFIX, analyze, load_trace
from distattn.comm import Comm

__all__ = ["ProfileSpec", "ProfileResult", "scheme_config", "run_profile", "analyze_traces"]

LINEAR = ("lasp2", "lasp1")


@dataclass
class ProfileSpec:
    steps: int = 3
    warmup: int = 1
    schemes: list[str] | None = None  # None: the config's own scheme
    out_dir: str = "runs/profile"
    threads: int = 1  # torch threads per rank
    mode: str = "auto"  # trace analysis: auto | cpu | gpu
    tensorboard: bool = True
    timeout_s: float = 3600.0


@dataclass
class ProfileResult:
    rows: list[RankRow]
    summaries: list[SchemeSummary]
    paths: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def scheme_config(cfg, scheme: str | None, steps: int):
    """The config to profile ``scheme`` with: its own training side effects off, enough steps."""
    from distattn.config import Config, apply_overrides

    data = cfg.model_dump()
    par = data["parallel"]
    if par.get("ring") is not None and par["ring"] * par["ulysses"] == par["cp"]:
        par.pop("ring")  # derived: let validation derive it again for the new scheme
    total = max(steps, 1)
    ov = ["train.tensorboard=false", "train.ckpt_every=0", f"train.steps={total}",
          f"train.warmup_steps={min(cfg.train.warmup_steps, total)}"]
    if scheme:
        ov.append(f"attention.scheme={scheme}")
        if scheme in LINEAR:
            ov.append(f"attention.linear_scheme={scheme}")
            if not set("LDK") & set(cfg.model.layer_kinds()):  # no linear or delta-rule layer to run it
                ov.append(f"model.layer_pattern={'L' * cfg.model.num_layers}")
    return Config.model_validate(apply_overrides(data, ov))


def _accumulate(into: dict, ledger) -> None:
    for op, s in ledger.summary().items():
        d = into.setdefault(op, {"calls": 0, "bytes_sent": 0, "bytes_recv": 0, "exposed_s": 0.0})
        d["calls"] += s.calls
        d["bytes_sent"] += s.bytes_sent
        d["bytes_recv"] += s.bytes_recv
        d["exposed_s"] += s.exposed_s


def _rank_profile(cfg_dict: dict, warmup: int, steps: int, trace_dir: str) -> dict:
    """Rank side: warm up, profile ``steps`` train steps, export the trace."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, record_function

    from distattn.comm import default_ledger
    from distattn.config import Config
    from distattn.train.trainer import Trainer

    cfg = Config.model_validate(cfg_dict)
    rank = dist.get_rank()
    tr = Trainer(cfg, quiet=True)
    try:
        for _ in range(warmup):
            tr.train_step()
        cuda = torch.cuda.is_available() and dist.get_backend() == "nccl"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        ops: dict = {}
        logs = []
        dflt = default_ledger()
        if cuda:
            torch.cuda.synchronize()
        Comm().barrier()
        prof = profile(activities=acts)
        with quiet_kineto():
            prof.start()
        try:
            for i in range(steps):
                dflt.reset()
                with record_function(f"{STEP_PREFIX}{i}"):
                    log = tr.train_step()
                    if cuda:
                        torch.cuda.synchronize()
                _accumulate(ops, tr.ledger)
                _accumulate(ops, dflt)
                logs.append(asdict(log))
            # names the scheme in the trace itself, for `distattn profile --analyze`
            prof.add_metadata_json(SCHEME_KEY, json.dumps(cfg.attention.scheme))
        finally:
            with quiet_kineto():
                prof.stop()
        path = Path(trace_dir) / f"rank{rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with quiet_kineto():
            prof.export_chrome_trace(str(path))
    finally:
        tr.mesh.destroy()
    return {"rank": rank, "trace": str(path), "ledger": {"ops": ops}, "steps": logs}


def analyze_traces(paths: Sequence[str | Path], mode: str = "auto"):
    """Analyse rank traces (a rank's number comes from the trace's ``distributedInfo``)."""
    return sorted((analyze(load_trace(p), mode=mode) for p in paths), key=lambda a: a.rank)


def _tensorboard(out: Path, summaries: Sequence[SchemeSummary], rows: Sequence[RankRow]) -> Path:
    from torch.utils.tensorboard import SummaryWriter
    tb = out / "tensorboard"
    w = SummaryWriter(str(tb))
    for s in summaries:
        if s.overlap == s.overlap:
            w.add_scalar(f"profile/overlap_ratio/{s.scheme}", s.overlap, 0)
        w.add_scalar(f"profile/exposed_ms/{s.scheme}", s.exposed_ms, 0)
        w.add_scalar(f"profile/comm_ms/{s.scheme}", s.comm_ms, 0)
        w.add_scalar(f"profile/compute_ms/{s.scheme}", s.compute_ms, 0)
    for r in rows:
        if r.overlap == r.overlap:
            w.add_scalar(f"profile/overlap_ratio/{r.scheme}/rank{r.rank}", r.overlap, 0)
    w.flush()
    w.close()
    return tb


def run_profile(cfg, spec: ProfileSpec, log: Callable[[str], None] = print) -> ProfileResult:
    """Profile every scheme of ``spec`` on the config's world size; write traces, report, PNGs."""
    from distattn.multiproc import RankPool
    from distattn.profile.timeline import plot_timeline
    from distattn.train.launch import resolve_backend

    from distattn.config import ConfigError
    schemes = list(spec.schemes) if spec.schemes else [cfg.attention.scheme]
    configs, bad = {}, []
    for scheme in schemes:  # every scheme's config is checked before anything is written or started
        try:
            configs[scheme] = scheme_config(cfg, scheme, spec.warmup + spec.steps)
        except ValueError as e:
            bad.append(f"scheme {scheme}: {e}")
    if bad:
        raise ConfigError(bad)
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[RankRow] = []
    summaries: list[SchemeSummary] = []
    paths: dict[str, str] = {}
    errors: dict[str, str] = {}
    pool = None
    try:
        for scheme in schemes:
            scfg = configs[scheme]
            world = scfg.parallel.world_size
            backend = resolve_backend(scfg)
            if pool is None or pool.world != world or pool.backend != backend or not pool.alive:
                if pool is not None:
                    pool.close()
                pool = RankPool(world, backend=backend, threads=spec.threads,
                                pg_timeout_s=scfg.train.comm_timeout_s)
            t0 = time.perf_counter()
            log(f"profile {scheme}: {world} ranks, {spec.warmup} warm-up + {spec.steps} profiled steps")
            try:
                res = pool.run(_rank_profile, scfg.model_dump(), spec.warmup, spec.steps,
                               str(out / "traces" / scheme), timeout=spec.timeout_s)
            except Exception as e:  # a failing scheme is reported; the others still run
                errors[scheme] = str(e).splitlines()[0] if str(e) else type(e).__name__
                log(f"profile {scheme}: failed: {errors[scheme]}")
                pool = None
                continue
            res.sort(key=lambda r: r["rank"])
            analyses = analyze_traces([r["trace"] for r in res], mode=spec.mode)
            srows = build_rows(scheme, analyses, [r["ledger"] for r in res])
            summ = summarize(srows)
            rows += srows
            summaries.append(summ)
            png = plot_timeline(analyses, out / f"timeline_{scheme}.png",
                                title=f"{scheme}: {world} ranks, {spec.steps} training steps "
                                      f"({scfg.model.layer_kinds()}, seq_len {scfg.data.seq_len})")
            paths[f"timeline_{scheme}"] = str(png)
            paths[f"traces_{scheme}"] = str(out / "traces" / scheme)
            ov = "n/a" if math.isnan(summ.overlap) else f"{summ.overlap:.2f}"
            log(f"profile {scheme}: overlap {ov}, exposed {summ.exposed_ms:.1f} ms (max rank), "
                f"{time.perf_counter() - t0:.0f}s")
    finally:
        if pool is not None:
            pool.close()
    title = (f"distattn profile: {spec.steps} steps after {spec.warmup} warm-up; times are unions of "
             f"intervals in the profiled window")
    written = write_report(out, rows, summaries, extra={"errors": errors, "spec": asdict(spec)}, title=title)
    paths.update({k: str(v) for k, v in written.items()})
    if spec.tensorboard and summaries:
        paths["tensorboard"] = str(_tensorboard(out, summaries, rows))
    return ProfileResult(rows=rows, summaries=summaries, paths=paths, errors=errors)
