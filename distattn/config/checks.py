"""Checks across config sections: attention layouts and patterns, tensor parallelism.

Each returns the problems it found as lines naming the keys, the values and what
would work; `Config` collects them and fails once with all of them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distattn.config.sections import AttentionConfig, Config, ModelConfig, ParallelConfig


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


WEIGHTED_SCHEMES = ("ring", "allgather", "hetero", "lasp2", "lasp1")  # lasp*: layout via allgather


def attention_problems(a: "AttentionConfig", model: "ModelConfig", par: "ParallelConfig") -> list[str]:
    """Layout weights and the hetero pattern: checks that need the model and parallel sections."""
    problems: list[str] = []
    w = a.layout_weights
    if w is None and a.layout == "weighted" and a.scheme in WEIGHTED_SCHEMES:
        problems.append(f"attention.layout=weighted shares tokens by per-rank speed, but "
                        f"attention.layout_weights is not set; give one weight per cp rank, e.g. "
                        f"attention.layout_weights=[{', '.join(['1.0'] * par.cp)}], or use attention.layout=zigzag")
    if a.scheme == "cad" and a.layout in ("zigzag", "weighted"):
        problems.append(f"attention.layout={a.layout} with scheme cad: cad balances attention itself and "
                        f"keeps documents whole on their owners; {a.layout} would only cut documents into "
                        f"more pieces (more KV to send); use attention.layout=contiguous (cad's default when "
                        f"attention.layout is unset) or doc_zigzag")
    if w is not None:
        if a.layout != "weighted":
            problems.append(f"attention.layout_weights={w} needs attention.layout=weighted, got "
                            f"{a.layout!r}; set attention.layout=weighted or attention.layout_weights=null")
        if len(w) != par.cp:
            problems.append(f"attention.layout_weights has {len(w)} entries but parallel.cp={par.cp}; "
                            f"give one speed weight per context-parallel rank")
        if a.scheme not in WEIGHTED_SCHEMES:
            problems.append(f"attention.layout_weights applies to schemes {', '.join(WEIGHTED_SCHEMES)}; "
                            f"scheme {a.scheme!r} would ignore it; set attention.layout_weights=null")
    if a.scheme == "hetero":
        from distattn.kernels.sparse import HeteroPattern
        try:
            pat = HeteroPattern(block=a.hetero_block, local_blocks=a.hetero_local_blocks,
                                stride=a.hetero_stride, head_step=a.hetero_head_step,
                                offset=a.hetero_offset, dense_heads=a.hetero_dense_heads,
                                gqa_pattern=a.hetero_gqa)
            pat.check_coverage(model.num_attention_heads, model.num_query_groups,
                               a.hetero_allow_partial_coverage)
        except ValueError as e:
            problems.append(f"attention.scheme: {e} (keys: attention.hetero_stride, hetero_head_step, "
                            f"hetero_dense_heads, hetero_gqa, hetero_allow_partial_coverage; "
                            f"model.num_attention_heads={model.num_attention_heads}, "
                            f"model.num_query_groups={model.num_query_groups})")
    return problems


# schemes whose per-head or per-rank plans assume they see every head of the model
TP_REFUSED_SCHEMES = ("cad", "hetero")
SP_LAYOUTS = ("zigzag", "contiguous")  # equal token shares per cp rank


def tp_problems(cfg: "Config") -> list[str]:
    """parallel.tp > 1: megatron's tensor parallelism splits heads, query groups, the FFN and the vocabulary."""
    par, m, a = cfg.parallel, cfg.model, cfg.attention
    tp = par.tp
    if tp == 1:
        return []
    problems: list[str] = []
    if set(m.layer_kinds()) & set("DK"):
        problems.append(f"parallel.tp={tp} with model.layer_pattern={m.layer_pattern!r}: delta-rule layers "
                        f"('D' Gated DeltaNet, 'K' Kimi Delta Attention) run without tensor parallelism; "
                        f"set parallel.tp=1 or use only 'N' and 'L' layers")
    heads, groups = m.num_attention_heads, m.num_query_groups
    if heads % tp or groups % tp:
        fits = [d for d in divisors(groups) if heads % d == 0]
        problems.append(f"parallel.tp={tp} must divide both model.num_attention_heads={heads} and "
                        f"model.num_query_groups={groups} (each tp rank holds whole query groups); "
                        f"set parallel.tp to one of {', '.join(map(str, fits))}")
    elif a.scheme in ("ulysses", "usp") and heads % (tp * par.ulysses):
        problems.append(f"attention.scheme={a.scheme} splits each tp rank's heads over ulysses: "
                        f"heads % (tp x ulysses) = {heads} % ({tp} x {par.ulysses}) != 0; choose "
                        f"parallel.tp x parallel.ulysses dividing {heads}")
    if m.ffn_hidden_size % tp:
        problems.append(f"parallel.tp={tp} must divide model.ffn_hidden_size={m.ffn_hidden_size}")
    if m.vocab_size % tp:
        problems.append(f"parallel.tp={tp} must divide model.vocab_size={m.vocab_size} (the embedding and "
                        f"output layer are split by vocabulary); pad model.vocab_size to a multiple of {tp}, "
                        f"e.g. {-(-m.vocab_size // tp) * tp}")
    if a.scheme in TP_REFUSED_SCHEMES:
        problems.append(f"attention.scheme={a.scheme} with parallel.tp={tp}: its plan needs every head of "
                        f"the model on each rank; use ring, allgather, ulysses, usp, lasp2 or lasp1, or set "
                        f"parallel.tp=1")
    if par.attention_servers:
        problems.append(f"parallel.attention_servers={par.attention_servers} with parallel.tp={tp} is not "
                        f"supported; set parallel.tp=1 or parallel.attention_servers=0")
    if cfg.train.zero_stage > 0:
        problems.append(f"train.zero_stage={cfg.train.zero_stage} with parallel.tp={tp}: DeepSpeed's "
                        f"partitions would mix the tp ranks' different shards; use train.shard=fsdp "
                        f"(train.zero_stage=0) for sharded state with tensor parallelism")
    if par.sequence_parallel:
        if a.layout not in SP_LAYOUTS:
            problems.append(f"parallel.tp={tp} with parallel.sequence_parallel splits each cp rank's tokens "
                            f"over tp, which needs "
                            f"equal shares; attention.layout={a.layout} gives uneven ones; use "
                            f"attention.layout={' or '.join(SP_LAYOUTS)}, or parallel.sequence_parallel=false")
        elif cfg.data.seq_len % (par.cp * tp):
            step = par.cp * tp
            problems.append(f"parallel.tp={tp} with parallel.sequence_parallel: data.seq_len={cfg.data.seq_len} "
                            f"must be a multiple "
                            f"of cp x tp = {par.cp} x {tp} = {step} (every tp rank gets an equal part of its "
                            f"cp rank's tokens); e.g. data.seq_len={max(step, cfg.data.seq_len // step * step)}, "
                            f"or parallel.sequence_parallel=false")
    return problems
