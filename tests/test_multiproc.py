import pytest
import torch
import torch.distributed as dist

from distattn.multiproc import RankError, RankTimeout, RankPool


def _rank_and_world():
    return dist.get_rank(), dist.get_world_size()


def _sum_ranks():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t.item()


def _fail_on_one():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    dist.barrier()


def _hang_on_one():
    if dist.get_rank() == 1:
        import time
        time.sleep(60)
    return 0


@pytest.mark.parametrize("world", [1, 2, 4])
def test_runs_on_every_rank(ranks, world):
    out = ranks(world, _rank_and_world)
    assert out == [(r, world) for r in range(world)]
    assert ranks(world, _sum_ranks) == [float(sum(range(world)))] * world


def test_failing_rank_traceback_is_shown():
    pool = RankPool(2)
    try:
        with pytest.raises(RankError, match="boom on rank one") as exc:
            pool.run(_fail_on_one, timeout=30)
        assert "rank 1" in str(exc.value)
        assert not pool.alive
    finally:
        pool.close(force=True)


def test_hang_fails_in_seconds():
    pool = RankPool(2)
    try:
        with pytest.raises(RankTimeout, match=r"ranks \[1\] did not finish"):
            pool.run(_hang_on_one, timeout=3)
    finally:
        pool.close(force=True)


class _Reported(RuntimeError):
    report = ("rank one", "a short line")


def _fail_with_report():
    if dist.get_rank() == 1:
        raise _Reported("boom with a report")
    dist.barrier()


def test_rank_error_carries_reports():
    pool = RankPool(2)
    try:
        with pytest.raises(RankError, match="boom with a report") as exc:
            pool.run(_fail_with_report, timeout=30)
        assert exc.value.reports == {1: ("rank one", "a short line")}
        assert "boom with a report" in exc.value.tracebacks[1]
        assert exc.value.blocked == [0]  # rank 0 waited in the barrier
    finally:
        pool.close(force=True)


def _noisy(n):
    import os
    import sys
    print("to stdout")
    sys.stderr.write("to stderr\n")
    os.write(2, b"from C at fd 2\n")
    if n:
        raise ValueError(f"data.path='x' does not exist (n={n})")
    return n


def _logged_noisy(out_dir, n):
    from distattn.train.ranklog import run_logged
    return run_logged(out_dir, 3, "trainer", _noisy, n)


def test_rank_log_tees_output_and_keeps_tracebacks_off_the_terminal(tmp_path, capfd):
    """In a rank process (where sys.stdout is fd 1), as the launchers run it; a fresh pool, so
    its processes write to the fds captured here."""
    from distattn.train.ranklog import RankFailure, log_path
    pool = RankPool(1)
    try:
        assert pool.run(_logged_noisy, str(tmp_path), 0, timeout=30) == [0]
        [failure] = pool.run(_logged_noisy, str(tmp_path), 1, timeout=30)
    finally:
        pool.close()
    shown = capfd.readouterr()
    log = log_path(tmp_path, 3).read_text()
    assert log.count("=== distattn rank 3 (trainer)") == 2  # appended per run
    for text in ("to stdout", "to stderr", "from C at fd 2"):
        assert log.count(text) == 2 and (shown.out + shown.err).count(text) == 2
    assert "Traceback" in log and "Traceback" not in shown.out + shown.err
    assert failure == RankFailure(rank=3, message="data.path='x' does not exist (n=1)",
                                  log=str(log_path(str(tmp_path), 3)), echo=False)


def test_failure_lines_show_first_causes():
    from distattn.train.launch_errors import WorkerFailure
    from distattn.train.ranklog import RankFailure, is_echo, one_line
    assert one_line(IndexError("index out of range in self")) == "IndexError: index out of range in self"
    assert one_line(ValueError("two\nlines")) == "two lines"
    assert is_echo(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert not is_echo(ValueError("data.jsonl_field='txt' is not in the file"))
    real = RankFailure(1, "boom", "runs/x/logs/rank1.log")
    echo = RankFailure(0, "Connection closed by peer", "runs/x/logs/rank0.log", echo=True)
    assert str(WorkerFailure.from_ranks([echo, real])) == \
        "rank 1 failed: boom (full log: runs/x/logs/rank1.log)"
    same = [RankFailure(r, "boom", f"l{r}") for r in (2, 0, 1)]
    assert str(WorkerFailure.from_ranks(same)) == \
        "rank 0 failed: boom (full log: l0); ranks 1, 2 failed the same way"
    # only echoes: show them, there is nothing else
    assert str(WorkerFailure.from_ranks([echo])).startswith("rank 0 failed: Connection closed by peer")
