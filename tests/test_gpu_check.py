"""tools/gpu_check.sh's CPU dry run: every part runs on tiny shapes and the JSON file has the
structure a lent GPU machine's run will have (the install step is skipped: no wheelhouse here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import distattn

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"
PARTS = ("env", "exact", "kernels", "train", "delta")


def _run(*args, timeout=240):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "check.json"
    proc = _run("--no-install", "--device", "cpu", "--quick", "--isolate", "no", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_part_runs_and_is_recorded(dry_run):
    doc, stdout = dry_run
    assert doc["schema"] == 1 and doc["device"] == "cpu" and doc["quick"] is True and doc["ok"] is True
    assert list(doc["parts"]) == list(PARTS)
    for name, part in doc["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"))
        assert part["wall_s"] >= 0 and part["budget_s"] > 0
        assert f"  {name} " in stdout  # one summary line per part
    assert doc["install"] == {"ran": False}  # --no-install
    env = doc["parts"]["env"]
    assert env["torch"] and env["kernels_picked"]["attention"] == "cpu-flash"
    assert set(env["importable"]) >= {"flash_attn", "fla", "triton"}


def test_exact_covers_every_scheme_in_both_dtypes(dry_run):
    cases = dry_run[0]["parts"]["exact"]["cases"]
    softmax = {name for name in distattn.scheme_names() if distattn.get_scheme(name).kind == "softmax"}
    for dtype in ("fp32", "bf16"):
        mine = [c for c in cases if c["dtype"] == dtype]
        assert {c["scheme"] for c in mine if c["kind"] == "softmax"} == softmax
        for rule, kind in (("decay", "linear"), ("gated_delta", "delta"), ("kda", "delta")):
            got = {c["scheme"] for c in mine if c["kind"] == kind and c["rule"] == rule}
            assert got == {"lasp2", "lasp1", "local"}, (dtype, rule)
    for c in cases:
        assert c["status"] == "ok", c
        want = {"out", "dq", "dk", "dv"} | ({"dgate", "dbeta"} if c["kind"] == "delta" else set())
        assert set(c["errors"]) == want
        for e in c["errors"].values():
            assert e["ok"] and e["finite"] and e["rel_max"] >= 0
    # document masks and GQA are in the softmax and linear cases
    assert any(c["kind"] == "softmax" and c["cu_seqlens"] and c["kv_heads"] < c["heads"] for c in cases)
    assert any(c["kind"] == "linear" and c["cu_seqlens"] and c["kv_heads"] < c["heads"] for c in cases)


def test_kernels_train_and_delta_rows(dry_run):
    parts = dry_run[0]["parts"]
    rows = {r["name"]: r for r in parts["kernels"]["rows"]}
    want = {"sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "block contiguous/auto", "block zigzag/auto"}
    assert want <= set(rows)
    for name in ("block contiguous/auto", "block zigzag/auto"):
        r = rows[name]
        assert r["status"] == "ok" and r["fwd_tflops"] > 0 and r["fwdbwd_tflops"] > 0 and r["calls"] >= 1
    assert rows["block zigzag/auto"]["tokens"] * 2 == rows["block contiguous/auto"]["tokens"]
    assert rows["sdpa-cudnn"]["status"] in ("ok", "unavailable")  # no cuDNN on a CPU
    train = parts["train"]
    assert train["param_device"] == "cpu" and train["param_dtype"] == "torch.bfloat16"
    assert len(train["steps"]) == train["steps_asked"] and train["tokens_per_s"] > 0
    assert train["loss_first"] > train["loss_last"] > 0
    assert train["model"]["hidden_size"] == 128 and train["model"]["num_layers"] == 2  # configs/default.yaml
    delta = {r["name"]: r for r in parts["delta"]["rows"]}
    for name in ("delta gated_delta/torch", "delta kda/torch", "linear decay/torch"):
        assert delta[name]["status"] == "ok" and delta[name]["fwdbwd"]["ms"] > 0
    assert delta["delta kda/fla"]["status"] == "unavailable"


def test_a_part_in_a_child_process_and_bad_options(tmp_path):
    out = tmp_path / "k.json"
    proc = _run("--no-install", "--device", "cpu", "--quick", "--isolate", "yes", "--parts", "kernels", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert list(doc["parts"]) == ["kernels"] and doc["parts"]["kernels"]["isolated"] is True
    assert doc["parts"]["kernels"]["status"] == "ok"
    bad = _run("--no-install", "--bogus")
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr
    bad = _run("--no-install", "--device", "cpu", "--parts", "nope", str(tmp_path / "x.json"))
    assert bad.returncode != 0 and "unknown part" in bad.stderr
