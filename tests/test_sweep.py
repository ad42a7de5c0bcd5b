"""`distattn sweep`: a 2 x 2 grid runs and writes its CSV and plots; failures are recorded; the
maximum-context search, with and without the memory planner; points the planner rules out are
skipped; sweep files validate."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from distattn.sweep import (Point, SearchSpec, SweepSpec, _classify_failure, load_sweep,
                            max_context_search, planner_skip, run_sweep)

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


def test_planner_skips_only_what_it_is_sure_about():
    spec = SweepSpec(memory_budget_mib=10, plan_margin=0.15)
    assert planner_skip(spec, int(11.5 * 2**20)) is None          # 85% of 11.5 MiB fits: measure it
    why = planner_skip(spec, 20 * 2**20)                           # 85% of 20 MiB does not
    assert why and "20.0 MiB > budget 10 MiB" in why and "plan_margin=0.15" in why
    assert ">= 0.50" in why and "memory_budget_mib" in why         # what would let it run
    assert planner_skip(SweepSpec(memory_budget_mib=10, use_planner=False), 20 * 2**20) is None
    assert planner_skip(SweepSpec(memory_budget_mib=None), 20 * 2**20) is None
    assert planner_skip(spec, None) is None                        # no model: always run
    with pytest.raises(ValueError, match=r"plan_margin: 1.5 must be a number in \[0, 1\)"):
        SweepSpec(memory_budget_mib=10, plan_margin=1.5).check()


def test_tiny_budget_skips_points_without_running_them(tmp_path, monkeypatch):
    import distattn.sweep as sweep
    calls = []
    monkeypatch.setattr(sweep, "run_point_on_ranks", lambda *a, **k: calls.append(a) or Point("x", 2, 0))
    spec = SweepSpec(name="t", out_dir=str(tmp_path), schemes=["ring", "lasp2"], lengths=[4096, 8192],
                     worlds=[2], memory_budget_mib=1, search=SearchSpec(start=1024, max=8192))
    res = run_sweep(spec, progress=False)
    assert calls == []                                             # nothing ran, no ranks were started
    grid = [p for p in res["points"] if p.phase == "grid"]
    assert len(grid) == 4 and all(p.status == "skipped" and p.fits is False for p in grid)
    assert all(p.predicted_mem_bytes > 2**20 and "planner predicts" in p.error for p in grid)
    # the search starts where the planner says nothing fits and stops without measuring
    assert [(r["max_tokens"], r["planned_tokens"], r["limit"]) for r in res["max_context"]] == [
        (0, 0, "planner: over budget")] * 2
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert {r["status"] for r in rows} == {"skipped"} and all(int(r["predicted_mem_bytes"]) > 0 for r in rows)
    md = (tmp_path / "sweep.md").read_text()
    assert "pred MiB" in md and "planner's max N" in md


def test_planner_seeded_search_finds_the_same_limit_in_fewer_runs():
    spec = SweepSpec(memory_budget_mib=1, search=SearchSpec(start=1024, max=1 << 20, granularity=256))
    known = [Point("s", 2, 1024, fits=True)]
    plain = max_context_search(spec, "s", 2, known, _fake_runner(23000, plain_calls := []))
    for seed in (21000, 23000, 25000):                             # the planner a little off either way
        r = max_context_search(spec, "s", 2, known, _fake_runner(23000, calls := []), seed=seed)
        assert r["max_tokens"] == plain["max_tokens"] == 22784 and r["planned_tokens"] == seed
        assert calls[0] == seed // 256 * 256 and len(calls) < len(plain_calls)
    # a seed below a measured fit steps up from the fit instead
    r = max_context_search(spec, "s", 2, [Point("s", 2, 16384, fits=True)], _fake_runner(23000, calls := []),
                           seed=8192)
    assert r["max_tokens"] == 22784 and calls[0] == 18432
    # nothing fits at all, and search.max caps a seed that would fit beyond it
    assert max_context_search(spec, "s", 2, [], _fake_runner(100, []), seed=0)["max_tokens"] == 0
    spec.search.max = 4096
    r = max_context_search(spec, "s", 2, [], _fake_runner(10**9, []), seed=1 << 20)
    assert r["max_tokens"] == 0 and "search.max" in r["limit"]


def test_planner_seeded_sweep_search_matches_the_doubling_search(tmp_path):
    found = {}
    for use in (True, False):
        spec = SweepSpec(name="t", out_dir=str(tmp_path / str(use)), schemes=["lasp2"], lengths=[1024],
                         worlds=[2], iters=1, warmup=0, memory_budget_mib=12, use_planner=use,
                         search=SearchSpec(start=1024, max=16384, granularity=256))
        res = run_sweep(spec, progress=False)
        found[use] = (res["max_context"][0]["max_tokens"], len(res["points"]))
    (seeded, n_seeded), (plain, n_plain) = found[True], found[False]
    assert abs(seeded - plain) <= 256 and 3000 < plain < 4600       # ~3 KiB per token for this shape
    assert n_seeded <= n_plain


def test_set_overrides_sweep_keys_and_names_itself_in_errors():
    from distattn.config import ConfigError
    example = ROOT / "configs" / "sweeps" / "example.yaml"
    spec = load_sweep(example, sets=["lengths=[1024, 2048]", "search.max=8192", "use_planner=false"])
    assert spec.lengths == [1024, 2048] and spec.search.max == 8192 and spec.use_planner is False
    assert spec.search.granularity == 1024                        # the file's other search keys stay
    with pytest.raises(ConfigError, match=r"--set kv_heads=3: kv_heads: heads=4 is not divisible"):
        load_sweep(example, sets=["kv_heads=3"])
    with pytest.raises(ConfigError, match=r"--set search.strat=1: unknown key 'search.strat' "
                                          r"\(did you mean 'search.start'\?\)"):
        load_sweep(example, sets=["search.strat=1"])
