"""Layer kinds 'D' (Gated DeltaNet) and 'K' (Kimi Delta Attention): the short convolution's halo exchange
is exact under cp (one all-gather each way), a DKN model's training steps on packed documents at cp=2 equal
cp=1's (also with selective recomputation), and tensor parallelism is refused."""
from __future__ import annotations

import json

import pytest
import torch

from distattn.config import ConfigError, load_config
from gdn_util import CASES, conv_cp, conv_inputs, conv_reference
from train_util import one_step

TINY = ["model.num_layers=3", "model.layer_pattern=DKN", "model.hidden_size=64",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.ffn_hidden_size=128",
        "data.seq_len=192", "train.steps=4", "train.tensorboard=false", "train.adam_eps=1e-6",
        "attention.linear_scheme=lasp2"]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_halo_conv_equals_the_single_device_conv(ranks, world, layout):
    per_rank = ranks(world, conv_cp, layout)
    for case in range(len(CASES)):
        dw = sum(r[case]["dw"] for r in per_rank)
        torch.testing.assert_close(dw, per_rank[0][case]["dw_ref"], rtol=1e-12, atol=1e-12)
        for r in per_rank:
            res = r[case]
            for key in ("out", "dx"):
                torch.testing.assert_close(*res[key], rtol=1e-12, atol=1e-12)
            sent = {tag: ops.get("all_gather", (0, 0)) for tag, ops in res["comm"].items()}
            assert sent == {"fwd": (1, res["expect"]["fwd"]), "bwd": (1, res["expect"]["bwd"])}
            assert res["expect"]["fwd"] > 0 and set(res["comm"]["fwd"]) == {"all_gather"}


def test_halo_conv_without_cp_does_not_communicate():
    from distattn.comm import Comm, CommLedger
    from distattn.layout import get_layout
    from distattn.model.conv_halo import causal_conv_with_halo
    n, cu = CASES[0]
    x, w, _ = conv_inputs(n)
    ledger = CommLedger()
    out = causal_conv_with_halo(x, w, [get_layout("zigzag", n, 1, cu).runs(0)], 0, Comm(None, ledger))
    torch.testing.assert_close(out, conv_reference(x, w, cu), rtol=1e-12, atol=1e-12)
    assert ledger.records == []


def short_documents(path) -> list[str]:
    """A jsonl of 9- to 100-byte documents: every 192-token window packs several (cu_seqlens)."""
    path.write_text("".join(json.dumps({"text": f"doc {i}: " + "abcdefghij"[:i % 10] * (3 + i * 7 % 11)}) + "\n"
                            for i in range(200)))
    return ["data.source=jsonl", f"data.path={path}"]


def test_dkn_steps_at_cp2_equal_cp1(ranks, tmp_path):
    data = short_documents(tmp_path / "docs.jsonl")
    base = load_config(None, TINY + data + [f"run.output_dir={tmp_path / 'a'}", "parallel.cp=1",
                                            "attention.scheme=local"])
    (l1, p1), = [r for r in ranks(1, one_step, base.model_dump(), 2) if r is not None]
    for extra in (("attention.layout=zigzag",), ("attention.layout=doc_zigzag", "model.recompute=selective")):
        cp2 = load_config(None, TINY + data + [f"run.output_dir={tmp_path / 'b'}", "parallel.cp=2",
                                               "attention.scheme=ring", *extra])
        (l2, p2), = [r for r in ranks(2, one_step, cp2.model_dump(), 2) if r is not None]
        assert l1 == pytest.approx(l2, rel=1e-5), extra
        torch.testing.assert_close(p2, p1, atol=1e-5, rtol=0, msg=lambda m: f"{extra}: {m}")


def test_delta_rule_layers_refuse_tensor_parallelism():
    with pytest.raises(ConfigError, match=r"parallel.tp=2 with model.layer_pattern='DKN'.*set parallel.tp=1"):
        load_config(None, TINY + ["parallel.tp=2"])


def test_kimi_delta_layer_gates_every_key_channel():
    """'K' differs from 'D' only in its gates: a decay per key channel and a low-rank sigmoid output gate."""
    from distattn.model.gated_delta import GatedDeltaNetAttention
    from distattn.model.gpt import transformer_config
    from distattn.model.kimi_delta import KimiDeltaAttention
    cfg = transformer_config(load_config(None, TINY).model)
    h, H, d = 64, 4, 16
    kda, gdn = (cls(cfg, context=None) for cls in (KimiDeltaAttention, GatedDeltaNetAttention))
    assert kda.core_attention.rule == "kda" and gdn.core_attention.rule == "gated_delta"
    x = torch.randn(7, h)
    assert kda._gate_input(x).shape == (7, H * d) and gdn._gate_input(x).shape == (7, H)
    assert kda.dt_bias.shape == (H * d,) and gdn.dt_bias.shape == (H,)
    own = {n for n, _ in kda.named_parameters()} - {n for n, _ in gdn.named_parameters()}
    assert own == {"linear_f1.weight", "linear_f2.weight", "linear_g1.weight", "linear_g2.weight"}
    gate = kda._output_gate(x)
    assert gate.shape == (7, H * d) and bool(((gate > 0) & (gate < 1)).all())


def test_a_model_of_only_kimi_delta_layers_gets_a_linear_scheme():
    from distattn.train.trainer import build_schemes
    cfg = load_config(None, TINY + ["model.layer_pattern=KKN", "attention.scheme=ring"])
    softmax, linear = build_schemes(cfg, None)
    assert softmax.name == "ring" and linear is not None and linear.name == "lasp2"
