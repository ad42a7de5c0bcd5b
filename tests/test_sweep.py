"""`distattn sweep`: a 2 x 2 grid runs and writes its CSV and plots; failures are recorded; the
maximum-context search; sweep files validate."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from distattn.sweep import (Point, SearchSpec, SweepSpec, _classify_failure, load_sweep,
                            max_context_search, run_sweep)

ROOT = Path(__file__).resolve().parent.parent


def test_two_schemes_two_lengths_write_csv_and_png(tmp_path):
    spec = SweepSpec(name="t", out_dir=str(tmp_path), schemes=["ring", "lasp2", "usp:4"], lengths=[512, 1024],
                     worlds=[2], heads=4, kv_heads=2, head_dim=16, iters=1, warmup=0,
                     memory_budget_mib=1e6, search=SearchSpec(enabled=False))
    res = run_sweep(spec, progress=False)
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [(r["scheme"], int(r["n_tokens"])) for r in rows] == [
        ("ring", 512), ("ring", 1024), ("lasp2", 512), ("lasp2", 1024), ("usp:4", 512), ("usp:4", 1024)]
    ok = [p for p in res["points"] if p.scheme != "usp:4"]
    for p in ok:
        assert p.status == "ok", p.error
        assert p.step_s > 0 and p.tokens_per_s > 0 and p.compute_s > 0
        assert p.bytes_sent > 0 and p.peak_mem_bytes > 0 and p.fits
    # ring traffic doubles with N (the ledger, not a formula)
    ring = {p.n_tokens: p.bytes_sent for p in ok if p.scheme == "ring"}
    assert ring[1024] == 2 * ring[512]
    # a scheme that cannot run this shape is recorded and the sweep goes on
    bad = [p for p in res["points"] if p.scheme == "usp:4"]
    assert all(p.status == "invalid" and "ulysses" in p.error for p in bad)
    for name in ("throughput.png", "memory.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert "ring" in (tmp_path / "sweep.md").read_text()


def _fake_runner(limit: int, calls: list, crash: int | None = None):
    """Fits up to `limit` tokens; from `crash` tokens on the point fails outright (oom)."""
    def run(n: int) -> Point:
        calls.append(n)
        failed = crash is not None and n >= crash
        return Point("s", 2, n, phase="search", peak_mem_bytes=n, fits=n <= limit and not failed,
                     status="oom" if failed else "ok")
    return run


def test_max_context_search_doubles_then_bisects():
    spec = SweepSpec(memory_budget_mib=1, search=SearchSpec(start=1024, max=1 << 20, granularity=256))
    calls: list[int] = []
    known = [Point("s", 2, 512, fits=True), Point("s", 2, 1024, fits=True)]
    r = max_context_search(spec, "s", 2, known, _fake_runner(5000, calls))
    assert r["max_tokens"] == 4864 and r["first_failing"] == 5120   # within one granularity step
    assert calls[:3] == [2048, 4096, 8192]                           # doubling from the best fit
    assert r["limit"] == "over budget"
    # nothing fits: the search bisects down to one granule
    r = max_context_search(spec, "s", 2, [], _fake_runner(100, calls := []))
    assert r["max_tokens"] == 0 and r["first_failing"] == 256 and calls == [1024, 512, 256]
    # a failing point (not just over budget) is named as the limit
    r = max_context_search(spec, "s", 2, [Point("s", 2, 1024, fits=True)], _fake_runner(1500, []))
    assert r["max_tokens"] == 1280 and r["limit"] == "over budget"
    r = max_context_search(spec, "s", 2, [Point("s", 2, 1024, fits=True)],
                           _fake_runner(10**9, [], crash=1200))
    assert r["limit"] == "oom" and r["max_tokens"] == 1024 and r["first_failing"] == 1280
    # the search stops at search.max
    spec.search.max = 4096
    r = max_context_search(spec, "s", 2, [], _fake_runner(10**9, []))
    assert r["max_tokens"] == 4096 and "search.max" in r["limit"]


def test_failures_are_classified():
    assert _classify_failure("RuntimeError: DefaultCPUAllocator: can't allocate memory") == "oom"
    assert _classify_failure("CUDA out of memory. Tried to allocate") == "oom"
    assert _classify_failure("task: rank(s) [1] died (exit codes [-9])") == "oom"
    assert _classify_failure("task timed out after 600s") == "timeout"
    assert _classify_failure("ValueError: boom") == "failed"


def test_example_sweep_loads_and_bad_keys_are_named(tmp_path):
    spec = load_sweep(ROOT / "configs" / "sweeps" / "example.yaml")
    assert spec.schemes and spec.memory_budget_mib and spec.search.enabled
    bad = tmp_path / "bad.yaml"
    bad.write_text("schemes: [ring]\nlenghts: [1024]\n")
    with pytest.raises(ValueError, match="lenghts"):
        load_sweep(bad)
    bad.write_text("schemes: [rnig]\nmemory_budget_mib: 10\n")
    with pytest.raises(ValueError, match="rnig"):
        load_sweep(bad)
    from distattn.cli import main
    assert main(["sweep", str(bad)]) == 2  # named on stderr, nothing started
