"""The memory planner and the simulator know the delta-rule layer kinds ('D' Gated DeltaNet, 'K' Kimi
Delta Attention): parameters as the built modules hold them, saved activations linear in the tokens with
the census's slope, the planned peak against a measured step, and the delta schemes' traffic."""
from __future__ import annotations

import pytest

from distattn.config import load_config
from distattn.plan.memory import layer_params, param_count, predict_memory

TINY = ["model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "train.tensorboard=false"]


def tiny(pattern: str, *extra: str):
    return load_config(None, TINY + [f"model.num_layers={len(pattern)}", f"model.layer_pattern={pattern}",
                                     *extra])


def _mixer_params(kind: str, cfg) -> int:
    from distattn.model.gated_delta import GatedDeltaNetAttention
    from distattn.model.gpt import transformer_config
    from distattn.model.kimi_delta import KimiDeltaAttention
    cls = GatedDeltaNetAttention if kind == "D" else KimiDeltaAttention
    return sum(p.numel() for p in cls(transformer_config(cfg.model), context=None).parameters())


@pytest.mark.parametrize("kind", ["D", "K"])
def test_delta_layer_parameters_are_the_built_modules(kind):
    """A layer is its mixer (as built), two RMSNorms (h each) and the SwiGLU MLP (3 h f)."""
    cfg = tiny(kind + "N")
    m = cfg.model
    h, H, d, f = 64, 4, 16, 128
    norms_mlp = 2 * h + 3 * h * f
    assert layer_params(m, kind) == _mixer_params(kind, cfg) + norms_mlp
    # by hand: q/k/v, beta, out, conv, A_log, head norm; D: W_a, W_g, dt_bias per head; K: two
    # low-rank pairs through d, dt_bias per channel
    own = 3 * h * h + h * H + h * h + 3 * h * 4 + H + d
    own += h * H + h * h + H if kind == "D" else 2 * (h * d + d * h) + h
    assert layer_params(m, kind) == own + norms_mlp
    assert param_count(m) == 2 * 256 * h + layer_params(m, kind) + layer_params(m, "N") + h


# per token, fp32, the tiny shape (h = 64, 4 heads of 16, FFN 128): an 'N' layer saves 4888 bytes
# (q, k, v, out, lse 784; norms and projection input 772; MLP 3332). A 'D' layer keeps the norms and
# the MLP (4104) and its mixer's census: the convolution's four gathered taps, output and SiLU
# (6 x 768) and their four int64 indices (32); q, k, o and the head norm's two outputs, the output
# gate's W_g x, SiLU and product, and the fp32 v copy (9 x 256); q's and k's norms, the decay's
# four fp32 steps, beta, its copy, alpha's copy and the head rsqrt (12 x 16); the chunk states,
# 4 heads x 16 x 16 fp32 per 32 tokens (128): 7264. 'K': alpha per channel (four steps and a copy,
# 5 x 256 instead of 5 x 16), two low-rank inputs (2 x 64), a two-tensor output gate, 16-token
# chunks (256): 8464.
@pytest.mark.parametrize("kind,own", [("D", 7264), ("K", 8464)])
def test_a_delta_layers_activations_grow_with_the_census_slope(kind, own):
    slope = {}
    for pattern in (kind + "N", "NN"):
        cfg = tiny(pattern)
        a, b = (predict_memory(cfg, n, cp=1, scheme="local", recompute="none").activations for n in (4096, 8192))
        slope[pattern] = (b - a) / 4096
    assert slope["NN"] == 2 * 4888 + 148  # tokens, labels, per-token loss, RoPE cos/sin
    assert slope[kind + "N"] - slope["NN"] == own + 4104 - 4888
    # under cp the scheme keeps no chunk states
    cp2 = [predict_memory(tiny(kind + "N"), n, cp=2, scheme="ring", recompute="none").activations
           for n in (8192, 16384)]
    assert (cp2[1] - cp2[0]) / 4096 == slope[kind + "N"] - (128 if kind == "D" else 256)


def test_planned_peak_of_a_delta_model_matches_a_measured_step():
    """DDN, full recomputation, 4096 tokens on one rank: the peak is the delta backward's (measured
    65.6 MiB, planned 67.8; see distattn/plan/memory.py for the other points)."""
    from distattn.bench.memory import measure
    cfg = tiny("DDN")
    plan = predict_memory(cfg, 4096, cp=1, scheme="local", recompute="full")
    got = measure(cfg, 4096, 1, "local", "full", timeout=300)["peak_growth"]
    assert plan.phase == "delta_backward"
    assert 0.9 <= (plan.total - plan.params) / got <= 1.1, ((plan.total - plan.params) / got)


def test_plan_memory_cli_takes_a_delta_pattern(capsys):
    from distattn.cli import main
    sets = [a for x in TINY + ["model.num_layers=3", "model.layer_pattern=DDN", "data.seq_len=8192"]
            for a in ("--set", x)]
    assert main(["plan", "memory", *sets, "--worlds", "1,2", "--recompute", "none,full",
                 "--budget-gib", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "delta_backward" in out and "local" in out and "ring" in out
    assert main(["plan", "memory", *sets, "--options", "--budget-gib", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "cheapest that fits 8192 tokens: --set parallel.tp=1 --set parallel.cp=2" in out


# ----------------------------------------------------------------------------- simulator


def test_simulated_delta_layers_send_the_schemes_bytes_and_do_their_own_work():
    from distattn.schemes import AttnShape, get_scheme
    from distattn.sim import MODELS, get_cluster, step_time
    from distattn.sim.delta import delta_flops
    c, seq, W = get_cluster("h100"), 1 << 20, 64
    model = MODELS["gdn-hybrid-8b"]
    assert model.kinds == "DDDN" * 8
    shape = AttnShape(n_tokens=seq, heads=32, kv_heads=32, head_dim=128, dtype_bytes=2)
    st2 = step_time(model, seq, W, c, linear_scheme="lasp2")
    st1 = step_time(model, seq, W, c, linear_scheme="lasp1")
    lasp2, lasp1 = st2.layers["gated_delta"], st1.layers["gated_delta"]
    want = get_scheme("lasp2").comm_bytes(shape, W, 0, rule="gated_delta")
    # one all-gather of 32 heads' (A, B) forward, 128 x 256 fp32, and of their d(state) backward
    assert lasp2["bytes_sent"] == want.total == 63 * 32 * (128 * 256 + 128 * 128) * 4
    # a middle rank of the ring sends one 128 x 128 fp32 state per head each way
    assert lasp1["bytes_sent"] == get_scheme("lasp1").comm_bytes(shape, W, 1, rule="gated_delta").total \
        == 2 * 32 * 128 * 128 * 4
    # chunked WY work per token and head at C = 64: 10 C d + 6 d^2 + 2 d^3 / C forward
    assert delta_flops("gated_delta", 128) == (10 * 64 * 128 + 6 * 128 ** 2 + 2 * 128 ** 3 / 64,
                                               34 * 64 * 128 + 16 * 128 ** 2 + 4 * 128 ** 3 / 64)
    fwd, bwd = delta_flops("gated_delta", 128)
    mm = c.device.matmul_time
    assert lasp2["compute_s"] > mm(fwd * 32 * seq / W, 4) + mm(bwd * 32 * seq / W, 8)  # + the span maps
    assert lasp1["compute_s"] == pytest.approx(mm(fwd * 32 * seq / W, 4) + mm(bwd * 32 * seq / W, 8))
    # the ring's chain is serial: slower than the all-gather at 64 GPUs
    assert lasp1["total_s"] > lasp2["total_s"]
    # not the linear layer's model: the same shape with 'L' layers does other work and sends other bytes
    linear = step_time(MODELS["llama3-8b-hybrid"], seq, W, c, linear_scheme="lasp2").layers["linear"]
    assert linear["bytes_sent"] != lasp2["bytes_sent"] and linear["compute_s"] < lasp2["compute_s"]
    assert st2.linear_scheme == "lasp2" and model.params > MODELS["llama3-8b-hybrid"].params


def test_simulate_cli_runs_a_delta_hybrid(capsys):
    from distattn.cli import main
    assert main(["simulate", "--gpus", "16", "--seq", "262144", "--model", "gdn-hybrid-8b",
                 "--schemes", "ring,lasp2,lasp1,ring-linear"]) == 0
    out = capsys.readouterr().out
    assert "N:ring D:lasp2" in out and "N:allgather D:lasp1" in out and "| ring-linear |" not in out
    assert main(["simulate", "--gpus", "8", "--seq", "65536", "--rule", "kda", "--schemes", "lasp2,ring-linear"]) == 0
    out = capsys.readouterr().out
    assert "kda rule" in out and "n/a: no K/V ring model of the delta rule" in out


def test_profiling_a_linear_scheme_keeps_the_delta_layers():
    from distattn.profile.run import scheme_config
    assert scheme_config(tiny("DDN"), "lasp2", 2).model.layer_kinds() == "DDN"
    assert scheme_config(tiny("NN"), "lasp2", 2).model.layer_kinds() == "LL"


def test_step_model_prices_delta_layers_by_their_rule():
    """plan parallel's step model gives 'D' and 'K' layers the delta rule's cost (sim.delta), not
    decayed linear attention's: the same config with LLLN, DDDN and KKKN gives three attention times."""
    from distattn.config import load_config
    from distattn.plan.step_model import estimate_step
    from distattn.sim.cluster import get_cluster
    from distattn.sim.delta import RULE_OF_KIND
    from distattn.sim.model import AttnWorkload, layer_time
    c = get_cluster("h100")
    times = {}
    for pat in ("LLLN", "DDDN", "KKKN"):
        cfg = load_config(None, ["model.preset=llama3_8b", "model.dtype=bf16", f"model.layer_pattern={pat * 8}",
                                 "parallel.cp=8", "data.seq_len=262144"])
        times[pat] = estimate_step(cfg, c).attention_s
    assert len({round(t, 6) for t in times.values()}) == 3
    w = AttnWorkload(seq=262144, heads=32, kv_heads=8, head_dim=128, dtype_bytes=2)
    n = layer_time("ring", w, c, 8).total_s
    for pat, kind in (("DDDN", "D"), ("KKKN", "K")):
        delta = layer_time("lasp2", w, c, 8, rule=RULE_OF_KIND[kind]).total_s
        assert times[pat] == pytest.approx(8 * n + 24 * delta, rel=1e-9)
