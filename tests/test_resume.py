"""Run directories and resume through the real `distattn train` (local ranks), and a model whose
vocabulary is not bytes trained on a Megatron dataset."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cli_util import assert_refused, run_cli

TINY = ["model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
        "data.seq_len=128", "train.warmup_steps=0", "train.log_every=1"]


def _rank_entry(cfg_dict: dict, resume):
    """The local launcher's rank entry, failing on the DCP warning about saving over a checkpoint."""
    import warnings

    from distattn.train.launch import _rank_main
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        hist = _rank_main(cfg_dict, resume, True)
    over = [str(w.message) for w in seen if "existing checkpoint" in str(w.message)]
    assert not over, over
    return hist


@pytest.fixture
def local_on_pool(ranks, monkeypatch):
    """`--launcher local` on the session's rank pool: the same rank entry, without paying process
    start-up for every run (the driver side, preflight included, runs as the CLI runs it)."""
    import distattn.train.launch as launch
    seen = []

    def train_local(cfg, resume=False, **_):
        seen.append(resume)
        return ranks(2, _rank_entry, cfg.model_dump(), resume, timeout=120)[0]
    monkeypatch.setattr(launch, "train_local", train_local)
    return seen


def _train(run, *argv, steps=2):
    sets = [x for o in TINY + [f"run.output_dir={run}", f"train.steps={steps}", "train.ckpt_every=1"]
            for x in ("--set", o)]
    return run_cli(["train", "--launcher", "local", *sets, *argv])


def _steps(run):
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
def test_run_directory_is_kept_resumed_or_overwritten_on_request(tmp_path, local_on_pool):
    run = tmp_path / "run"
    first = _train(run)
    assert first.code == 0 and "done: 2 steps" in first.out, first.text
    assert _steps(run) == ["step_00000001", "step_00000002"]
    events = set((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events

    # a second fresh run is refused before anything starts, and names both ways on
    again = _train(run, "--set", "train.lr=1e-3")
    assert_refused(again, f"run.output_dir={run}", "--resume", "--overwrite", max_s=10)

    # --resume continues from the latest step and says so
    more = _train(run, "--resume", steps=3)
    assert more.code == 0, more.text
    assert "resuming from step 2" in more.out and "done: 1 steps" in more.out
    assert _steps(run)[-1] == "step_00000003"
    assert local_on_pool[-1] is True  # the latest checkpoint: the launchers get True

    # an older step would overwrite later ones: refused, then allowed with --overwrite
    older = _train(run, "--resume", "1", steps=3)
    assert_refused(older, "--resume 1", "step 2, 3", "--overwrite")
    redo = _train(run, "--resume", "1", "--overwrite", steps=3)
    assert redo.code == 0, redo.text
    assert "removed" in redo.out and "step_00000002" in redo.out and "resuming from step 1" in redo.out
    assert "done: 2 steps" in redo.out and _steps(run)[-1] == "step_00000003"
    assert local_on_pool[-1] == str(run / "checkpoints" / "step_00000001")  # a chosen one: its path

    # a damaged checkpoint is named with its file, and the previous good one offered
    shard = sorted((run / "checkpoints" / "step_00000003" / "dcp").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:64])
    bad = _train(run, "--resume", steps=4)
    assert_refused(bad, "step_00000003", shard.name, "truncated", "--resume 2 --overwrite")

    # --overwrite starts over: old checkpoints and event files go, nothing else
    (run / "notes.txt").write_text("mine")
    fresh = _train(run, "--overwrite")
    assert fresh.code == 0, fresh.text
    assert "removed" in fresh.out and "TensorBoard event file" in fresh.out
    assert _steps(run) == ["step_00000001", "step_00000002"]
    assert not events & set((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "notes.txt").read_text() == "mine"



def _megatron(prefix, top: int) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(1)
    for _ in range(12):
        b.add_item(torch.tensor(rng.integers(0, top + 1, size=int(rng.integers(50, 300)))))
        b.end_document()
    b.add_item(torch.tensor([top, 0, top]))
    b.end_document()
    b.finalize(str(prefix) + ".idx")
    return str(prefix)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_megatron_dataset_with_a_larger_vocab_trains(ranks, tmp_path):
    """Token ids up to 999 with model.vocab_size=1024: the driver accepts it and two cp=2 steps train."""
    from distattn.config import load_config
    from distattn.train.preflight import check
    from train_util import fit
    prefix = _megatron(tmp_path / "tok", 999)
    cfg = load_config(None, TINY + ["model.vocab_size=1024", "data.source=megatron", f"data.path={prefix}",
                                    "train.steps=2", "train.tensorboard=false", "train.ckpt_every=0",
                                    f"run.output_dir={tmp_path / 'run'}"])
    check(cfg)  # no refusal
    losses = ranks(2, fit, cfg.model_dump())[0]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert losses[0] == pytest.approx(np.log(1024), rel=0.05)  # an untrained model over 1024 ids


def _torchrun_env(monkeypatch, rank: int, world: int) -> None:
    from distattn.multiproc import free_port
    for k, v in {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
def test_torchrun_rank0_prints_notes_and_the_done_line(tmp_path, monkeypatch):
    import torch.distributed as dist
    _torchrun_env(monkeypatch, 0, 1)
    sets = [x for o in TINY + ["train.steps=2", "train.warmup_steps=null", "parallel.cp=1",
                               "attention.scheme=local", "train.tensorboard=false",
                               f"run.output_dir={tmp_path}"] for x in ("--set", o)]
    res = run_cli(["train", *sets])
    assert res.code == 0, res.text
    assert "train.warmup_steps: 1" in res.out  # config_notes, once, before training
    assert "done: 2 steps, loss" in res.out and f"run directory {tmp_path}" in res.out
    assert not dist.is_initialized()


def test_torchrun_other_ranks_refuse_silently(tmp_path, monkeypatch):
    """Every torchrun rank runs the driver checks; only rank 0 speaks."""
    sets = ["--set", "model.vocab_size=100", "--set", f"run.output_dir={tmp_path}"]
    _torchrun_env(monkeypatch, 1, 2)
    quiet = run_cli(["train", *sets])
    assert quiet.code == 2 and quiet.text == ""
    _torchrun_env(monkeypatch, 0, 2)
    assert_refused(run_cli(["train", *sets]), "model.vocab_size=100")
