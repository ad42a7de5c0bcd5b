"""Per-rank peak memory of a training step, and the longest context under a budget.

The model is the trainer's megatron GPT (RMSNorm, SwiGLU, no biases, untied
embedding and output layer) with distattn core attention. Per rank, with
T = seq_len / cp local tokens and element size s:

static      parameters P*s, gradients P*s plus the fp32 flat all-reduce copy
            4P, AdamW moments 2*P*s (fp32 master copy and moments with bf16
            through DeepSpeed). ZeRO-1 divides the optimizer state by the
            dp*cp ranks, ZeRO-2 the gradients too. Live all step long.
activations what autograd saves per token, from a census of the saved
            tensors: per layer two RMSNorms (input, output, fp32 rstd), the
            projection input, q/k/v/out and the fp32 lse of the scheme, fc1's
            output (2f) and SwiGLU's three f-wide tensors:
            (8h + 2*Hkv*D + 5f)*s + 4H + 8 bytes. recompute=full keeps each
            layer's input (h*s); recompute=selective keeps the input, the core
            attention's inputs before RoPE and what its scheme saved. Once per
            model: tokens, labels, per-token loss, RoPE cos/sin.
peak        the largest of three moments of the backward, each counted as the
            tensors live then (the `phase` of the plan):
              loss                the log-softmax (fp32 V), the output layer's
                                  input and the two V-wide fp32 gradients;
              mlp_backward        the last layer's activations (rebuilt, with
                                  recomputation) and three h-wide gradients;
              attention_backward  the same less the MLP's saved tensors, plus
                                  the gradients of out, q, k, v and the
                                  scheme's backward buffers for one layer:
                ring       two K/V blocks in flight plus the fp32 dK/dV in
                           flight and at home (with cp > 2 also the
                           previous hop's send and receive)
                allgather  the gathered K/V of the whole sequence and its
                           fp32 gradient
                ulysses    the head-sharded full-sequence q, k, v, out and
                           their gradients
                lasp2      the gathered per-rank states (H*D*D fp32 each)
              delta_backward      the same for a delta-rule layer (see Layer kinds)
            Communication buffers are live only while attention runs, so they
            add to the peak only when that moment is the largest.

Measured against the peak resident-set growth of two training steps after a
warm-up step (distattn/bench/memory.py): within a few percent for the tiny
model at 4K-16K tokens in all three recompute modes, fp32 (docs/benchmarks.md).
bf16 is planned at 2 bytes per element but not validated: on CPU its steps
measured 1.25-2x the plan, because the CPU RMSNorm saves fp32 copies of its
input and output and the CPU attention kernels keep fp32 workspaces.

The loss moment also counts the final norm's saved tensors: its normalised
input and, with recomputation, its input (the last layer's output, which no
layer keeps).

Long-context modes (checked on CPU, fp32, against measured steps and the
measured longest context at cp = 1, 2, 4; docs/benchmarks.md):
train.shard=fsdp divides parameters, gradients and AdamW state by dp*cp and adds,
at every moment, the root's whole parameters (embeddings, final norm: they stay
gathered from forward to backward), two layers' whole parameters (the running
one and the prefetched one) and one layer's whole gradient; in the backward
also the output layer's whole gradient, which waits for the root's
reduce-scatter at its end. model.loss_tile replaces the V-wide per-token loss
tensors by one tile's fp32 logits and gradient, the hidden states' gradient
(formed in the forward) and the output weight's fp32 gradient. model.mlp_tile
keeps only the MLP input per token and rebuilds one tile's SwiGLU activations
in the backward; with recomputation the rebuilt layer stops at the last tile's
input, and the pre-MLP norm's backward after the tiles can set the peak.

Layer kinds (model.layer_pattern), each with its own parameters and saved
tensors: 'N' as above; 'L' (linear attention) the same plus its normalised
output, and no RoPE tables unless some layer is 'N'; 'D' (Gated DeltaNet) and
'K' (Kimi Delta Attention) keep the norms and the MLP and, from a census of
their mixers, the short convolution's four gathered taps, its output and
SiLU's, the normalised q and k, the decay's fp32 steps (per head, or per key
channel for 'K'), beta, the output norm and gate, and the core's inputs (fp32
copies of v, alpha, beta; on one device also the state entering every chunk);
'L', 'D' and 'K' take their communication buffers from attention.linear_scheme.
Each kind's moments are taken at its last layer (the backward meets it
first, with every earlier layer's activations still saved). A delta-rule
layer's attention moment (`delta_backward`) holds, beside its saved tensors,
the kernel's backward (`_delta_backward`: the chunk factors rebuilt, with their
pairwise decays while they fit the kernel's keep budget, the reverse sweep,
the gradients per chunk group and scattered back; under cp also the scheme's
whole fp32 gradients). Measured (fp32, DDN and KKN, 2K-32K tokens, cp 1 and 2,
lasp2 and lasp1, all three recompute modes): 0.95-1.05 of the step's peak.
These are distattn's chunked kernel's tensors (kernels/delta.py, which CPU runs
and CUDA without flash-linear-attention use); fla's CUDA kernels keep others.

The longest context is the largest seq_len (a multiple of 2*cp, as zigzag
needs) whose predicted peak fits the budget, found by bisection.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from distattn.config import ConfigError
from distattn.config.sections import SCHEMES
from distattn.plan.cli import add_memory_parser as add_parser  # noqa: F401  (distattn.cli imports it here)

GIB = 1024 ** 3
MIB = 1024 ** 2
RECOMPUTE = ("none", "selective", "full")
MAX_SEQ = 1 << 34  # the longest context the search considers (16 Gi tokens)


@dataclass
class MemoryPlan:
    seq_len: int
    world: int            # cp ranks splitting the sequence
    scheme: str
    recompute: str
    params: int
    grads: int
    optimizer: int
    activations: int
    transient: int
    comm: int
    phase: str = ""       # the moment of the step that sets the peak
    host: int = 0         # saved activations held in host memory (model.offload_activations)

    @property
    def static(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.static + self.activations + self.transient + self.comm

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d


CONV_TAPS = 4  # the delta-rule layers' short convolution (distattn.model.conv_halo.KERNEL)


def layer_params(m, kind: str = "N") -> int:
    """Parameters of one layer of `kind`: its token mixer, two RMSNorms and the SwiGLU MLP.

    'N' and 'L' share megatron's attention (q/k/v with their biases where set, the output
    projection); 'D' (Gated DeltaNet) and 'K' (Kimi Delta Attention) have q/k/v and the output
    projection over H*d channels, beta per head, the depthwise convolution, A_log and the head norm,
    and their gates: 'D' a decay and a dt_bias per head and a full-rank output gate, 'K' low-rank
    (through d) decay and output gates and a dt_bias per channel.
    """
    h, H, d, kv, f = m.hidden_size, m.num_attention_heads, m.head_dim, m.num_query_groups, m.ffn_hidden_size
    common = 2 * h + 3 * h * f
    if kind in ("D", "K"):
        hd = H * d
        mixer = 3 * h * hd + h * H + hd * h + 3 * hd * CONV_TAPS + H + d
        gates = h * H + h * hd + H if kind == "D" else 2 * (h * d + d * hd) + hd
        return common + mixer + gates
    qkv = h + 2 * kv * d
    return common + h * qkv + h * h + (qkv if getattr(m, "qkv_bias", False) else 0)


def param_count(m) -> int:
    """Parameters of the GPT model for ModelConfig `m`: embeddings (one matrix when tied), each layer
    by its kind (`layer_params`), the final RMSNorm."""
    h, v = m.hidden_size, m.vocab_size
    embeddings = (1 if getattr(m, "tie_embeddings", False) else 2) * v * h
    return embeddings + sum(layer_params(m, k) for k in m.layer_kinds()) + h


def _root_params(m) -> int:
    """Parameters outside the layers: embeddings (one matrix when tied) and the final norm."""
    return (1 if getattr(m, "tie_embeddings", False) else 2) * m.vocab_size * m.hidden_size + m.hidden_size


def _layer_saved(m, s: int, tp: int = 1, sp: bool = False, kind: str = "N", cp: int = 1) -> dict[str, float]:
    """Per-token bytes one transformer layer of `kind` saves for its backward, by part.

    Counted from the tensors autograd keeps (a census of saved tensors of the
    megatron layer with distattn core attention): two RMSNorms (input and
    normalised output each, fp32 rstd), q/k/v and the projection input, the
    scheme's q, k, v, out and lse, fc1's output and the SwiGLU's three f-wide
    tensors. A linear layer ('L') keeps its normalised output besides (its rsqrt
    takes the lse's place); delta-rule layers ('D', 'K') are `_delta_saved`. Under
    tensor parallelism the head- and FFN-wide tensors hold this
    rank's 1/tp of the heads and of the FFN; the hidden-wide ones (norms, linear
    inputs) hold every token, or 1/tp of them with sequence parallelism (`sp`).
    """
    h, H, d, kv, f = m.hidden_size, m.num_attention_heads, m.head_dim, m.num_query_groups, m.ffn_hidden_size
    rows = tp if sp else 1                             # the hidden-wide tensors' share of the tokens
    core = ((2 * h + 2 * kv * d) * s + 4 * H) / tp     # q (roped), k (roped), v, out; lse fp32
    attn_rest = (2 * h * s + 4) / rows + h * s / tp    # norm input and output, rstd; projection input
    mlp = (3 * h * s + 4) / rows + 5 * f * s / tp      # norm, fc1 input; fc1 output (2f), SwiGLU 3f
    inputs = (h + 2 * kv * d) * s / tp                 # core attention inputs before RoPE
    out_side = 0.0                                     # freed before the core's backward runs
    if kind == "L":
        core += h * s / tp                             # the output normalised per head
    elif kind in ("D", "K"):
        core, mixer, inputs, out_side = _delta_saved(m, s, kind, cp)
        attn_rest += mixer
    return {"core": core, "attn_rest": attn_rest, "mlp": mlp, "inputs": inputs, "out_side": out_side,
            "full": core + attn_rest + mlp}


def saved_per_token(m, kind: str = "N", s: int = 4, cp: int = 1) -> float:
    """Bytes one layer of `kind` saves per token without recomputation (no tensor parallelism)."""
    return _layer_saved(m, s, kind=kind, cp=cp)["full"]


def delta_chunk(kind: str) -> int:
    """The delta-rule kernel's default chunk (distattn.kernels.delta.default_chunk): GDN 32, KDA 16."""
    return 32 if kind == "D" else 16


def _delta_saved(m, s: int, kind: str, cp: int) -> tuple[float, float, float, float]:
    """(core, the rest of the mixer, the selective-recompute inputs, the output side): per-token
    bytes a Gated DeltaNet ('D') or Kimi Delta Attention ('K') mixer saves (gated_delta.py).

    core     q and k (normalised), the output o; the kernel's fp32 copies of v, alpha and beta; on
             one device also the state entering every chunk (H d x d fp32 per C tokens)
    mixer    the convolution: its four taps gathered ([T, 3hd] each, with their int64 indices), its
             output and SiLU's (which q and k keep as views); q's and k's norms; the decay's
             pre-activation, softplus, log and alpha (fp32, one per head or per channel) and
             sigmoid(beta); the head norm's rsqrt and its normalised and weighted outputs; the
             output gate ('D': W_g x and its SiLU; 'K': W_g1 x and the sigmoid, and the decay's
             W_f1 x) and the gated output
    inputs   the core's value leaf (v | alpha | beta, fp32), kept with it under selective
             recomputation
    """
    H, d = m.num_attention_heads, m.head_dim
    hd, g = H * d, (H if kind == "D" else H * d)      # g: alpha's channels per token
    states = hd * d * 4 / delta_chunk(kind) if cp == 1 else 0.0
    core = 3 * hd * s + (hd + g + H) * 4 + states
    conv = 18 * hd * s + 4 * 8
    gates = 4 * g * 4 + 4 * H + 4 * H * s
    gate_out = 3 * hd * s if kind == "D" else 2 * hd * s + 2 * d * s
    out_side = 4 * H + 2 * hd * s + (hd * 4 if s != 4 else 0) + gate_out
    return core, conv + gates + out_side, (hd + g + H) * 4, out_side


def _delta_backward(m, kind: str, T: int, cp: int, runs: int = 1) -> float:
    """Per-token bytes the delta-rule kernel's backward holds beyond the saved tensors (fp32).

    `ChunkFactors` rebuilt with `keep_saved`: the chunked fp32 q/k/v/log-gate/beta, Qe and the
    intra-chunk outputs, the chunk maps (A, B), and, while they total at most _KEEP_BUDGET pair
    elements, every group's intermediates (G, exp G, K~, K^, U~, W; the pairwise decays of k.k and
    q.k, [C] per head for GDN and [C, d] for KDA; I + A and P, [C] per head). Then dO, dQe, the
    reverse sweep's dB and dA, the gradients of every group; then the larger of one group's
    backward temporaries and the gradients scattered back to tokens with one concatenation. Under
    cp the scheme also holds the five fp32 gradients whole and the states entering each chunk.
    The keep budget applies per call of the kernel: per run of the rank's `runs` (a zigzag rank's
    two halves), counted as whole chunks of one document. Packed documents add a partial chunk
    each, so a run within a few chunks of the budget drops the intermediates and the plan is then
    high (tiny KKN, 16K tokens on one rank, two documents: 1.64x measured with full recomputation).
    """
    from distattn.kernels.delta import _KEEP_BUDGET, _PAIR_BUDGET
    H, d = m.num_attention_heads, m.head_dim
    C = delta_chunk(kind)
    hd, g, pair = H * d, (H if kind == "D" else H * d), H * C * (1 if kind == "D" else d)
    ins = 3 * hd + g + H                              # q, k, v, log-gate, beta (and their gradients)
    dd = hd * d / C                                   # one d x d matrix per head and chunk
    per = ins + 2 * hd + 2 * dd                       # the factors: inputs, Qe, Oi, map A and B
    if -(-T // runs) * pair <= _KEEP_BUDGET:
        per += 4 * hd + 2 * g + 2 * pair + 2 * H * C  # the kept intermediates
    per += 2 * hd + 2 * dd + ins                      # dO, dQe, dB, dA; the gradients of every group
    if cp > 1:
        per += ins + dd                               # the scheme's whole gradients; entering states
    group = min(T, C * max(1, _PAIR_BUDGET // (pair * C)))
    # then the larger of: the last group's backward temporaries, or the gradients scattered back to
    # tokens beside one concatenation
    per += max(group * (12 * hd + 4 * pair) / T, ins + hd)
    return per * 4


def _kept_redo(part: dict, recompute: str, mlp_tile: int, h: int, s: int, rows: int):
    """(part, kept, rebuilt): one layer's saved bytes per token between its forward and backward, and
    those its backward rebuilds first, under `recompute` (and model.mlp_tile)."""
    if mlp_tile:  # the MLP's f-wide tensors are rebuilt one tile at a time; its norm keeps its own
        part = {**part, "mlp": (3 * h * s + 4) / rows}
        part["full"] = part["core"] + part["attn_rest"] + part["mlp"]
    if recompute == "none":
        return part, part["full"], 0.0
    if recompute == "full":
        return part, h * s / rows, part["full"]
    if recompute == "selective":
        # rebuilt: everything but the core attention; the rebuilt q/k/v
        # projection (measured live through the layer's backward) too
        return (part, h * s / rows + part["core"] + part["inputs"],
                part["attn_rest"] + part["mlp"] + part["inputs"])
    raise ConfigError(f"recompute={recompute!r}; choose one of {', '.join(RECOMPUTE)}")


def _fsdp_terms(m, kinds: str, P: int, tp: int, s: int, T: int) -> tuple[float, float]:
    """Per-token bytes FSDP2 holds whole: the root's parameters (they stay gathered from forward to
    backward), the largest layer's whole parameters twice (the running one and the prefetched one)
    and its whole gradient before the reduce-scatter; and the output layer's whole gradient, formed
    in the loss's backward, which waits for the root's reduce-scatter at the end of the backward
    (measured: about V*h*s more per rank at cp=2 and 4)."""
    h = m.hidden_size
    root = (_root_params(m) - h) / tp + h
    layer = max((layer_params(m, k) - 2 * h) / tp + 2 * h for k in set(kinds))
    return (root + 3 * layer) * s / T, -(-m.vocab_size // tp) * h * s / T


def tp_param_count(m, tp: int) -> int:
    """Parameters one tp rank holds: 1/tp of every split weight, the norms whole."""
    norms = (2 * m.num_layers + 1) * m.hidden_size
    return -(-(param_count(m) - norms) // tp) + norms


def _comm_buffers(scheme: str, cp: int, T: int, m, s: int, tp: int = 1) -> tuple[float, float]:
    """(forward, backward) bytes of one layer's communication buffers on a rank (its tp share of heads)."""
    H, d, kv = m.num_attention_heads // tp, m.head_dim, m.num_query_groups // tp
    kv_local = 2 * T * kv * d                          # this rank's K and V elements
    if cp == 1 or scheme == "local":
        return 0.0, 0.0
    if scheme in ("ring", "hetero", "cad"):
        # two K/V blocks in flight; backward adds the fp32 dK/dV in flight and at home, and with more
        # than two ranks the previous hop's dK/dV send and receive, still held when the next hop is
        # posted (measured, ring, fp32: cp=2 fits two accumulators, cp=4 four)
        return 2 * kv_local * s, 2 * kv_local * s + (2 if cp == 2 else 4) * kv_local * 4
    if scheme == "allgather":
        # the gathered K/V of the whole sequence; backward adds its fp32 gradient
        return kv_local * cp * s, kv_local * cp * (s + 4)
    if scheme in ("ulysses", "usp"):
        # head-sharded full-sequence q, k, v, out (and in backward their gradients)
        a2a = T * (2 * H * d + 2 * kv * d) * s
        return a2a, 2 * a2a
    if scheme in ("lasp2", "lasp1"):
        return 2 * cp * H * d * d * 4, 2 * cp * H * d * d * 4
    return 2 * kv_local * (s + 4), 2 * kv_local * (s + 4)


def predict_memory(cfg, seq_len: int | None = None, cp: int | None = None, dp: int | None = None,
                   scheme: str | None = None, recompute: str | None = None,
                   tp: int | None = None) -> MemoryPlan:
    """Predicted per-rank peak bytes of a training step of `cfg` (overrides optional).

    The peak is the largest of three moments, each the tensors live then:
    the loss (all saved activations plus the logits' log-softmax and its
    gradients), the backward of the last layer's MLP (with recomputation,
    that layer's activations rebuilt) and the backward of its core attention
    (the scheme's backward buffers). Static memory (parameters, gradients,
    optimizer state) is live at all three in a steady-state step.

    With tensor parallelism (`tp`, default the config's parallel.tp) each rank
    holds 1/tp of the split weights and of the head- and FFN-wide activations;
    with sequence parallelism also 1/tp of the hidden-wide ones, plus megatron's
    all-gathered `[T, h]` input, kept in its shared buffer, and one `[T, h]`
    gradient in the backward (gathered, or before its reduce-scatter). The loss gathers the final
    hidden states of all T tokens and runs over this rank's 1/tp of the vocabulary.
    """
    m, t = cfg.model, cfg.train
    tp = _count("tp", getattr(cfg.parallel, "tp", 1) if tp is None else tp)
    sp = tp > 1 and getattr(cfg.parallel, "sequence_parallel", True)
    rows = tp if sp else 1
    n = _count("seq_len", cfg.data.seq_len if seq_len is None else seq_len)
    cp = _count("cp", cfg.parallel.cp if cp is None else cp)
    dp = _count("dp", cfg.parallel.dp if dp is None else dp)
    scheme = _scheme(cfg.attention.scheme if scheme is None else scheme)
    recompute = _recompute(m.recompute if recompute is None else recompute)
    s = 2 if m.dtype == "bf16" else 4
    h, d, kv, V = m.hidden_size, m.head_dim, m.num_query_groups, m.vocab_size
    T = -(-n // cp)  # tokens on this rank
    P = tp_param_count(m, tp)
    shards = dp * cp
    params = P * s
    fsdp = getattr(t, "shard", "none") == "fsdp"
    if fsdp:  # FSDP2: every parameter, its gradient and its AdamW moments split over dp x cp
        params, grads, optim = -(-P * s // shards), -(-P * s // shards), -(-2 * P * s // shards)
    elif t.zero_stage == 0:
        grads, optim = P * s + 4 * P, 2 * P * s
    else:  # DeepSpeed: fp32 moments (and an fp32 master copy with bf16 weights)
        opt_full = 8 * P + (4 * P if s == 2 else 0)
        optim = opt_full // shards
        grads = P * s + (4 * P // shards if t.zero_stage == 2 else 4 * P)

    kinds = m.layer_kinds()
    mlp_tile = getattr(m, "mlp_tile", 0)
    hrow = h * s / rows                                # one hidden-wide tensor per token
    parts, kept, redo = {}, {}, {}
    for k in sorted(set(kinds)):
        parts[k], kept[k], redo[k] = _kept_redo(_layer_saved(m, s, tp, sp, k, cp), recompute, mlp_tile, h, s,
                                                rows)
    mlp_whole = _layer_saved(m, s, tp, sp)["mlp"]
    once = 8 + 8 + 4 + (2 * d * 4 if "N" in kinds else 0)  # tokens, labels, per-token loss, RoPE cos/sin
    if sp:
        once += h * s                                  # megatron's shared all-gather buffer, [T, h]
    # the saved activations up to the last layer of each kind (the backward meets it first)
    upto, total = {}, 0.0
    offload = getattr(m, "offload_activations", False) and recompute == "full"
    for i, k in enumerate(kinds):
        total += kept[k]
        # offloaded: every layer's input waits in host memory; the device holds the layer being
        # rebuilt and the one fetched next
        upto[k] = (min(i + 1, 2) * kept[k] if offload else total) + once
    base = (min(len(kinds), 2) * kept[kinds[-1]] if offload else total) + once
    host = total if offload else 0.0
    # 1. the loss: saved log-softmax (fp32) and the final norm output, plus the
    #    gradients of the log-softmax and of the logits; tiled (model.loss_tile), one tile's fp32
    #    logits and their gradient, the hidden states' gradient (formed in the forward) and the
    #    output weight's fp32 gradient
    loss_tile = getattr(m, "loss_tile", 0)
    # the final norm (torch's RMSNorm) also keeps its normalised input, and, with recomputation, its
    # input, the last layer's output, which no layer keeps (measured: 2h per token besides its output)
    norm = h * s * (1 if recompute == "none" else 2)
    if tp > 1:  # vocabulary-parallel, tiled (one tile of all T tokens without model.loss_tile): the
        # final norm's output, the gathered hidden states, their gradient formed in the forward and
        # its scaled copy handed back in the backward, a tile's V/tp logits
        Vt = -(-V // tp)
        loss = base + hrow + 3 * h * s + (min(loss_tile or T, T) * Vt * (8 + s) + 4 * Vt * h) / T
    elif loss_tile:
        loss = base + norm + h * s + h * s + (min(loss_tile, T) * V * (8 + s) + 4 * V * h) / T
    else:
        loss = base + norm + 4 * V + h * s + 2 * 4 * V
    gathered, root_grad = _fsdp_terms(m, kinds, P, tp, s, T) if getattr(t, "shard", "none") == "fsdp" else (0, 0)
    phases = [("loss", loss, gathered)]
    lin = getattr(cfg.attention, "linear_scheme", "lasp2") if cp > 1 else "local"
    # a rank's runs of tokens, each one call of the delta kernel: a zigzag rank holds two halves
    runs = 2 if lin == "lasp2" and getattr(cfg.attention, "layout", "zigzag") in ("zigzag", "doc_zigzag") else 1
    for k in parts:
        # 2. the last layer's MLP backward: its activations (rebuilt, with
        #    recomputation, together with the rebuilt forward's h-wide output) and
        #    three h-wide gradients (residual stream, MLP output, norm input); its
        #    saved tensors are freed as it proceeds
        if mlp_tile:
            # tiled: rebuilding stops at the last tile's input, so one h-wide tensor of the layer's (its
            # output) is not rebuilt. The larger of two moments: inside the MLP's backward, one tile's
            # SwiGLU activations rebuilt beside two h-wide gradients (the output's, which is the residual
            # stream's, and the input's, summed over tiles); right after it, the pre-MLP norm's backward
            # with three. Measured (fp32, W=1, full recomputation, 9K-18K tokens): the norm's backward is
            # the step's peak, and the layer rebuilt up to the last tile holds 8h, not 9h, per token
            rebuilt = redo[k] - (hrow if redo[k] else 0)
            mlp = upto[k] + rebuilt + max(2 * hrow + min(mlp_tile, T) * mlp_whole / T, 3 * hrow)
        else:
            mlp = upto[k] + redo[k] + (hrow if redo[k] else 0) + 3 * hrow
        if sp:  # one [T, h] tensor of megatron's: a row-parallel linear's all-gathered output gradient, or a
            mlp += h * s  # column-parallel one's input gradient before its reduce-scatter
        phases.append(("mlp_backward", mlp, gathered + root_grad))
        # 3. its core attention backward: the MLP's saved tensors are gone; the
        #    gradients of out, q, k, v and the scheme's backward buffers are live. A delta-rule
        #    layer's output side is gone too; the gradients of the core's output and of the residual
        #    stream and the kernel's backward (`_delta_backward`) are live
        attn = upto[k] + redo[k] - parts[k]["mlp"] + (h * s if sp else 0)
        if k in ("D", "K"):
            hd = m.num_attention_heads * d
            attn += (hd + h) * s - parts[k]["out_side"] + _delta_backward(m, k, T, cp, runs)
        else:
            attn += (2 * h + 4 * kv * d) * s / tp
        comm_bwd = _comm_buffers(scheme if k == "N" else lin, cp, T, m, s, tp)[1]
        phases.append(("attention_backward" if k in ("N", "L") else "delta_backward", attn,
                       comm_bwd / T + gathered + root_grad))
    phase, peak, comm = max(phases, key=lambda ph: ph[1] + ph[2])
    activations = int(T * base)
    transient = int(T * (peak - base))
    return MemoryPlan(seq_len=n, world=cp, scheme=scheme, recompute=recompute, params=params,
                      grads=grads, optimizer=optim, activations=activations, transient=transient,
                      comm=int(T * comm), phase=phase, host=int(T * host))


def longest_context(cfg, budget_bytes: float, cp: int, scheme: str | None = None,
                    recompute: str | None = None, dp: int = 1, hi: int = MAX_SEQ) -> int:
    """Largest seq_len (multiple of 2*cp, at most `hi`) whose predicted per-rank peak fits
    `budget_bytes`; 0: none. At most 2*log2(hi) predictions, whatever the arguments."""
    cp, dp, hi = _count("cp", cp), _count("dp", dp), _count("hi", hi)
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float)) \
            or not math.isfinite(budget_bytes) or budget_bytes <= 0:
        raise ConfigError(f"budget: {budget_bytes!r} bytes; the per-device budget must be a finite "
                          f"number > 0")
    _scheme(scheme if scheme is not None else cfg.attention.scheme)
    _recompute(recompute if recompute is not None else cfg.model.recompute)
    step = 2 * cp
    top = hi // step                       # the most steps a context may hold

    def fits(k: int) -> bool:
        return predict_memory(cfg, k * step, cp=cp, dp=dp, scheme=scheme,
                              recompute=recompute).total <= budget_bytes

    if top < 1 or not fits(1):
        return 0
    lo, up = 1, 2                          # fits(lo); up: the first multiple not known to fit
    while up <= top and fits(up):
        lo, up = up, up * 2
    up = min(up, top + 1)
    while up - lo > 1:
        mid = (lo + up) // 2
        if fits(mid):
            lo = mid
        else:
            up = mid
    return lo * step


def _count(name: str, value) -> int:
    """A positive whole number of tokens or ranks, else a ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        if not (isinstance(value, float) and value.is_integer() and value >= 1):
            raise ConfigError(f"{name}={value!r}: expected an integer >= 1")
    return int(value)


def _scheme(name) -> str:
    if name not in SCHEMES:
        raise ConfigError(f"scheme {name!r} is not one of {', '.join(SCHEMES)}")
    return name


def _recompute(mode) -> str:
    if mode not in RECOMPUTE:
        raise ConfigError(f"recompute {mode!r} is not one of {', '.join(RECOMPUTE)}")
    return mode


def plan_table(cfg, budget_gib: float, worlds: list[int], schemes: list[str],
               recomputes: list[str]) -> list[dict]:
    """One row per (scheme, cp, recompute): the peak at the config's seq_len and the longest context
    under `budget_gib` (with the config's dp, as the peak)."""
    if isinstance(budget_gib, bool) or not isinstance(budget_gib, (int, float)) \
            or not math.isfinite(budget_gib) or budget_gib <= 0:
        raise ConfigError(f"budget_gib={budget_gib!r}: expected a finite number of GiB > 0, e.g. 80")
    for what, vals in (("worlds", worlds), ("schemes", schemes), ("recompute", recomputes)):
        if not vals:
            raise ConfigError(f"{what}: expected at least one value")
    rows, seen = [], set()
    for scheme in schemes:
        for w in worlds:
            for rc in recomputes:
                sch = "local" if w == 1 else scheme
                if (sch, w, rc) in seen:  # one process needs no scheme: list W=1 once
                    continue
                seen.add((sch, w, rc))
                longest = longest_context(cfg, budget_gib * GIB, w, sch, rc, dp=cfg.parallel.dp)
                here = predict_memory(cfg, cp=w, scheme=sch, recompute=rc)
                rows.append({"scheme": sch, "cp": w, "recompute": rc, "seq_len": here.seq_len,
                             "peak_mib": here.total / MIB, "static_mib": here.static / MIB,
                             "act_mib": here.activations / MIB,
                             "transient_mib": (here.transient + here.comm) / MIB,
                             "peak_at": here.phase, "longest": longest, "host_mib": here.host / MIB})
    return rows


def format_table(rows: list[dict], budget_gib: float) -> str:
    host = any(r.get("host_mib", 0) for r in rows)  # a host column only when activations are offloaded
    head = (f"{'scheme':<10} {'cp':>3} {'recompute':<9} {'seq_len':>9} {'peak MiB':>9} {'static':>8} "
            f"{'activ.':>8} {'transient':>9}" + (f" {'host MiB':>9}" if host else "")
            + f" {'peak at':<18}  longest @ {budget_gib:g} GiB")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['scheme']:<10} {r['cp']:>3} {r['recompute']:<9} {r['seq_len']:>9} "
                     f"{r['peak_mib']:>9.1f} {r['static_mib']:>8.1f} {r['act_mib']:>8.1f} "
                     f"{r['transient_mib']:>9.1f}" + (f" {r['host_mib']:>9.1f}" if host else "")
                     + f" {r['peak_at']:<18}  {r['longest']:>10}")
    return "\n".join(lines)
