"""Profiling: interval algebra, the overlap analyser on synthetic traces with known answers,
the profiler labels of comm and kernels, and one end-to-end `distattn profile` run."""
from __future__ import annotations

import json
import math

import pytest
import torch

from distattn.profile import labels
from distattn.profile.trace import (STEP_PREFIX, analyze, intersect, measure, parse_trace, subtract,
                                    union)


# ----------------------------------------------------------------------------- interval algebra


def test_union_merges_overlaps_and_drops_empty_spans():
    assert union([(5, 7), (0, 2), (1, 3), (3, 4), (9, 9), (8, 6)]) == [(0, 4), (5, 7)]
    assert measure([(0, 10), (2, 3), (5, 12)]) == 12


def test_intersect_and_subtract_are_exact():
    a = [(0, 10), (20, 30)]
    b = [(5, 25), (28, 40)]
    assert intersect(a, b) == [(5, 10), (20, 25), (28, 30)]
    assert subtract(a, b) == [(0, 5), (25, 28)]
    assert subtract(b, a) == [(10, 20), (30, 40)]
    # measure identities: |a| = |a ∩ b| + |a − b|
    assert measure(a) == measure(intersect(a, b)) + measure(subtract(a, b))
    assert subtract(a, []) == a and intersect(a, []) == []


# ----------------------------------------------------------------------------- synthetic traces


def _x(name, ts, dur, cat="user_annotation", tid=1, **args):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "pid": 1, "tid": tid, "args": args}


def test_cpu_trace_overlap_is_exact():
    """Step window [0, 300). Compute [0,100) U [150,250) (nested labels must not double count);
    gloo transfer [50,200); blocked [100,150) and [250,270) (a late wait with no gloo record)."""
    events = [
        _x(f"{STEP_PREFIX}0", 0, 300),
        _x("compute/attn_fwd", 0, 100), _x("compute/linear_state", 20, 30),   # nested inside
        _x("compute/attn_bwd", 150, 100),
        _x("comm/all_gather", 45, 5),
        _x("gloo:all_gather", 50, 150, tid=9),
        _x("comm_wait/all_gather", 100, 50),
        _x("comm/send", 250, 20), _x("comm_wait/send", 250, 20),
        _x("compute/attn_fwd", 400, 50),            # outside the window: ignored
        _x("comm_wait/all_gather", 500, 10),
        {"ph": "i", "name": "marker", "ts": 10},    # not a complete event
    ]
    a = analyze(parse_trace({"traceEvents": events, "distributedInfo": {"rank": 3}}))
    us = 1e-6
    assert a.rank == 3 and a.mode == "cpu" and a.steps == 1
    assert a.window_s == pytest.approx(300 * us)
    assert a.compute_s == pytest.approx(200 * us)
    assert a.transfer_s == pytest.approx(150 * us)
    assert a.blocked_s == pytest.approx(70 * us)
    # communication = |transfer U blocked| = [50,200) U [250,270) = 170
    assert a.comm_s == pytest.approx(170 * us)
    assert a.exposed_s == pytest.approx(70 * us)
    assert a.overlap == pytest.approx(1 - 70 / 170)
    assert a.comm_compute_overlap_s == pytest.approx(100 * us)  # [50,100) + [150,200)
    assert a.waits_by_op == {"all_gather": {"calls": 1, "blocked_s": pytest.approx(50 * us)},
                             "send": {"calls": 1, "blocked_s": pytest.approx(20 * us)}}
    assert a.issues_by_op == {"all_gather": 1, "send": 1}
    assert a.compute_by_kind["attn_fwd"] == pytest.approx(100 * us)
    assert a.lanes["blocked"] == [pytest.approx((100 * us, 150 * us)), pytest.approx((250 * us, 270 * us))]


def test_gpu_trace_uses_nccl_kernels_as_communication():
    """Compute kernels [0,100) and [120,200); NCCL kernels [80,140) and [190,230)
    (old and new NCCL kernel names). Exposed = comm − compute = [100,120) + [200,230) = 50."""
    events = [
        _x("aten::mm", 0, 5, cat="cpu_op"),
        _x("sm90_xmma_gemm_bf16", 0, 100, cat="kernel", tid=7),
        _x("flash_fwd_kernel", 120, 80, cat="kernel", tid=7),
        _x("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 80, 60, cat="kernel", tid=20),
        _x("ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t", 190, 40, cat="kernel", tid=21),
        _x("Memcpy DtoD", 300, 10, cat="gpu_memcpy", tid=7),
        _x("comm_wait/all_gather", 90, 10),
        # the step region on the host (launches run ahead of the device) and its device copy
        _x(f"{STEP_PREFIX}0", -100, 210), _x(f"{STEP_PREFIX}0", 0, 230, cat="gpu_user_annotation", tid=7),
        _x("comm/all_gather", -90, 5),  # issued before the first kernel ran: still this step's
    ]
    a = analyze(parse_trace({"traceEvents": events}))
    us = 1e-6
    assert a.mode == "gpu" and a.steps == 1 and a.issues_by_op == {"all_gather": 1}
    assert a.compute_s == pytest.approx(180 * us)
    assert a.comm_s == pytest.approx(100 * us)
    assert a.exposed_s == pytest.approx(50 * us)
    assert a.overlap == pytest.approx(0.5)
    assert a.blocked_s == pytest.approx(10 * us)
    assert a.window_s == pytest.approx(230 * us)
    # forcing the CPU reading on the same trace ignores device kernels
    c = analyze(parse_trace({"traceEvents": events}), mode="cpu")
    assert c.compute_s == 0 and c.comm_s == pytest.approx(10 * us) and c.overlap == 0.0


def test_no_communication_gives_nan_overlap():
    a = analyze(parse_trace({"traceEvents": [_x("compute/attn_fwd", 0, 10)]}))
    assert math.isnan(a.overlap) and a.comm_s == 0


def test_trace_files_round_trip(tmp_path):
    import gzip
    data = {"traceEvents": [_x("compute/attn_fwd", 0, 10), _x("comm_wait/exchange", 10, 5)],
            "distributedInfo": {"rank": 1}}
    p = tmp_path / "r.json.gz"
    with gzip.open(p, "wt") as f:
        json.dump(data, f)
    from distattn.profile.trace import load_trace
    a = analyze(load_trace(p))
    assert a.rank == 1 and a.exposed_s == pytest.approx(5e-6)


def test_analyze_cli_reads_existing_traces(tmp_path, capsys):
    from distattn.cli import main
    traces = tmp_path / "traces"
    traces.mkdir()
    for r in (0, 1):
        (traces / f"rank{r}.json").write_text(json.dumps({
            "traceEvents": [_x(f"{STEP_PREFIX}0", 0, 100), _x("compute/attn_fwd", 0, 60),
                            _x("gloo:all_gather", 40, 40 + 10 * r, tid=2), _x("comm_wait/all_gather", 60, 20)],
            "distributedInfo": {"rank": r}}))
    assert main(["profile", "--analyze", str(traces), "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "| trace | 0 |" in text and "| trace | 1 |" in text
    assert "n/a (no ledger)" in text and "DIFFERS" not in text       # no ledger: not a disagreement
    assert "| trace | all_gather | 1 |" in text                      # calls counted from the trace
    assert (tmp_path / "out" / "timeline_trace.png").is_file()
    assert main(["profile", "--analyze", str(tmp_path / "missing")]) == 2
    # the runner's layout traces/<scheme>/rank<r>.json names the scheme
    runner = tmp_path / "run" / "traces" / "ulysses"
    runner.mkdir(parents=True)
    for f in traces.iterdir():
        (runner / f.name).write_text(f.read_text())
    assert main(["profile", "--analyze", str(runner.parent), "--out", str(tmp_path / "out2")]) == 0
    text = capsys.readouterr().out
    assert "| ulysses | 0 |" in text and "| ulysses | 1 |" in text and "timeline_ulysses.png" in text


def test_kineto_records_are_stripped_and_lines_ended():
    from distattn.profile.native_log import strip_kineto
    rec = "USDT:2026-12-02 09:23:24 5564:5564 SyncActivityProfilerHandler.cpp:52] profiler_start"
    stage = "STAGE:2026-12-02 09:23:24 5564:5564 SyncActivityProfilerHandler.cpp:60] Completed Stage: Collection"
    assert strip_kineto(f"{rec}{rec}a warning\n{stage}\nlast") == "a warning\nlast\n"
    assert strip_kineto(rec + "\n" + stage) == ""


# ----------------------------------------------------------------------------- labels


def test_region_is_free_without_a_profiler():
    assert not labels.profiler_active()
    assert labels.region("compute/attn_fwd") is labels.region("comm/x")  # the shared no-op


def _names(prof) -> list[str]:
    return [e.name for e in prof.events()]


def test_kernels_and_comm_ops_are_labelled_under_the_profiler():
    from torch.profiler import ProfilerActivity, profile

    from distattn.comm import Comm, CommLedger
    from distattn.kernels import block_backward, block_forward, plan_calls
    from distattn.kernels.linear import linear_attention_local
    from distattn.layout import get_layout

    runs = get_layout("contiguous", 32, 1).runs(0)
    calls = plan_calls(runs, runs, True)
    q, k, v = (torch.randn(32, 2, 8) for _ in range(3))
    ledger = CommLedger()
    comm = Comm(None, ledger)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out, lse = block_forward(q, k, v, calls, 0.3)
        block_backward(torch.ones_like(q), q, k, v, out.to(q.dtype), lse, calls, 0.3)
        a, b, c = (x.clone().requires_grad_(True) for x in (q, k, v))
        linear_attention_local(a, b, c).sum().backward()
        comm.all_gather(q)                                # blocking
        comm.all_gather(q, async_op=True).wait()          # async: issue + wait
        comm.all_reduce(q.clone(), "sum", True).wait()    # async via a positional argument
        h = comm.exchange([(q, 0)], [(torch.empty_like(q), 0)])
        h.wait()
    names = _names(prof)
    for n in ("compute/attn_fwd", "compute/attn_bwd", "compute/linear_fwd", "compute/linear_bwd"):
        assert n in names, n
    assert names.count("comm/all_gather") == 2
    assert names.count("comm_wait/all_gather") == 2
    assert names.count("comm_wait/all_reduce") == 1 and names.count("comm/exchange") == 1
    # one blocked region per ledger record: the trace and the ledger count the same waits
    assert sum(n.startswith("comm_wait/") for n in names) == len(ledger.records) == 4


# ----------------------------------------------------------------------------- end to end


def test_profile_run_writes_traces_report_timeline_and_tensorboard(tmp_path):
    from distattn.config import load_config
    from distattn.profile.run import ProfileSpec, run_profile

    cfg = load_config(None, ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2",
                             "model.num_query_groups=1", "model.ffn_hidden_size=64", "data.seq_len=256",
                             f"run.output_dir={tmp_path / 'run'}"])
    res = run_profile(cfg, ProfileSpec(steps=1, warmup=1, schemes=["ring"], out_dir=str(tmp_path / "prof")),
                      log=lambda m: None)
    assert not res.errors, res.errors
    assert [r.rank for r in res.rows] == [0, 1]
    for r in res.rows:
        assert r.steps == 1 and r.compute_ms > 0 and r.comm_ms > 0, r
        assert 0.0 <= r.overlap <= 1.0, r
        assert r.trace_waits == r.ledger_calls > 0, r      # every ledgered wait is in the trace
        assert r.bytes_sent > 0, r
    (s,) = res.summaries
    assert s.ledger_agrees, res.rows
    out = tmp_path / "prof"
    assert (out / "traces" / "ring" / "rank0.json").is_file()
    assert (out / "timeline_ring.png").stat().st_size > 1000
    assert "ring" in (out / "report.md").read_text()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
