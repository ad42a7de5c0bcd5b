"""The memory planner models train.shard=fsdp, model.loss_tile and model.mlp_tile (pure arithmetic)."""
from __future__ import annotations

from distattn.config import load_config
from distattn.plan.memory import GIB, MIB, longest_context, param_count, predict_memory

LLAMA8B = ["model.preset=llama3_8b", "parallel.cp=8", "model.recompute=full"]


def test_fsdp_divides_the_static_memory_by_the_ranks():
    plain = predict_memory(load_config(None, LLAMA8B), seq_len=65536)
    fsdp = predict_memory(load_config(None, LLAMA8B + ["train.shard=fsdp"]), seq_len=65536)
    P = param_count(load_config(None, LLAMA8B).model)
    assert fsdp.static == -(-P * 2 // 8) * 2 + -(-4 * P // 8)
    assert fsdp.static < plain.static / 5
    assert fsdp.comm > 0  # the root and two layers gathered whole, a layer's whole gradient


def test_tiles_shrink_the_loss_and_mlp_moments():
    base = load_config(None, LLAMA8B + ["train.shard=fsdp"])
    untiled = predict_memory(base, seq_len=1 << 20)
    tiled_loss = predict_memory(load_config(None, LLAMA8B + ["train.shard=fsdp", "model.loss_tile=4096"]),
                                seq_len=1 << 20)
    assert untiled.phase == "loss" and tiled_loss.total < untiled.total / 2
    no_recompute = ["model.preset=llama3_8b", "parallel.cp=8", "train.shard=fsdp"]
    a = predict_memory(load_config(None, no_recompute), seq_len=65536)
    b = predict_memory(load_config(None, no_recompute + ["model.mlp_tile=2048"]), seq_len=65536)
    assert b.activations < a.activations * 0.6


def test_each_option_lengthens_the_planned_context():
    budget = 80 * GIB
    steps = [[], ["train.shard=fsdp"], ["train.shard=fsdp", "model.loss_tile=4096"],
             ["train.shard=fsdp", "model.loss_tile=4096", "model.mlp_tile=4096"]]
    longest = [longest_context(load_config(None, LLAMA8B + s), budget, cp=8) for s in steps]
    assert longest[0] == 0  # without sharding, static memory alone (92 GB) is over the budget
    assert longest == sorted(longest) and longest[-1] > 4 * longest[1] > 0


def test_offloaded_activations_move_to_the_host_column():
    on = LLAMA8B + ["train.shard=fsdp", "model.loss_tile=4096", "model.mlp_tile=4096"]
    a = predict_memory(load_config(None, on), seq_len=1 << 20)
    b = predict_memory(load_config(None, on + ["model.offload_activations=true"]), seq_len=1 << 20)
    T = (1 << 20) // 8
    assert a.host == 0 and b.host == 32 * T * 4096 * 2  # every layer's bf16 input
    assert b.activations < a.activations / 10
    assert longest_context(load_config(None, on + ["model.offload_activations=true"]), 80 * GIB, cp=8) >= 4_000_000


def test_planner_matches_the_measured_peak_with_fsdp_and_tiles():
    """fsdp + tiled loss + tiled MLP at cp=2, 16K tokens, full recomputation: the planner within 10% of
    the measured peak growth of a step (fresh processes; fp32; docs/benchmarks.md has the other modes)."""
    from distattn.bench.memory import measure
    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                             "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.vocab_size=4096",
                             "train.shard=fsdp", "model.loss_tile=1024", "model.mlp_tile=1024"])
    got = measure(cfg, 16384, 2, "ring", "full", timeout=300)["peak_growth"]
    plan = predict_memory(cfg, 16384, cp=2, scheme="ring", recompute="full")
    assert 0.9 <= (plan.total - plan.params) / got <= 1.1, ((plan.total - plan.params) / got)


# fsdp + tiled loss + tiled MLP on the tiny model with a 4096 vocabulary, fp32, full recomputation: the
# longest context measured under 48 MiB per rank on CPU and the step's measured peak growth there (MiB),
# per cp (docs/benchmarks.md, "Real model sizes")
LONG_TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
             "model.ffn_hidden_size=128", "model.vocab_size=4096", "train.shard=fsdp", "model.loss_tile=128",
             "model.mlp_tile=256"]
MEASURED_LONGEST = {1: (10880, 47.63), 2: (19968, 47.53), 4: (37376, 47.87)}


def test_planner_matches_the_measured_longest_contexts():
    """Pure arithmetic against recorded measurements: the planned peak at each measured longest context
    and the planned longest context itself within 5% at cp = 1, 2 and 4."""
    cfg = load_config(None, LONG_TINY)
    for cp, (n, mib) in MEASURED_LONGEST.items():
        scheme = "ring" if cp > 1 else "local"
        plan = predict_memory(cfg, n, cp=cp, scheme=scheme, recompute="full")
        assert abs((plan.total - plan.params) / MIB / mib - 1) <= 0.05, (cp, (plan.total - plan.params) / MIB)
        params = predict_memory(cfg, 2 * cp, cp=cp, scheme=scheme, recompute="full").params
        planned = longest_context(cfg, 48 * MIB + params, cp, scheme, "full")
        assert abs(planned / n - 1) <= 0.05, (cp, planned, n)


def test_llama70b_rows():
    """The planned Llama-3-70B rows of docs/benchmarks.md: fsdp, tiled loss and MLP, full recomputation,
    80 GiB per device, ring over 32 and 64 devices (without sharding nothing fits)."""
    on = ["model.preset=llama3_70b", "model.recompute=full"]
    tiles = on + ["train.shard=fsdp", "model.loss_tile=4096", "model.mlp_tile=4096"]
    assert longest_context(load_config(None, on + ["parallel.cp=64"]), 80 * GIB, cp=64) == 0
    assert longest_context(load_config(None, tiles + ["parallel.cp=32"]), 80 * GIB, cp=32) == 1_149_312
    assert longest_context(load_config(None, tiles + ["parallel.cp=64"]), 80 * GIB, cp=64) == 2_708_480


def test_options_table_and_the_cheapest_fit():
    from cli_util import run_cli
    from distattn.plan.options import cheapest, option_rows
    cfg = load_config(None, LLAMA8B + ["data.seq_len=1048576"])
    rows = option_rows(cfg, 80)
    # per tp size (1, 2, 4, 8 split the 8 devices and the model): 24 without offload, 8 offloading under full
    assert len(rows) == 4 * 32 and sorted({(r["tp"], r["cp"]) for r in rows}) == [(1, 8), (2, 4), (4, 2), (8, 1)]
    best = cheapest(rows)
    assert best["fits"] and all(r["cost"] >= best["cost"] for r in rows if r["fits"])
    assert best["longest"] >= 1048576
    res = run_cli(["plan", "memory", "configs/models/llama3_8b.yaml", "--set", "parallel.cp=8", "--set",
                   "data.seq_len=1048576", "--options"])
    assert res.code == 0 and "cheapest that fits 1048576 tokens: --set parallel.tp=" in res.out, res.text
    tiny = run_cli(["plan", "memory", "configs/models/llama3_8b.yaml", "--set", "parallel.cp=1", "--set",
                    "data.seq_len=16777216", "--budget-gib", "8", "--options"])
    assert tiny.code == 0 and "nothing fits" in tiny.out


def test_options_keep_delta_rule_models_at_tp_1():
    """Delta-rule layers refuse tensor parallelism, so --options offers a DDDN model only tp=1 x cp, and
    the cheapest row's settings load as a valid config."""
    from cli_util import run_cli
    from distattn.plan.options import as_settings, cheapest, option_rows
    hybrid = ["model.num_layers=4", "model.layer_pattern=DDDN", "parallel.cp=4", "parallel.world_size=4",
              "data.seq_len=1048576"]
    rows = option_rows(load_config(None, hybrid), 40)
    assert len(rows) == 32 and {(r["tp"], r["cp"]) for r in rows} == {(1, 4)}
    best = cheapest(rows)
    settings = as_settings(best).replace("--set ", "").split()
    assert load_config(None, hybrid + settings).parallel.tp == 1
    args = ["plan", "memory"] + [x for kv in hybrid for x in ("--set", kv)] + ["--budget-gib", "40", "--options"]
    res = run_cli(args)
    assert res.code == 0 and "cheapest that fits 1048576 tokens: --set parallel.tp=1 --set parallel.cp=4" in res.out, \
        res.text
