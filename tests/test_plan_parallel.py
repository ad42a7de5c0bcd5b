"""`distattn plan parallel` picks the obvious answer in hand-checkable cases, explains what it drops,
and writes a config that trains."""
from __future__ import annotations

from distattn.cli import main as cli_main
from distattn.config import load_config
from distattn.plan.parallel import doc_balance, plan_parallel, sample_windows
from distattn.sim.cluster import get_cluster
from train_util import one_step

H100 = get_cluster("h100")
# a small Llama-like shape whose attention dominates at 128K tokens
SMALL = ["model.num_layers=4", "model.hidden_size=1024", "model.num_attention_heads=8",
         "model.num_query_groups=4", "model.ffn_hidden_size=2816", "model.vocab_size=32000",
         "model.dtype=bf16", "data.seq_len=131072"]


def test_fewer_heads_than_cp_excludes_ulysses_with_the_reason():
    plan = plan_parallel(None, SMALL, 16, H100)
    refused = [c for c in plan.dropped if c.scheme == "ulysses" and c.cp == 16]
    assert refused and all("ulysses needs heads % ulysses == 0: 8 heads, ulysses=16" in c.reason for c in refused)
    assert not [c for c in plan.ranked if c.scheme == "ulysses" and c.cp == 16]
    assert plan.best is not None and plan.best.reason == "fastest that fits"


def test_linear_layers_take_lasp2():
    plan = plan_parallel(None, SMALL + ["model.layer_pattern=LLLN"], 8, H100)
    assert plan.best.linear_scheme == "lasp2" and plan.best.cp > 1
    key = lambda c: (c.tp, c.cp, c.scheme, c.ulysses, c.layout, c.shard, c.recompute, c.tiles)  # noqa: E731
    lasp2 = {key(c): c for c in plan.ranked if c.linear_scheme == "lasp2"}
    twins = [(c, lasp2[key(c)]) for c in plan.ranked if c.linear_scheme == "lasp1" and c.cp >= 4]
    assert twins and all(a.estimate.step_s > b.estimate.step_s for a, b in twins)  # lasp1's state chain


def test_long_tailed_documents_prefer_doc_zigzag_over_zigzag():
    # one long document and many short ones per window: zigzag's halves of the long one land unevenly
    lengths = [60000] + [700] * 100
    windows = sample_windows(lengths, 131072, seed=0)
    zig = doc_balance(windows, 131072, 8, "ring", "zigzag")
    doc = doc_balance(windows, 131072, 8, "ring", "doc_zigzag")
    assert doc.imbalance < zig.imbalance and doc.pairs == zig.pairs < 0.5
    plan = plan_parallel(None, SMALL, 8, H100, lengths=lengths)
    ring = {c.layout: c for c in reversed(plan.ranked) if c.scheme == "ring"}
    assert ring["doc_zigzag"].estimate.step_s < ring["zigzag"].estimate.step_s
    assert plan.best.layout != "zigzag" or plan.best.scheme in ("ulysses", "cad")


def test_too_little_memory_forces_fsdp_or_full_recomputation():
    tiled = SMALL + ["model.loss_tile=4096", "model.mlp_tile=4096"]
    roomy = plan_parallel(None, tiled, 8, H100)
    assert roomy.best.shard != "fsdp" or roomy.best.recompute != "full"
    plan = plan_parallel(None, tiled, 8, H100, budget_gib=1.75)
    assert plan.ranked, "something must fit 1.75 GiB"
    assert all(c.shard == "fsdp" or c.recompute == "full" for c in plan.ranked)
    assert any(c.reason.startswith("doesn't fit: ") and c.reason.endswith(" > 1.8 GiB") for c in plan.dropped)


def test_the_written_config_loads_and_trains(ranks, tmp_path, capsys):
    out = tmp_path / "best.yaml"
    args = ["plan", "parallel", "--gpus", "2", "--lengths", "none", "--out", str(out),
            "--set", f"run.output_dir={tmp_path / 'run'}", "--set", "train.tensorboard=false",
            "--set", "data.seq_len=256", "--set", "train.steps=2"]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert "fastest that fits" in text and f"wrote {out}" in text
    cfg = load_config(out)
    assert cfg.parallel.dp * cfg.parallel.cp * cfg.parallel.tp == 2
    (losses, _), *_ = [r for r in ranks(2, one_step, cfg.model_dump(), 2) if r is not None]
    assert len(losses) == 2 and all(x == x for x in losses)
    assert cli_main(args) == 2  # nothing a user made is overwritten unasked
    assert "exists; pass --force" in capsys.readouterr().err


def test_the_validation_grid_and_its_verdicts():
    from distattn.plan.validate import CANDIDATES, Setting, cpu_cluster, judge, predict, settings
    grid = settings()
    assert len(grid) >= 12 and all(sum(s.doc_lens) == s.seq_len for s in grid if s.doc_lens)
    pred = predict(Setting("3:1", 4096, [3072, 1024]), cpu_cluster(2e10))
    assert set(pred) == set(CANDIDATES) and all(t > 0 for t in pred.values())
    # doc_zigzag splits each document over both ranks: never more work than zigzag's halves
    assert pred["ring@doc_zigzag"] <= pred["ring"] * 1.0001
    v = judge(Setting("x", 8), {"a": 1.0, "b": 2.0}, {"a": 1.1, "b": 1.0})
    assert (v.choice, v.best) == ("a", "b") and abs(v.loss - 0.1) < 1e-12
