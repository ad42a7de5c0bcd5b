"""parallel.tp: megatron's tensor parallelism inside each cp rank.

One step at tp=2 (with and without sequence parallelism), tp=2 x cp=2 and fsdp x tp x cp equals one
step on a single rank; megatron's collectives are in the ledger (tag tp); weights split and join as
megatron lays them out; checkpoints resume exactly; bad combinations are refused by the config.
"""
from __future__ import annotations

import pytest
import torch

from distattn.config import ConfigError, load_config
from train_util import fit, one_step, step_records

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=128", "data.seq_len=192",
        "train.steps=4", "train.tensorboard=false", "train.adam_eps=1e-6"]


def cfg_for(path, *extra):
    return load_config(None, TINY + [f"run.output_dir={path}", *extra])


@pytest.mark.parametrize("world,extra", [
    (2, ("parallel.cp=1", "parallel.tp=2", "attention.scheme=local")),
    (2, ("parallel.cp=1", "parallel.tp=2", "parallel.sequence_parallel=false", "attention.scheme=local",
         "model.loss_tile=40")),
    (4, ("parallel.cp=2", "parallel.tp=2", "attention.scheme=ring", "model.mlp_tile=48")),
    (4, ("parallel.cp=2", "parallel.tp=2", "attention.scheme=ring", "train.shard=fsdp", "model.loss_tile=32")),
])
def test_tp_step_equals_single_rank(ranks, tmp_path, world, extra):
    base = cfg_for(tmp_path / "ref", "parallel.cp=1", "attention.scheme=local",
                   *[e for e in extra if e.startswith("model.")])
    split = cfg_for(tmp_path / "tp", *extra)
    (l1, p1), = [r for r in ranks(1, one_step, base.model_dump(), 2) if r is not None]
    (l2, p2), = [r for r in ranks(world, one_step, split.model_dump(), 2) if r is not None]
    assert l1 == pytest.approx(l2, rel=1e-5)
    torch.testing.assert_close(p2, p1, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sp,recompute", [(True, "none"), (False, "none"), (True, "full"), (False, "selective")])
def test_tp_traffic_is_in_the_ledger(ranks, tmp_path, sp, recompute):
    """Megatron's collectives are counted under tag tp, op by op as `tp_step_bytes` predicts."""
    from distattn.model.tensor_parallel import tp_step_bytes
    cfg = cfg_for(tmp_path, "parallel.cp=1", "parallel.tp=2", "attention.scheme=local",
                  f"parallel.sequence_parallel={str(sp).lower()}", f"model.recompute={recompute}")
    recs, _ = ranks(2, step_records, cfg.model_dump())[0]
    tp = [(op, b) for op, b, tag in recs if tag == "tp"]
    want = tp_step_bytes(2, 192, 64, 4, 2, sp, recompute)
    assert len(tp) == want["ops"] and sum(b for _, b in tp) == want["bytes"]
    assert {op for op, _ in tp} == ({"all_gather", "reduce_scatter"} if sp else {"all_reduce"})


@pytest.mark.parametrize("name,shape", [
    ("decoder.layers.0.mlp.linear_fc1.weight", (16, 6)), ("decoder.layers.0.mlp.linear_fc2.weight", (6, 8)),
    ("embedding.word_embeddings.weight", (12, 4)), ("decoder.layers.1.self_attention.linear_qkv.bias", (8,)),
    ("decoder.final_layernorm.weight", (6,)),
])
def test_tp_weights_split_and_join(name, shape):
    from distattn.model.tp_weights import join, shard, split_of
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    parts = [shard(name, full, r, 2) for r in range(2)]
    assert torch.equal(join(name, parts), full)
    if name.endswith("fc1.weight"):  # stride 2: each rank holds its half of the gate and of the up rows
        assert torch.equal(parts[1], torch.cat([full[4:8], full[12:16]]))
    if split_of(name) is None:
        assert all(p is full for p in parts)


def test_tp_resumes_exactly_and_on_another_cp(ranks, tmp_path):
    common = ("parallel.tp=2", "train.shard=fsdp", "train.ckpt_every=2", "model.loss_tile=64")
    straight = ranks(4, fit, cfg_for(tmp_path / "a", "parallel.cp=2", *common).model_dump())[0]
    first = cfg_for(tmp_path / "b", "parallel.cp=2", *common)
    ranks(4, fit, first.model_dump(), False, 2)
    same = ranks(4, fit, first.model_dump(), True)[0]
    assert same == pytest.approx(straight[2:], rel=1e-5)
    other = cfg_for(tmp_path / "b", "parallel.cp=1", "attention.scheme=local", *common)
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step_00000002")
    resharded = ranks(2, fit, other.model_dump(), True)[0]
    assert resharded == pytest.approx(straight[2:], rel=1e-5)


def test_tp_resume_on_another_tp_is_refused(tmp_path):
    from distattn.train.resume import incompatibilities
    cfg = cfg_for(tmp_path, "parallel.tp=2")
    diffs = incompatibilities(cfg, {"dp": 1, "cp": 2, "tp": 1, "zero_stage": 0, "world": 2}, None)
    assert [d[:3] for d in diffs] == [("parallel.tp", 1, 2)]


@pytest.mark.parametrize("extra,match", [
    (("parallel.tp=3",), "parallel.tp=3 must divide both model.num_attention_heads=4 and model.num_query_groups=2"),
    (("parallel.tp=2", "model.vocab_size=255"), "pad model.vocab_size to a multiple of 2, e.g. 256"),
    (("parallel.tp=2", "train.zero_stage=2"), "use train.shard=fsdp"),
    (("parallel.tp=2", "attention.scheme=usp", "parallel.ulysses=2", "model.num_attention_heads=2",
      "model.num_query_groups=2"), r"heads % \(tp x ulysses\) = 2 % \(2 x 2\)"),
    (("parallel.tp=2", "data.seq_len=190"), "data.seq_len=190 must be a multiple of cp x tp = 2 x 2 = 4"),
    (("parallel.tp=2", "attention.scheme=hetero"), "its plan needs every head"),
    (("parallel.tp=2", "parallel.world_size=2"), r"world_size=2 but dp\*cp\*tp"),
])
def test_tp_refusals(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, TINY + list(extra))


def test_tp_validation_loss_equals_one_rank(ranks, tmp_path):
    """Evaluation joins the tp ranks' vocabulary shards of the logits."""
    from train_util import validation
    one = cfg_for(tmp_path / "a", "parallel.cp=1", "attention.scheme=local", "eval.val_sequences=2")
    tp = cfg_for(tmp_path / "b", "parallel.cp=1", "parallel.tp=2", "attention.scheme=local",
                 "eval.val_sequences=2")
    assert ranks(2, validation, tp.model_dump())[0] == pytest.approx(ranks(1, validation, one.model_dump())[0],
                                                                      rel=1e-5)


def test_planner_predicts_the_measured_tp_peak():
    """tp=2 with sequence parallelism, 4K tokens: the planner within 10% of the measured peak growth of a
    step (fresh processes; fp32; docs/benchmarks.md has the other tp points)."""
    from distattn.bench.memory import malloc_returns_freed_memory, measure_step
    from distattn.multiproc import run_on_ranks
    from distattn.plan.memory import predict_memory
    cfg = load_config(None, TINY[:5] + ["data.seq_len=4096", "parallel.cp=1", "parallel.tp=2",
                                        "attention.scheme=local", "train.tensorboard=false"])
    with malloc_returns_freed_memory():
        got = run_on_ranks(measure_step, 2, cfg.model_dump(), True, timeout=300)[0]["peak_growth"]
    plan = predict_memory(cfg)
    assert 0.9 <= (plan.total - plan.params) / got <= 1.1, ((plan.total - plan.params) / got)
