"""Bad `distattn train` inputs are refused in the driver: one line naming the key or argument and
the value, exit code 2, no traceback, in seconds, and before any rank starts (the launchers are
replaced by functions that fail the test if called)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_util import assert_refused, run_cli

TINY = ["model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
        "data.seq_len=128", "train.steps=6", "train.tensorboard=false"]


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    """Any launch fails the test: every case must be refused before a rank starts."""
    import distattn.train.launch as launch

    def launched(*a, **k):
        raise AssertionError("a launcher was called for an input the driver should refuse")
    monkeypatch.setattr(launch, "train_local", launched)
    monkeypatch.setattr(launch, "train_torchrun", launched)
    try:
        import distattn.train.ray_launch as rl
        monkeypatch.setattr(rl, "train_ray", launched)
    except ImportError:  # pragma: no cover - no Ray here
        pass


def _megatron(prefix: Path, top: int, dtype=np.uint16) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    rng = np.random.default_rng(0)
    for _ in range(8):
        b.add_item(torch.tensor(rng.integers(0, top, size=100)))
        b.end_document()
    b.add_item(torch.tensor([top, 1, 2]))
    b.end_document()
    b.finalize(str(prefix) + ".idx")
    return str(prefix)


def _checkpoint(run: Path, step: int, *overrides: str, latest: bool = True) -> Path:
    """A small but real checkpoint as `checkpoint.save` lays it out (DCP tensors, the per-rank file,
    config.yaml, meta.json with file sizes, the `latest` marker), without training."""
    import torch.distributed.checkpoint as dcp

    from distattn.config import load_config, save_config
    from distattn.train.data import build_source
    cfg = load_config(None, TINY + [f"run.output_dir={run}", *overrides])
    d = run / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    dcp.save({"model": {"w": torch.arange(4096.0)}}, checkpoint_id=str(d / "dcp"), no_dist=True)
    torch.save({"step": step, "data": {"source": build_source(cfg.data).fingerprint()}}, d / "rank00000.pt")
    save_config(cfg, d / "config.yaml")
    files = {"rank00000.pt": (d / "rank00000.pt").stat().st_size}
    meta = {"step": step, "dp": cfg.parallel.dp, "cp": cfg.parallel.cp, "world": cfg.parallel.world_size,
            "zero_stage": cfg.train.zero_stage, "rank_files": files}
    (d / "meta.json").write_text(json.dumps(meta))
    if latest:
        (run / "checkpoints" / "latest").write_text(d.name)
    return d


def _truncate(f: Path, keep: int = 10) -> None:
    data = f.read_bytes()
    f.write_bytes(data[:keep])


def _setup(kind: str, tmp: Path) -> dict:
    """Files a case needs; returns values its argv and expected names refer to as {name}."""
    run = tmp / "run"
    out: dict = {"run": str(run), "tmp": str(tmp)}
    if kind == "meg999":
        out["meg"] = _megatron(tmp / "tok", 999)
    elif kind == "megjunk":
        for ext in (".bin", ".idx"):
            (tmp / f"junk{ext}").write_bytes(b"not an index")
    elif kind == "textfile":
        (tmp / "a.txt").write_text("hello\n")
    elif kind == "emptydir":
        (tmp / "empty").mkdir()
    elif kind == "tinydir":
        (tmp / "tiny").mkdir()
        (tmp / "tiny" / "a.txt").write_text("hello world\n")
    elif kind == "emptyjsonl":
        (tmp / "e.jsonl").write_text("")
    elif kind == "jsonl":
        (tmp / "d.jsonl").write_text("\n".join(json.dumps({"body": "x" * 400}) for _ in range(3)) + "\n")
    elif kind == "badjson":
        (tmp / "b.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    elif kind == "run_ckpts":
        _checkpoint(run, 2)
    elif kind == "run_tb":
        (run / "tensorboard").mkdir(parents=True)
        (run / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"x")
    elif kind == "two_ckpts":
        _checkpoint(run, 2)
        _checkpoint(run, 4)
    elif kind == "truncated_dcp":
        _checkpoint(run, 2)
        d = _checkpoint(run, 4)
        _truncate(next((d / "dcp").glob("*.distcp")), 100)
    elif kind == "no_metadata":
        d = _checkpoint(run, 2)
        (d / "dcp" / ".metadata").unlink()
    elif kind == "truncated_rank":
        _checkpoint(run, 2)
        _truncate(_checkpoint(run, 4) / "rank00000.pt")
    elif kind == "unfinished":
        _checkpoint(run, 2)
        (_checkpoint(run, 4) / "meta.json").unlink()
    elif kind == "bad_marker":
        _checkpoint(run, 2)
        (run / "checkpoints" / "latest").write_text("step_00000009")
    elif kind == "hidden64":
        _checkpoint(run, 2, "model.hidden_size=32", "model.ffn_hidden_size=64")
    elif kind == "zero1":
        _checkpoint(run, 2)
        meta = run / "checkpoints" / "step_00000002" / "meta.json"
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "zero_stage": 1}))
        (meta.parent / "deepspeed").mkdir()
        (meta.parent / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    elif kind == "seq256":
        _checkpoint(run, 2, "data.seq_len=256")
    elif kind == "otherdata":
        d = _checkpoint(run, 2)
        torch.save({"step": 2, "data": {"source": {"kind": "stdlib", "num_docs": 1, "num_tokens": 9}}},
                   d / "rank00000.pt")
        meta = json.loads((d / "meta.json").read_text())
        meta["rank_files"] = {"rank00000.pt": (d / "rank00000.pt").stat().st_size}
        (d / "meta.json").write_text(json.dumps(meta))
    elif kind == "config":
        (tmp / "c.yaml").write_text("train: {steps: 2}\n")
    return out


S = "--set"
# (id, setup, argv after `train`, names the message must hold)
CASES = [
    ("vocab-stdlib", None, [S, "model.vocab_size=100"], ["model.vocab_size=100", "model.vocab_size=256"]),
    ("vocab-synthetic", None, [S, "model.vocab_size=100", S, "data.source=synthetic"],
     ["model.vocab_size=100", "data.source=synthetic", "model.vocab_size=123"]),
    ("vocab-jsonl", "jsonl", [S, "model.vocab_size=200", S, "data.source=jsonl", S, "data.path={tmp}/d.jsonl",
                              S, "data.jsonl_field=body"], ["model.vocab_size=200", "data.source=jsonl", "256"]),
    ("vocab-megatron", "meg999", [S, "model.vocab_size=512", S, "data.source=megatron", S, "data.path={meg}"],
     ["tok.bin document 0 holds token id", "largest token id is 999", "model.vocab_size=512",
      "model.vocab_size=1000"]),
    ("megatron-missing", None, [S, "data.source=megatron", S, "data.path={tmp}/nope"],
     ["data.path=", "nope.bin", "nope.idx"]),
    ("megatron-junk", "megjunk", [S, "data.source=megatron", S, "data.path={tmp}/junk"],
     ["junk.idx", "not a Megatron index"]),
    ("text-dir-missing", None, [S, "data.source=text_dir", S, "data.path={tmp}/absent"],
     ["data.path=", "absent", "does not exist"]),
    ("text-dir-file", "textfile", [S, "data.source=text_dir", S, "data.path={tmp}/a.txt"],
     ["data.path=", "a.txt", "data.source=jsonl"]),
    ("text-dir-empty", "emptydir", [S, "data.source=text_dir", S, "data.path={tmp}/empty"],
     ["data.path=", "empty", "no non-empty text files"]),
    ("data-too-small", "tinydir", [S, "data.source=text_dir", S, "data.path={tmp}/tiny", S, "data.seq_len=2048"],
     ["data.seq_len=2048", "tiny", "12 bytes"]),
    ("jsonl-missing", None, [S, "data.source=jsonl", S, "data.path={tmp}/none.jsonl"],
     ["data.path=", "none.jsonl", "does not exist"]),
    ("jsonl-empty-file", "emptyjsonl", [S, "data.source=jsonl", S, "data.path={tmp}/e.jsonl"],
     ["e.jsonl", "0 bytes in 0 documents", "data.seq_len=128"]),
    ("jsonl-empty-dir", "emptydir", [S, "data.source=jsonl", S, "data.path={tmp}/empty"],
     ["data.path=", "empty", "no non-empty .jsonl files"]),
    ("jsonl-field", "jsonl", [S, "data.source=jsonl", S, "data.path={tmp}/d.jsonl"],
     ["d.jsonl:1", "'text'", "'body'", "data.jsonl_field"]),
    ("jsonl-invalid", "badjson", [S, "data.source=jsonl", S, "data.path={tmp}/b.jsonl"],
     ["b.jsonl:2", "not valid JSON"]),
    ("run-dir-has-checkpoints", "run_ckpts", [], ["run.output_dir={run}", "--resume", "--overwrite", "step 2"]),
    ("run-dir-has-tensorboard", "run_tb", [], ["run.output_dir={run}", "--overwrite", "TensorBoard"]),
    ("resume-nothing", None, ["--resume"], ["--resume", "no checkpoint under", "{run}/checkpoints"]),
    ("resume-missing-step", "two_ckpts", ["--resume", "3"], ["--resume 3", "no checkpoint of step 3", "2, 4"]),
    ("resume-negative", "two_ckpts", ["--resume", "-3"], ["--resume -3", "step >= 0"]),
    ("resume-missing-path", None, ["--resume", "{tmp}/nowhere"], ["--resume", "nowhere", "no such checkpoint"]),
    ("resume-config-file", "config", ["--resume", "{tmp}/c.yaml"], ["--resume", "c.yaml", "config file"]),
    ("resume-truncated-dcp", "truncated_dcp", ["--resume"],
     ["step_00000004", ".distcp is truncated", "--resume 2 --overwrite"]),
    ("resume-no-dcp-metadata", "no_metadata", ["--resume"], ["step_00000002", ".metadata", "--overwrite"]),
    ("resume-truncated-rank-file", "truncated_rank", ["--resume", "4"],
     ["step_00000004", "rank00000.pt", "--resume 2"]),
    ("resume-unfinished", "unfinished", ["--resume", "4"], ["step_00000004", "meta.json is missing", "--resume 2"]),
    ("resume-bad-marker", "bad_marker", ["--resume"], ["latest", "step_00000009", "--resume STEP"]),
    ("resume-other-model", "hidden64", ["--resume"],
     ["model.hidden_size=32 then, 64 now", "model.ffn_hidden_size", "--set model.hidden_size=32"]),
    ("resume-other-zero", "zero1", ["--resume"], ["train.zero_stage=1 then, 0 now"]),
    ("resume-other-seq-len", "seq256", ["--resume"], ["data.seq_len=256 then, 128 now"]),
    ("resume-other-data", "otherdata", ["--resume"], ["other data", "num_tokens"]),
    ("resume-past-end", "two_ckpts", ["--resume", S, "train.steps=4"], ["step 4", "train.steps=4"]),
    ("resume-older-than-latest", "two_ckpts", ["--resume", "2"], ["--resume 2", "step 4", "--overwrite"]),
    ("ray-launcher-refused-first", None, ["--launcher", "ray", S, "model.vocab_size=64"],
     ["model.vocab_size=64", "256"]),
]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_train_input_is_refused_before_launch(tmp_path, case):
    _, kind, argv, names = case
    values = _setup(kind, tmp_path) if kind else {"run": str(tmp_path / "run"), "tmp": str(tmp_path)}
    argv = [a.format(**values) for a in argv]
    launcher = [] if "--launcher" in argv else ["--launcher", "local"]
    sets = [x for o in TINY + [f"run.output_dir={values['run']}"] for x in (S, o)]
    before = _listing(tmp_path)
    res = run_cli(["train", *launcher, *sets, *argv], cwd=tmp_path)
    assert_refused(res, *[n.format(**values) for n in names], code=2, max_s=10)
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("distattn train: "), res.err
    assert _listing(tmp_path) == before  # nothing written, nothing removed


def _listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_the_table_is_large_enough():
    assert len(CASES) >= 20


@pytest.mark.parametrize("extra,warned", [
    (["data.seq_len=2048"], ["data.seq_len=2048", "only >= 1024 tokens back", "data.seq_len=8192"]),
    (["parallel.cp=1", "parallel.world_size=1", "attention.scheme=local"], ["parallel.cp=1"]),
    ([], []),
])
def test_recall_preset_warns_when_its_promise_breaks(tmp_path, extra, warned):
    """recall_8k promises an answer >= 4096 tokens back, across ranks; a smaller seq_len or one
    rank keeps training but says which setting breaks it and what keeps it."""
    from distattn.config import load_config
    from distattn.train.preflight import check
    from distattn.train.synthetic import SyntheticSource
    preset = "configs/presets/recall_8k.yaml"
    cfg = load_config(str(Path(__file__).parent.parent / preset), extra + [f"run.output_dir={tmp_path}"])
    notes = [n for n in check(cfg, config_path=preset).notes if "recall_8k promises" in n]
    for w in warned:
        assert any(w in n for n in notes), notes
    assert bool(notes) == bool(warned)
    assert SyntheticSource.min_answer_distance(8192) == 4096
