"""Trainer: cp-parallel steps equal single-rank steps, resume is exact, loss falls, bad configs fail early.

Equivalence tolerance: fp32 throughout; the cp run sums the same per-token
losses and gradients in a different order (partials merged across ranks), so
loss agrees to 1e-5 relative and updated parameters to 1e-5 absolute after one
AdamW step (Adam normalises the update, so parameter differences stay at the
rounding level of lr * 1e-6).
"""
from __future__ import annotations

import pytest
import torch

from distattn.config import ConfigError, load_config
from train_util import fit, one_step, step_records

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=128", "data.seq_len=192",
        "train.steps=3", "train.warmup_steps=1", "train.tensorboard=false"]


def cfg_for(tmp_path, *extra):
    return load_config(None, TINY + [f"run.output_dir={tmp_path}"] + list(extra))


def _compare(ranks, tmp_path, cp, scheme, extra=()):
    base = cfg_for(tmp_path / "ref", "parallel.world_size=1", "parallel.cp=1", "attention.scheme=local",
                   *[e for e in extra if not e.startswith("parallel.")])
    par = cfg_for(tmp_path / "cp", f"parallel.world_size={cp}", f"parallel.cp={cp}",
                  f"attention.scheme={scheme}", *extra)
    (l1, p1), = [r for r in ranks(1, one_step, base.model_dump()) if r is not None]
    (l2, p2), = [r for r in ranks(cp, one_step, par.model_dump()) if r is not None]
    assert l1[0] == pytest.approx(l2[0], rel=1e-5)
    torch.testing.assert_close(p2, p1, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheme,extra", [
    ("ring", ()),
    ("ring", ("attention.layout=doc_zigzag",)),
    ("allgather", ()),
    ("ulysses", ()),
    ("allgather", ("model.layer_pattern=LL",)),                 # lasp2 only
    ("allgather", ("model.layer_pattern=LN",)),                 # hybrid LASP-2H
    ("ring", ("model.layer_pattern=NL", "attention.layout=doc_zigzag")),
])
def test_cp2_step_equals_single_rank(ranks, tmp_path, scheme, extra):
    _compare(ranks, tmp_path, 2, scheme, extra)


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_dedicated_attention_servers_step_equals_single_rank(ranks, tmp_path, recompute):
    """cp=2 trainers + 1 CAD attention server (world 3): the step equals one rank's; with full
    recomputation the server also answers the repeated forwards."""
    base = cfg_for(tmp_path / "ref", "parallel.world_size=1", "parallel.cp=1", "attention.scheme=local",
                   f"model.recompute={recompute}")
    par = cfg_for(tmp_path / "cad", "parallel.world_size=3", "parallel.cp=2", "parallel.attention_servers=1",
                  "attention.scheme=cad", f"model.recompute={recompute}")
    (l1, p1), = [r for r in ranks(1, one_step, base.model_dump()) if r is not None]
    (l2, p2), = [r for r in ranks(3, one_step, par.model_dump(), 2)[:1]]
    assert l1[0] == pytest.approx(l2[0], rel=1e-5)
    (l1b, p1b), = [r for r in ranks(1, one_step, base.model_dump(), 2) if r is not None]
    assert l1b[1] == pytest.approx(l2[1], rel=1e-5)
    torch.testing.assert_close(p2, p1b, atol=1e-5, rtol=0)


def test_dedicated_servers_per_dp_group_equal_colocated(ranks, tmp_path):
    """dp=2 x cp=2 trainers with 2 servers (one per dp group, world 6) take the same step as the
    colocated cad run on the 4 trainers alone."""
    common = ("parallel.dp=2", "parallel.cp=2", "attention.scheme=cad")
    colo = cfg_for(tmp_path / "colo", "parallel.world_size=4", *common)
    ded = cfg_for(tmp_path / "ded", "parallel.world_size=6", "parallel.attention_servers=2", *common)
    (l1, p1), = [r for r in ranks(4, one_step, colo.model_dump()) if r is not None]
    (l2, p2), = [r for r in ranks(6, one_step, ded.model_dump()) if r is not None]
    assert l1[0] == pytest.approx(l2[0], rel=1e-5)
    torch.testing.assert_close(p2, p1, atol=1e-5, rtol=0)


def test_dedicated_attention_servers_fit_checkpoint_and_resume(ranks, tmp_path):
    """The launcher's rank entry: trainers fit and checkpoint over their own group while the
    server answers; a resumed run continues from the checkpoint with the server back in place."""
    from distattn.train.launch import _rank_main
    extra = ("parallel.world_size=3", "parallel.cp=2", "parallel.attention_servers=1",
             "attention.scheme=cad", "train.ckpt_every=2", "train.warmup_steps=1")
    first = cfg_for(tmp_path, "train.steps=2", *extra)
    logs = ranks(3, _rank_main, first.model_dump(), False, True)
    assert logs[1] is None and logs[2] is None  # a trainer that is not rank 0, and the server
    assert [h["step"] for h in logs[0]] == [1, 2]
    assert (tmp_path / "checkpoints" / "step_00000002" / "meta.json").exists()
    more = cfg_for(tmp_path, "train.steps=4", *extra)
    rest = ranks(3, _rank_main, more.model_dump(), True, True)[0]
    assert [h["step"] for h in rest] == [3, 4] and all(h["loss"] == h["loss"] for h in rest)


def test_usp_cp4_step_equals_single_rank(ranks, tmp_path):
    _compare(ranks, tmp_path, 4, "usp", ("parallel.ulysses=2",))


def test_resume_continues_exactly(ranks, tmp_path):
    full = cfg_for(tmp_path / "full", "train.steps=6", "train.warmup_steps=2")
    part = cfg_for(tmp_path / "part", "train.steps=6", "train.warmup_steps=2", "train.ckpt_every=3")
    want = ranks(2, fit, full.model_dump())[0]
    # first run stops after 3 steps (as if killed), then resumes from its checkpoint
    first = ranks(2, fit, part.model_dump(), False, 3)[0]
    rest = ranks(2, fit, part.model_dump(), True)[0]
    assert len(first) == 3 and len(rest) == 3
    assert first + rest == pytest.approx(want, rel=1e-6)


def test_loss_falls_on_default_model(ranks, tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "train.steps=12", "data.seq_len=512",
                             "train.tensorboard=true"])
    losses = ranks(2, fit, cfg.model_dump(), timeout=300)[0]
    assert losses[-1] < losses[0] - 0.5, losses
    assert any((tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "config.yaml").exists()


def test_bad_configs_fail_before_processes_start():
    with pytest.raises(ConfigError, match="parallel"):
        load_config(None, ["parallel.world_size=3"])
    with pytest.raises(ConfigError, match="ulysses needs heads % ulysses == 0|heads"):
        load_config(None, ["attention.scheme=ulysses", "parallel.cp=2", "model.num_attention_heads=3",
                           "model.num_query_groups=1", "model.hidden_size=96"])


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_matches_plain_adamw(ranks, tmp_path, stage):
    plain = cfg_for(tmp_path / "plain")
    zero = cfg_for(tmp_path / f"zero{stage}", f"train.zero_stage={stage}")
    want = ranks(2, fit, plain.model_dump())[0]
    got = ranks(2, fit, zero.model_dump())[0]
    assert got == pytest.approx(want, rel=1e-5)


def test_deepspeed_traffic_is_in_the_ledger(ranks, tmp_path):
    """ZeRO's gradient and parameter collectives are counted under tag "zero" (W=2, fp32 weights):
    the flat fp32 gradients all-reduced (2(W-1)/W * 4P bytes) plus two scalars (overflow check, norm),
    then the updated fp32 parameter partitions all-gathered ((W-1) * 4P/W, partitions padded)."""
    recs, P = ranks(2, step_records, cfg_for(tmp_path, "train.zero_stage=2").model_dump())[0]
    zero = [r for r in recs if r[2] == "zero"]
    reduced = sum(b for op, b, _ in zero if op == "all_reduce")
    gathered = sum(b for op, b, _ in zero if op == "all_gather")
    assert 4 * P <= reduced <= 4 * P + 64, (reduced, 4 * P)
    assert 2 * P <= gathered <= 2 * P + 4096, (gathered, 2 * P)
    # the trainer's own gradient all-reduce is replaced, not doubled
    assert not [r for r in recs if r[2] != "zero" and r[0] == "all_reduce" and r[1] >= P], recs


def test_non_finite_loss_names_step_and_rank(ranks, tmp_path):
    from distattn.multiproc import RankError
    cfg = cfg_for(tmp_path, "train.lr=1e30", "train.min_lr=1e29", "train.grad_clip=0", "train.steps=4")
    with pytest.raises(RankError, match=r"non-finite loss .* at step \d+ on rank \d"):
        ranks(2, fit, cfg.model_dump())
