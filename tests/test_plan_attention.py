"""The attention memory planner: how its predictions scale, what they hold, and how close
they come to a measured sweep point of each scheme."""
from __future__ import annotations

import pytest

from distattn.plan.attention import predict_attention_peak
from distattn.sweep import SearchSpec, SweepSpec, _Pools, run_point_on_ranks

SHAPE = dict(heads=4, kv_heads=2, head_dim=32)


def pred(scheme: str, n: int, world: int, **kw):
    m = predict_attention_peak(scheme, n, world, **{**SHAPE, **kw})
    assert m is not None, (scheme, n, world, kw)
    return m


def test_ring_scales_linearly_in_tokens_and_inversely_in_world():
    # every term but the kernel's fixed per-thread workspace is proportional to the rank's tokens
    ratio = pred("ring", 32768, 4).total / pred("ring", 16384, 4).total
    assert 1.95 < ratio <= 2.0
    # twice the ranks: half the tokens per rank, half the memory
    assert 0.5 <= pred("ring", 32768, 8).total / pred("ring", 32768, 4).total < 0.52
    # with a K/V block always in flight (W >= 4) a rank's peak depends only on its own tokens
    assert pred("ring", 16384, 4).total == pred("ring", 32768, 8).total == pred("ring", 65536, 16).total


def test_parts_add_up_and_name_where_the_peak_is():
    m = pred("allgather", 16384, 2)
    assert m.total == m.inputs + m.outputs + m.comm + m.kernel == m.as_dict()["total"]
    assert m.inputs == 2 * 8192 * (4 + 2) * 32 * 4            # q, k, v, dout shards in fp32
    # both ranks' largest call is the causal square over their own rows (one fused call each)
    assert m.phase == "backward compute"
    # the whole gathered K/V (and its fp32 gradient) sits on every rank; ring holds one block
    assert m.comm > pred("ring", 16384, 2).comm
    # lasp2's communication is d x d states: a rank's peak only follows its own tokens
    assert pred("lasp2", 16384, 4).total * 2 == pytest.approx(pred("lasp2", 16384, 2).total, rel=0.01)
    assert pred("ring", 16384, 2, dtype="bf16").total < pred("ring", 16384, 2).total


def test_schemes_without_a_model_or_a_valid_shape_get_none():
    assert predict_attention_peak("cad", 8192, 2, **SHAPE) is None              # no model
    assert predict_attention_peak("ulysses", 8192, 8, **SHAPE) is None          # 4 heads over 8 ranks
    assert predict_attention_peak("local", 8192, 2, **SHAPE) is None            # local is one rank
    assert predict_attention_peak("ring@contiguous", 8192, 2, **SHAPE) is not None
    with pytest.raises(ValueError, match="fp16"):
        predict_attention_peak("ring", 8192, 2, **SHAPE, dtype="fp16")


@pytest.fixture(scope="module")
def measured():
    """Sweep points at N=4096 on 2 ranks, one per scheme, run once for the module."""
    spec = SweepSpec(schemes=[], iters=1, warmup=0, search=SearchSpec(enabled=False), **SHAPE)
    pools = _Pools(spec)
    try:
        yield {s: run_point_on_ranks(spec, pools, s, 2, 4096)
               for s in ("ring", "allgather", "ulysses", "lasp2")}
    finally:
        pools.close()


def test_predictions_are_within_the_plan_margin_of_measured_points(measured):
    ratios = {}
    for scheme, p in measured.items():
        assert p.status == "ok", p.error
        assert p.predicted_mem_bytes == pred(scheme, 4096, 2).total
        ratios[scheme] = p.peak_mem_bytes / p.predicted_mem_bytes
    # 0.15 is the sweep's default plan_margin: a skip is only trusted beyond it
    assert all(0.85 <= r <= 1.15 for r in ratios.values()), ratios
