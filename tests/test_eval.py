"""distattn eval: probes put the answer where asked; the CLI writes the curve and heatmap (CSV, PNG,
TensorBoard) through a CP scheme; train.eval_every logs a validation loss; bad input is refused."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from cli_util import assert_refused, run_cli
from distattn.eval.probes import VALUE_LEN, probe

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "data.seq_len=256", "train.warmup_steps=1"]


@pytest.mark.parametrize("task", ["needle", "recall"])
def test_probes_put_the_answer_at_the_depth(task):
    for length in (128, 1000, 4096):
        first = None
        for depth in (0.0, 0.5, 1.0):
            doc, a = probe(task, length, depth)
            assert len(doc) == length and a == length - VALUE_LEN - 1
            answer = bytes(doc[a:a + VALUE_LEN].astype(np.uint8))
            where = bytes(doc[:a].astype(np.uint8)).find(answer)  # its earlier occurrence
            assert where >= 0
            if first is None:
                first = where
                assert where < max(20, length * 0.1)
            if depth == 1.0:
                assert where > length * 0.6
        assert probe(task, length, 0.5, trial=3)[0].tolist() == probe(task, length, 0.5, trial=3)[0].tolist()


def _sets(*kv):
    return [x for s in kv for x in ("--set", s)]


def test_eval_writes_curve_heatmap_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    common = _sets(*TINY, f"run.output_dir={run}", "train.tensorboard=true")
    res = run_cli(["train", "--launcher", "local", *common, *_sets("train.steps=2", "train.eval_every=1",
                                                                     "train.ckpt_every=2")])
    assert res.code == 0, res.text
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/loss")] == [1, 2]
    res = run_cli(["eval", *common, *_sets("eval.lengths=[256,384]", "eval.depths=[0.0,1.0]", "eval.trials=2",
                                           "eval.curve_length=384", "eval.buckets=4", "eval.curve_sequences=2")])
    assert res.code == 0, res.text
    out = run / "eval"
    rows = list(csv.DictReader(open(out / "retrieval.csv")))
    assert len(rows) == 4 and all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    curve = list(csv.DictReader(open(out / "position_loss.csv")))
    assert [int(r["position_from"]) for r in curve] == [0, 96, 192, 288]
    assert all(float(r["loss"]) > 0 and int(r["tokens"]) > 0 for r in curve)
    assert (out / "retrieval.png").stat().st_size > 1000 and (out / "position_loss.png").stat().st_size > 1000
    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    tags = tb.Tags()["scalars"]
    assert any(t.startswith("eval/needle_accuracy/len0000384") for t in tags)
    assert any(t.startswith("eval/loss_from_position_") for t in tags)


def test_eval_refusals(tmp_path):
    out = f"run.output_dir={tmp_path / 'none'}"
    assert_refused(run_cli(["eval", "--set", out]), "nothing to evaluate", "--checkpoint")
    assert_refused(run_cli(["config", "--set", "eval.lengths=[64,1024]"]), "eval.lengths", "[64]")
    assert_refused(run_cli(["eval", "--checkpoint", str(tmp_path / "nope"), "--set", out]),
                   "model.init_from", "no such directory")
