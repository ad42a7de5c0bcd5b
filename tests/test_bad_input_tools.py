"""Bad arguments to the planning, benchmark, simulation, sweep and profile commands, through the CLI.

Each row checks the exit code, that no traceback shows, that the message names
the option (or key) and the value the user typed, and that the refusal is fast:
every one of them comes before any planning, rank or output file.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from cli_util import assert_refused, run_cli, run_cli_process

ROOT = Path(__file__).resolve().parent.parent
SWEEP = str(ROOT / "configs" / "sweeps" / "example.yaml")
S = "--set"

CASES = [
    # (id, argv, names that must appear in the message)
    # plan memory
    ("memory-worlds-zero", ["plan", "memory", "--worlds", "0"], ["--worlds", "'0'", "positive"]),
    ("memory-worlds-negative", ["plan", "memory", "--worlds", "-2"], ["--worlds", "'-2'"]),
    ("memory-worlds-text", ["plan", "memory", "--worlds", "1,x"], ["--worlds", "'1,x'"]),
    ("memory-scheme", ["plan", "memory", "--schemes", "foo"], ["--schemes", "'foo'", "ring"]),
    ("memory-budget-negative", ["plan", "memory", "--budget-gib", "-1"], ["--budget-gib", "'-1'", "> 0"]),
    ("memory-budget-nan", ["plan", "memory", "--budget-gib", "nan"], ["--budget-gib", "'nan'"]),
    ("memory-recompute", ["plan", "memory", "--recompute", "bogus"], ["--recompute", "'bogus'", "selective"]),
    # plan batch
    ("batch-seq-len", ["plan", "batch", "--seq-len", "-5"], ["--seq-len", "'-5'", ">= 1"]),
    ("batch-lognormal-text", ["plan", "batch", "--lognormal", "abc"], ["--lognormal", "'abc'", "MEAN,SIGMA"]),
    ("batch-lognormal-sigma", ["plan", "batch", "--lognormal", "8192,-1"], ["--lognormal", "'8192,-1'", "SIGMA"]),
    ("batch-dp-zero", ["plan", "batch", "--dp", "0"], ["--dp", "'0'"]),
    ("batch-docs-zero", ["plan", "batch", "--lognormal", "100,1", "--docs", "0"], ["--docs", "'0'"]),
    ("batch-steps-zero", ["plan", "batch", "--steps", "0"], ["--steps", "'0'"]),
    ("batch-micro-zero", ["plan", "batch", "--micro", "0"], ["--micro", "'0'"]),
    ("batch-max-defer", ["plan", "batch", "--max-defer", "-1"], ["--max-defer", "'-1'", ">= 0"]),
    ("batch-linear-cost", ["plan", "batch", "--linear-cost", "-3"], ["--linear-cost", "'-3'"]),
    ("batch-two-configs", ["plan", "batch", "configs/default.yaml", "--config", "configs/presets/ring.yaml"],
     ["CONFIG 'configs/default.yaml'", "--config 'configs/presets/ring.yaml'"]),
    ("batch-bad-set", ["plan", "batch", S, "data.seq_len=0"], ["data.seq_len", "0"]),
    # bench balance
    ("balance-dp-zero", ["bench", "balance", "--dp", "0"], ["--dp", "'0'"]),
    ("balance-dp-text", ["bench", "balance", "--dp", "2,x"], ["--dp", "'2,x'"]),
    ("balance-dist", ["bench", "balance", "--dists", "foo"], ["--dists", "'foo'", "lognormal"]),
    ("balance-seq-len", ["bench", "balance", "--seq-len", "0"], ["--seq-len", "'0'"]),
    ("balance-measure-scale", ["bench", "balance", "--measure-scale", "0"], ["--measure-scale", "'0'"]),
    ("balance-lognormal-mean", ["bench", "balance", "--lognormal", "0,1"], ["--lognormal", "'0,1'"]),
    ("balance-seed", ["bench", "balance", "--seed", "-1"], ["--seed", "'-1'"]),
    ("balance-bad-set", ["bench", "balance", S, "data.source=nosuch"], ["data.source", "nosuch"]),
    # bench cad / linear / hetero / attention
    ("cad-world-zero", ["bench", "cad", "--world", "0", "--no-planner"], ["--world", "'0'"]),
    ("cad-heads", ["bench", "cad", "--heads", "4", "--kv-heads", "3"], ["--heads 4", "--kv-heads 3", "1, 2, 4"]),
    ("cad-mode", ["bench", "cad", "--modes", "packing,bogus"], ["--modes", "'bogus'", "per-doc CP"]),
    ("cad-token-cost", ["bench", "cad", "--token-cost", "x"], ["--token-cost", "'x'", "auto"]),
    ("cad-plan-tokens", ["bench", "cad", "--plan-tokens", "0"], ["--plan-tokens", "'0'"]),
    ("cad-tolerance", ["bench", "cad", "--tolerance", "-1"], ["--tolerance", "'-1'"]),
    ("linear-decay", ["bench", "linear", "--decay", "2"], ["--decay", "'2'", "(0, 1]"]),
    ("linear-scheme", ["bench", "linear", "--schemes", "ring,x"], ["--schemes", "'x'", "lasp2"]),
    ("linear-block", ["bench", "linear", "--block", "0"], ["--block", "'0'"]),
    ("parallel-gpus-zero", ["plan", "parallel", "--gpus", "0"], ["--gpus", "'0'"]),
    ("parallel-lengths", ["plan", "parallel", "--gpus", "2", "--lengths", "/nonexistent/lengths.txt"],
     ["--lengths /nonexistent/lengths.txt", "no such file", "data, none"]),
    ("linear-rule-decay", ["bench", "linear", "--rule", "gated_delta", "--decay", "0.9"],
     ["rule=gated_delta", "decay=0.9"]),
    ("hetero-lengths", ["bench", "hetero", "--lengths", "-4"], ["--lengths", "'-4'"]),
    ("attention-bad-set", ["bench", "attention", S, "bench.world_size=0"], ["bench.world_size", "0"]),
    # simulate
    ("sim-seq-negative", ["simulate", "--seq", "-5"], ["--seq", "'-5'"]),
    ("sim-gpus-zero", ["simulate", "--gpus", "0"], ["--gpus", "'0'"]),
    ("sim-gpus-huge", ["simulate", "--gpus", "99999"], ["--gpus", "'99999'", "8192"]),
    ("sim-scheme", ["simulate", "--schemes", "foo,ring"], ["--schemes", "'foo'", "ring-basic"]),
    ("sim-usp-degree", ["simulate", "--schemes", "usp:0"], ["--schemes", "'usp:0'", "usp:U"]),
    ("sim-seq-below-gpus", ["simulate", "--seq", "5", "--gpus", "64"], ["--seq 5", "64 GPUs"]),
    ("sim-heads", ["simulate", "--heads", "32", "--kv-heads", "5"], ["--heads 32", "--kv-heads 5"]),
    ("sim-overhead", ["simulate", "--overhead", "-1"], ["--overhead", "'-1'"]),
    ("sim-scaling", ["simulate", "--scaling", "8,0"], ["--scaling", "'8,0'"]),
    ("sim-calibrate-missing", ["simulate", "--calibrate", "nosuch.json"], ["--calibrate nosuch.json"]),
    # sweep
    ("sweep-lengths", ["sweep", SWEEP, S, "lengths=[0]"], ["--set lengths=[0]", "lengths", "positive"]),
    ("sweep-unknown-key", ["sweep", SWEEP, S, "lenghts=[1]"], ["--set lenghts=[1]", "'lengths'"]),
    ("sweep-heads-text", ["sweep", SWEEP, S, "heads=abc"], ["--set heads=abc", "'abc'"]),
    ("sweep-set-no-equals", ["sweep", SWEEP, S, "heads"], ["--set 'heads'", "KEY=VALUE"]),
    ("sweep-search-max", ["sweep", SWEEP, S, "search.max=1"], ["--set search.max=1", "search.start=4096"]),
    ("sweep-plan-margin", ["sweep", SWEEP, S, "plan_margin=2"], ["--set plan_margin=2", "[0, 1)"]),
    ("sweep-missing-file", ["sweep", "nosuch.yaml"], ["nosuch.yaml", "configs/sweeps/example.yaml"]),
    # profile
    ("profile-steps", ["profile", "--steps", "0"], ["--steps", "'0'"]),
    ("profile-warmup", ["profile", "--warmup", "-1"], ["--warmup", "'-1'"]),
    ("profile-threads", ["profile", "--threads", "0"], ["--threads", "'0'"]),
    ("profile-analyze-missing", ["profile", "--analyze", "nosuch_dir"], ["--analyze nosuch_dir"]),
]


@pytest.mark.parametrize("argv,names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused(argv, names, tmp_path):
    res = run_cli(argv, cwd=ROOT)
    assert_refused(res, *names, code=2, max_s=10)


def test_profile_unknown_scheme_writes_nothing(tmp_path):
    out = tmp_path / "prof"
    res = run_cli(["profile", "--schemes", "ring,foo", "--out", str(out)], cwd=ROOT)
    assert_refused(res, "--schemes", "'foo'")
    assert not out.exists()


def test_profile_scheme_the_config_cannot_run_writes_nothing(tmp_path):
    out = tmp_path / "prof"
    res = run_cli(["profile", "--schemes", "ring,ulysses", "--out", str(out), S, "model.num_attention_heads=3",
                   S, "model.hidden_size=96", S, "model.num_query_groups=1"], cwd=ROOT)
    assert_refused(res, "scheme ulysses", "3 heads")
    assert not out.exists()


@pytest.mark.timeout(60)
def test_plan_memory_worlds_zero_does_not_hang():
    """It used to spin at 100% CPU forever; the real console script must refuse it quickly."""
    res = run_cli_process(["plan", "memory", "--worlds", "0"], timeout=45, cwd=ROOT)
    assert_refused(res, "--worlds", "'0'", max_s=45)


def _subparser(parser, *path):
    import argparse
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


@pytest.mark.parametrize("path", [("plan", "memory"), ("plan", "batch"), ("simulate",), ("sweep",), ("profile",),
                                  ("bench", "attention"), ("bench", "linear"), ("bench", "hetero"),
                                  ("bench", "cad"), ("bench", "balance")], ids=" ".join)
def test_every_option_has_help_and_shows_its_default(path):
    import argparse

    from distattn.cli import build_parser
    from distattn.cli_args import HelpFormatter
    p = _subparser(build_parser(), *path)
    assert p.formatter_class is HelpFormatter
    for a in p._actions:
        if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
            continue
        assert a.help and a.help.strip(), f"{' '.join(path)} {a.dest}: no help text"
    text = p.format_help()
    assert "default" in text
    if path != ("bench", "attention"):  # its only options are flags and a path
        assert "(default: " in text
