"""Property tests of the planners: any input gives a valid result or a ConfigError, quickly.

- plan memory: `predict_memory`, `longest_context` (the bounded bisection behind
  `distattn plan memory`) and `plan_table`;
- plan batch: `compare` (token packing vs the balanced packer) and `lognormal_lengths`;
- simulate: `layer_time` of one attention layer and `step_time` / `max_context` of a model.

Half the examples are valid arguments, half have one argument replaced by a bad
value (wrong type, out of range, NaN, unknown name), so both the results and the
refusals are exercised. Every search is bounded: each example has a deadline and
each test a time-out.
"""
from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from distattn.config import ConfigError, load_config
from distattn.config.sections import SCHEMES

CFG = load_config(None, [])
FAST = settings(max_examples=30, deadline=5000, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)

junk = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.floats(allow_nan=True),
                 st.integers(-(1 << 40), 0))


def cases(**fields):
    """Keyword arguments: all valid, or (half the time) one of them replaced by its bad value."""
    @st.composite
    def build(draw):
        args = {k: draw(good) for k, (good, _) in fields.items()}
        if draw(st.booleans()):
            k = draw(st.sampled_from(sorted(fields)))
            args[k] = draw(fields[k][1])
        return args
    return build()


def outcome(fn, **kw):
    """fn's result, or None for a ConfigError; any other exception fails the test."""
    try:
        res = fn(**kw)
    except ConfigError:
        event("refused")
        return None
    event("valid")
    return res


MODES = ("none", "selective", "full")
scheme_s = (st.sampled_from(SCHEMES), st.one_of(st.text(max_size=6), junk))
mode_s = (st.sampled_from(MODES), st.one_of(st.text(max_size=6), junk))


# ----------------------------------------------------------------------------- plan memory


@pytest.mark.timeout(60)
@FAST
@given(kw=cases(budget_bytes=(st.floats(1e6, 1e12), st.one_of(junk, st.sampled_from((math.inf, math.nan)))),
                cp=(st.integers(1, 64), junk), dp=(st.integers(1, 8), junk), scheme=scheme_s,
                recompute=mode_s, hi=(st.integers(1, 1 << 36), junk)))
def test_longest_context_is_the_largest_fit_or_a_config_error(kw):
    from distattn.plan.memory import longest_context, predict_memory
    n = outcome(longest_context, cfg=CFG, **kw)
    if n is None:
        return
    cp, hi, budget = kw["cp"], kw["hi"], kw["budget_bytes"]
    assert isinstance(n, int) and 0 <= n <= hi and n % (2 * cp) == 0

    def peak(length: int) -> int:
        return predict_memory(CFG, length, cp=cp, dp=kw["dp"], scheme=kw["scheme"],
                              recompute=kw["recompute"]).total
    if n:
        assert peak(n) <= budget
    if n + 2 * cp <= hi:                     # the next multiple does not fit: n is the largest
        assert peak(n + 2 * cp) > budget


@pytest.mark.timeout(60)
@FAST
@given(kw=cases(seq_len=(st.integers(1, 1 << 24), junk), cp=(st.integers(1, 64), junk),
                dp=(st.integers(1, 8), junk), scheme=scheme_s, recompute=mode_s))
def test_predict_memory_is_positive_or_a_config_error(kw):
    from distattn.plan.memory import predict_memory
    plan = outcome(predict_memory, cfg=CFG, **kw)
    if plan is None:
        return
    assert plan.total > 0 and min(plan.params, plan.grads, plan.optimizer, plan.activations) >= 0
    want_n = CFG.data.seq_len if kw["seq_len"] is None else kw["seq_len"]   # None: the config's value
    want_cp = CFG.parallel.cp if kw["cp"] is None else kw["cp"]
    assert plan.seq_len == want_n and plan.world == want_cp
    assert plan.phase in ("loss", "mlp_backward", "attention_backward")


@pytest.mark.timeout(60)
@FAST
@given(kw=cases(budget_gib=(st.floats(0.01, 200), st.one_of(junk, st.just(math.inf))),
                worlds=(st.lists(st.integers(1, 64), min_size=1, max_size=3), st.lists(junk, max_size=2)),
                schemes=(st.lists(st.sampled_from(SCHEMES), min_size=1, max_size=2),
                         st.lists(st.text(max_size=4), max_size=2)),
                recomputes=(st.lists(st.sampled_from(MODES), min_size=1, max_size=2),
                            st.lists(st.text(max_size=4), max_size=2))))
def test_plan_table_rows_or_a_config_error(kw):
    from distattn.plan.memory import plan_table
    rows = outcome(plan_table, cfg=CFG, **kw)
    if rows is None:
        return
    assert rows
    for r in rows:
        assert r["longest"] >= 0 and r["longest"] % (2 * r["cp"]) == 0 and r["peak_mib"] > 0


# ----------------------------------------------------------------------------- plan batch


@pytest.mark.timeout(60)
@FAST
@given(kw=cases(lengths=(st.lists(st.integers(1, 3000), min_size=1, max_size=40),
                         st.one_of(st.lists(st.integers(-2, 0), min_size=1, max_size=3), junk)),
                seq_len=(st.integers(1, 2048), junk), dp=(st.integers(1, 4), junk),
                micro=(st.integers(1, 3), junk), steps=(st.integers(1, 3), junk),
                linear_cost=(st.floats(0, 1e4), junk), max_defer=(st.integers(0, 3), junk),
                seed=(st.integers(0, 1 << 70), junk)))
def test_batch_planner_compares_or_a_config_error(kw):
    from distattn.sched.pack_stats import compare
    res = outcome(compare, **kw)
    if res is None:
        return
    assert set(res) == {"tokens", "attention"}
    for r in res.values():
        assert r["max_over_mean"] >= 1 - 1e-9 and 0 <= r["idle"] <= r["worst_idle"] + 1e-9 <= 1 + 1e-9
        assert 0 <= r["padding"] <= 1       # 1: a step whose every piece waits (deferral)


@pytest.mark.timeout(60)
@FAST
@given(kw=cases(mean=(st.floats(1, 1e9), st.one_of(junk, st.just(math.inf))),
                sigma=(st.floats(0, 10), st.one_of(junk, st.floats(10.5, 1e3))),
                docs=(st.integers(1, 500), junk), seed=(st.integers(0, 1 << 70), junk)))
def test_lognormal_lengths_are_positive_or_a_config_error(kw):
    from distattn.sched.pack_stats import lognormal_lengths
    x = outcome(lognormal_lengths, **kw)
    if x is None:
        return
    assert len(x) == kw["docs"] and (x >= 1).all()


# ----------------------------------------------------------------------------- simulate


SIM_NAMES = ("ring", "ring-basic", "allgather", "ulysses", "usp", "usp:2", "usp:4", "lasp2", "lasp1",
             "ring-linear")


@st.composite
def workloads(draw):
    """Valid shapes (heads a multiple of kv_heads) or, half the time, one bad field."""
    from distattn.sim import AttnWorkload
    heads = draw(st.sampled_from((4, 8, 16, 32)))
    f = dict(seq=draw(st.integers(64, 1 << 20)), heads=heads,
             kv_heads=heads // draw(st.sampled_from((1, 2, 4))), head_dim=draw(st.sampled_from((32, 64, 128))),
             dtype_bytes=draw(st.sampled_from((2, 4))))
    if draw(st.booleans()):
        f[draw(st.sampled_from(sorted(f)))] = draw(st.one_of(junk, st.integers(-3, 0), st.just(3)))
    return AttnWorkload(**f)


@pytest.mark.timeout(90)
@FAST
@given(kw=cases(name=(st.sampled_from(SIM_NAMES), st.one_of(st.sampled_from(("usp:0", "usp:x", "usp:99")),
                                                            st.text(max_size=5), junk)),
                w=(workloads(), st.nothing()), world=(st.integers(1, 64), junk)))
def test_layer_time_is_finite_or_a_config_error(kw):
    from distattn.sim import get_cluster, layer_time
    lt = outcome(layer_time, cluster=get_cluster("h100"), **kw)
    if lt is None:
        return
    for v in (lt.fwd_s, lt.bwd_s, lt.compute_s, lt.comm_s, lt.mem_bytes):
        assert math.isfinite(v) and v >= 0
    assert lt.total_s > 0 and lt.bytes_sent >= 0


@pytest.mark.timeout(90)
@FAST
@given(model=st.sampled_from(("llama3-1b", "linear-llama3-1b", "llama3-8b-hybrid")),
       kw=cases(seq=(st.integers(64, 1 << 22), junk), world=(st.integers(1, 64), junk),
                zero_stage=(st.integers(0, 2), junk), step_overhead_s=(st.floats(0, 10), junk)))
def test_training_step_and_max_context_or_a_config_error(model, kw):
    from distattn.sim import MODELS, get_cluster, max_context, step_time
    cluster = get_cluster("h100")
    st_ = outcome(step_time, model=MODELS[model], cluster=cluster, **kw)
    if st_ is None:
        return
    assert math.isfinite(st_.step_s) and st_.step_s > 0 and st_.mem_bytes > 0
    mc = max_context(MODELS[model], kw["world"], cluster, zero_stage=kw["zero_stage"])
    assert mc >= 0 and mc % (2 * kw["world"]) == 0
