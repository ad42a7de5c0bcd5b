"""The job's config sections (pydantic models) and the checks that span sections.

Every problem is reported as a `ConfigError` whose lines each name the dotted
key, the offending value and what would work, so a bad job fails at load time
with a fix in hand instead of deep inside a kernel or a collective.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, model_validator

from distattn.config.checks import WEIGHTED_SCHEMES, attention_problems, tp_problems
from distattn.config.checks import divisors as _divisors
from distattn.config.errors import ConfigError, _describe, _did_you_mean

SCHEMES = ("ring", "allgather", "ulysses", "usp", "lasp2", "lasp1", "local", "cad", "hetero")
LAYOUTS = ("zigzag", "contiguous", "doc_zigzag", "weighted")
LINEAR_SCHEMES = ("lasp2", "lasp1", "local")
BENCH_PEERS = ("ring-unbalanced", "deepspeed-ulysses", "ring-flash-attn")
DATA_SOURCES = ("stdlib", "text_dir", "jsonl", "megatron", "synthetic")
LAYER_KINDS = "NLDK"  # N: softmax attention, L: linear attention, D: Gated DeltaNet, K: Kimi Delta Attention
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
ENGINES = ("actors", "ray_train")

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent.parent / "configs" / "default.yaml"
MODEL_PRESETS_DIR = DEFAULT_CONFIG_PATH.parent / "models"

SchemeName = Literal[SCHEMES]
LayoutName = Literal[LAYOUTS]
LinearSchemeName = Literal[LINEAR_SCHEMES]
DataSource = Literal[DATA_SOURCES]
DType = Literal["fp32", "bf16"]


def _reject_bool(value: Any) -> Any:
    # YAML turns `yes`/`true` into bools; a bool where a number belongs is a typo.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return value


# Ints are strict so `true` or `2.5` never become a rank count; floats stay lax
# because PyYAML reads `3e-3` as a string.
PosInt = Annotated[int, Strict(), Field(ge=1)]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]
AnyInt = Annotated[int, Strict()]
PosFloat = Annotated[float, BeforeValidator(_reject_bool), Field(gt=0)]
NonNegFloat = Annotated[float, BeforeValidator(_reject_bool), Field(ge=0)]



class _Section(BaseModel):
    """Base for every config model: unknown keys are errors, failures are ConfigErrors."""

    model_config = ConfigDict(extra="forbid")
    section_key: ClassVar[str] = ""

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(_describe(err, self._prefix())) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any):  # type: ignore[override]
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as err:
            raise ConfigError(_describe(err, cls._prefix())) from None

    @classmethod
    def _prefix(cls) -> tuple[str, ...]:
        return (cls.section_key,) if cls.section_key else ()


def _fail(problems: list[str]) -> None:
    if problems:
        raise ValueError("\n".join(problems))


def _nearest_multiples(n: int, m: int) -> list[int]:
    lo = (n // m) * m
    return [x for x in (lo, lo + m) if x > 0]


class RunConfig(_Section):
    section_key: ClassVar[str] = "run"
    name: str = "default"
    output_dir: str | None = None  # None: runs/<name>
    seed: AnyInt = 1234

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        name = self.name
        if not name or name.strip() != name or any(c in name for c in "/\\\0") or name in (".", ".."):
            _fail([f"name={name!r} names the run directory runs/<name>; use letters, digits, '-', '_' "
                   f"or '.', e.g. run.name=exp1 (set run.output_dir for a directory elsewhere)"])
        if self.output_dir is None:
            self.output_dir = f"runs/{name}"
            self.model_fields_set.discard("output_dir")  # derived, not chosen
        elif not self.output_dir.strip():
            _fail([f"output_dir={self.output_dir!r} is empty; set run.output_dir to a directory, or leave it "
                   f"unset for runs/<run.name>"])
        return self


class RopeScalingConfig(_Section):
    """Rotary scaling for context extension (Hugging Face's rope_scaling fields); see distattn.model.rope."""

    section_key: ClassVar[str] = "model.rope_scaling"
    type: Literal["none", "linear", "yarn", "llama3"] = "none"
    factor: PosFloat = 1.0
    original_max_position_embeddings: PosInt | None = None  # yarn, llama3: the pretraining context
    low_freq_factor: PosFloat = 1.0   # llama3
    high_freq_factor: PosFloat = 4.0  # llama3
    beta_fast: PosFloat = 32.0        # yarn
    beta_slow: PosFloat = 1.0         # yarn
    mscale: PosFloat | None = None    # yarn
    mscale_all_dim: PosFloat | None = None
    attention_factor: PosFloat | None = None
    truncate: bool = True

    @model_validator(mode="after")
    def _check(self) -> "RopeScalingConfig":
        try:
            self.to_rope()
        except ValueError as e:
            _fail([f"{e}; set model.rope_scaling.original_max_position_embeddings to the context the model "
                   f"was trained at" if "original_max" in str(e) else str(e)])
        return self

    def to_rope(self):
        from distattn.model.rope import RopeScaling
        return RopeScaling(**self.model_dump())


class ModelConfig(_Section):
    section_key: ClassVar[str] = "model"
    preset: str | None = None  # a shape from configs/models/ (or a YAML path); keys given here override it
    # start from these weights: a Hugging Face directory or a distattn checkpoint (the shape comes from it)
    init_from: str | None = None
    num_layers: PosInt = 2
    hidden_size: PosInt = 128
    num_attention_heads: PosInt = 8
    num_query_groups: PosInt = 2
    ffn_hidden_size: PosInt = 512
    vocab_size: PosInt = 256
    layer_pattern: str | None = None
    rope_base: PosFloat = 10000.0
    rope_scaling: RopeScalingConfig = Field(default_factory=RopeScalingConfig)
    norm_eps: PosFloat = 1e-5          # RMSNorm epsilon
    qkv_bias: bool = False             # biases on the q/k/v projections (Qwen2)
    tie_embeddings: bool = False       # the output layer shares the input embedding's weight
    dtype: DType = "fp32"
    # activation recomputation: none | selective (layers re-run, core attention kept) | full
    recompute: Literal["none", "selective", "full"] = "none"
    # GPU runs with recompute=full: each layer's input in pinned host memory between forward and
    # backward (CPU runs: a logged no-op)
    offload_activations: bool = False
    # long context: run each MLP over tiles of this many local tokens, recomputed in the backward
    # (0: untiled), so [T, ffn] never exists whole
    mlp_tile: NonNegInt = 0
    # the output projection + cross-entropy over tiles of this many tokens (0: untiled): no [T, vocab]
    loss_tile: NonNegInt = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_kinds(self) -> str:
        """The pattern with None expanded, so callers never special-case it."""
        return self.layer_pattern if self.layer_pattern is not None else "N" * self.num_layers

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        problems: list[str] = []
        heads, groups, hidden = self.num_attention_heads, self.num_query_groups, self.hidden_size
        if heads % groups:
            choices = ", ".join(map(str, _divisors(heads)))
            problems.append(f"num_attention_heads={heads} is not divisible by num_query_groups={groups}; "
                            f"set model.num_query_groups to one of {choices}")
        if hidden % heads:
            fixes = " or ".join(f"model.hidden_size={h}" for h in _nearest_multiples(hidden, heads))
            problems.append(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}; "
                            f"set {fixes}")
        elif (hidden // heads) % 2:
            fixes = " or ".join(f"model.hidden_size={h}" for h in _nearest_multiples(hidden, 2 * heads))
            problems.append(f"head_dim = hidden_size/num_attention_heads = {hidden}/{heads} = "
                            f"{hidden // heads} must be even for rotary embeddings; set {fixes}")
        pattern = self.layer_pattern
        if pattern is not None:
            bad = sorted(set(pattern) - set(LAYER_KINDS))
            if bad:
                problems.append(f"layer_pattern={pattern!r} has {', '.join(map(repr, bad))}; use only "
                                f"'N' (softmax layer), 'L' (linear-attention layer), 'D' (Gated "
                                f"DeltaNet layer) and 'K' (Kimi Delta Attention layer), e.g. "
                                f"model.layer_pattern={'N' * self.num_layers}")
            elif len(pattern) != self.num_layers:
                problems.append(f"layer_pattern={pattern!r} has {len(pattern)} layers but "
                                f"num_layers={self.num_layers}; set model.num_layers={len(pattern)} "
                                f"or give model.layer_pattern {self.num_layers} characters")
        if self.offload_activations and self.recompute != "full":
            problems.append(f"offload_activations=true with recompute={self.recompute}: offloading moves the "
                            "layer inputs that full recomputation keeps; set model.recompute=full "
                            "or model.offload_activations=false")
        _fail(problems)
        return self


class ParallelConfig(_Section):
    section_key: ClassVar[str] = "parallel"
    world_size: PosInt | None = None  # None: dp * cp * tp + attention_servers
    dp: PosInt = 1
    cp: PosInt = 2
    ulysses: PosInt = 1
    ring: PosInt | None = None
    attention_servers: NonNegInt = 0
    tp: PosInt = 1  # megatron tensor parallelism inside each cp rank (innermost: one node)
    sequence_parallel: bool = True  # with tp > 1: norms and residuals on 1/tp of the tokens
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> "ParallelConfig":
        problems: list[str] = []
        cp, u = self.cp, self.ulysses
        if cp % u:
            choices = ", ".join(map(str, _divisors(cp)))
            problems.append(f"cp={cp} is not a multiple of ulysses={u}; "
                            f"set parallel.ulysses to a divisor of {cp}: {choices}")
        elif self.ring is None:
            self.ring = cp // u
            # Derived, not chosen: keep it out of fields_set so later checks can tell.
            self.model_fields_set.discard("ring")
        elif u * self.ring != cp:
            problems.append(f"cp={cp} but ulysses*ring = {u}*{self.ring} = {u * self.ring}; "
                            f"set parallel.ring={cp // u} (or leave parallel.ring unset to derive it)")
        used = self.dp * cp * self.tp + self.attention_servers
        if self.world_size is None:
            self.world_size = used
            self.model_fields_set.discard("world_size")  # derived, not chosen
        elif used != self.world_size:
            fixes = []
            trainers = self.world_size - self.attention_servers
            if trainers > 0 and trainers % (cp * self.tp) == 0:
                fixes.append(f"parallel.dp={trainers // (cp * self.tp)}")
            fixes.append(f"parallel.world_size={used}")
            tp = f"*{self.tp}" if self.tp > 1 else ""
            problems.append(f"world_size={self.world_size} but dp*cp{'*tp' if tp else ''} + attention_servers = "
                            f"{self.dp}*{cp}{tp} + {self.attention_servers} = {used}; set {' or '.join(fixes)}")
        _fail(problems)
        return self


class AttentionConfig(_Section):
    section_key: ClassVar[str] = "attention"
    scheme: SchemeName = "ring"
    layout: LayoutName = "zigzag"
    dkv_dtype: Literal["fp32", "input"] = "fp32"
    allgather_head_stride: PosInt | None = None
    linear_scheme: LinearSchemeName = "lasp2"
    # per-rank speed weights for layout "weighted" (schemes ring, allgather, hetero)
    layout_weights: list[PosFloat] | None = None
    # scheme hetero: per-head block-sparse pattern (local window + per-head vertical stride)
    hetero_block: PosInt = 64
    hetero_local_blocks: PosInt = 2
    hetero_stride: PosInt = 4
    hetero_head_step: PosInt | None = None
    hetero_offset: NonNegInt = 0
    hetero_dense_heads: NonNegInt = 0
    hetero_gqa: Literal["kv", "q"] = "kv"
    hetero_allow_partial_coverage: bool = False
    hetero_dense_every: NonNegInt = 0
    # scheme cad: core attention disaggregation (colocated: every cp rank also serves attention)
    cad_tolerance: NonNegFloat = 0.05
    cad_min_shard: PosInt = 128
    cad_linear_cost: NonNegFloat = 0.0
    cad_token_cost: NonNegFloat = 0.0
    cad_pingpong: bool = False


class DataConfig(_Section):
    section_key: ClassVar[str] = "data"
    source: DataSource = "stdlib"
    path: str | None = None
    seq_len: PosInt = 2048
    micro_batch_size: PosInt = 1
    synthetic_task: Literal["needle", "recall"] = "recall"
    jsonl_field: str = "text"
    # which labels the loss counts: all, or only a synthetic task's answer tokens (a strong, sparse signal)
    loss_on: Literal["all", "answers"] = "all"
    # text sources: token ids from this tokenizer (a Hugging Face model directory or tokenizer.json);
    # None: UTF-8 bytes
    tokenizer: str | None = None
    balance: Literal["tokens", "attention"] = "tokens"
    balance_max_defer: NonNegInt = 0

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.loss_on == "answers" and self.source != "synthetic":
            _fail([f"loss_on=answers needs answer tokens, which only data.source=synthetic marks; got "
                   f"source={self.source!r}; set data.loss_on=all"])
        if self.source in ("text_dir", "jsonl", "megatron") and not self.path:
            what = {"text_dir": "a directory of .txt files", "jsonl": "a .jsonl file",
                    "megatron": "a Megatron .bin/.idx path prefix (no extension)"}[self.source]
            _fail([f"source={self.source!r} reads files; set data.path to {what}, "
                   f"or use data.source=stdlib or data.source=synthetic"])
        return self


class TrainConfig(_Section):
    section_key: ClassVar[str] = "train"
    steps: PosInt = 150
    grad_accum: PosInt = 1
    lr: PosFloat = 2e-3
    min_lr: NonNegFloat = 2e-4
    warmup_steps: NonNegInt | None = None  # None: min(10, steps // 2)
    weight_decay: NonNegFloat = 0.1
    grad_clip: NonNegFloat = 1.0  # 0 turns clipping off
    zero_stage: Literal[0, 1, 2] = 0
    # none: every trainer rank holds all parameters; fsdp: parameters, gradients and AdamW state sharded
    # over the dp x cp trainer ranks (FSDP2), gathered per layer when it runs
    shard: Literal["none", "fsdp"] = "none"
    log_every: PosInt = 10
    ckpt_every: NonNegInt = 50  # 0: no periodic checkpoints
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    wsd_decay_fraction: Annotated[float, BeforeValidator(_reject_bool), Field(gt=0, le=1)] = 0.2
    adam_beta1: Annotated[float, BeforeValidator(_reject_bool), Field(ge=0, lt=1)] = 0.9
    adam_beta2: Annotated[float, BeforeValidator(_reject_bool), Field(ge=0, lt=1)] = 0.95
    adam_eps: PosFloat = 1e-8
    tensorboard: bool = True
    logger: Literal["none", "wandb", "mlflow"] = "none"  # one more logger beside TensorBoard (rank 0)
    comm_timeout_s: PosInt = 300  # a collective blocked this long fails instead of hanging
    eval_every: NonNegInt = 0  # validation loss on eval.val_sequences held-out sequences every N steps (0: never)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        problems: list[str] = []
        if self.lr < self.min_lr:
            problems.append(f"lr={self.lr} is below min_lr={self.min_lr}; "
                            f"set train.min_lr <= {self.lr} or train.lr >= {self.min_lr}")
        if self.logger != "none":
            import importlib.util
            if importlib.util.find_spec(self.logger) is None:
                problems.append(f"logger={self.logger} needs the {self.logger} package, which is not "
                                f"installed; `pip install {self.logger}` or set train.logger=none")
        if self.warmup_steps is None:  # the default: 10 steps, or half of a shorter run
            self.warmup_steps = min(DEFAULT_WARMUP_STEPS, self.steps // 2)
            self.model_fields_set.discard("warmup_steps")
        elif self.warmup_steps > self.steps:
            problems.append(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}; "
                            f"set train.warmup_steps <= {self.steps} or train.steps >= {self.warmup_steps}, "
                            f"or leave train.warmup_steps unset (null) for min({DEFAULT_WARMUP_STEPS}, steps/2)")
        _fail(problems)
        return self


class EvalConfig(_Section):
    """`distattn eval` and the validation loss of `train.eval_every` (see distattn.eval)."""

    section_key: ClassVar[str] = "eval"
    checkpoint: str | None = None  # what to evaluate (default: the run's latest checkpoint, else model.init_from)
    task: Literal["needle", "recall"] = "needle"  # the retrieval probe of the heatmap
    lengths: list[PosInt] = Field(default_factory=lambda: [1024, 2048, 4096])  # context lengths of the heatmap
    depths: list[Annotated[float, BeforeValidator(_reject_bool), Field(ge=0, le=1)]] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # where the answer sits (0: start, 1: end)
    trials: PosInt = 4  # probes per (length, depth) cell
    curve_data: Literal["task", "data"] = "task"  # loss by position on probe-task documents or data.*
    curve_length: PosInt | None = None  # None: data.seq_len
    curve_sequences: PosInt = 4
    buckets: PosInt = 16  # position buckets of the loss curve
    val_sequences: PosInt = 2  # held-out sequences of data.seq_len per train.eval_every
    out_dir: str | None = None  # None: <run.output_dir>/eval
    seed: AnyInt = 4242  # probes and held-out documents (training uses run.seed)

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        problems = []
        short = [x for x in self.lengths if x < MIN_PROBE_LENGTH]
        if short:
            problems.append(f"lengths={self.lengths} has {short}: a probe needs at least {MIN_PROBE_LENGTH} "
                            f"tokens; drop them from eval.lengths")
        if not self.lengths or not self.depths:
            problems.append("lengths and depths must not be empty; e.g. eval.lengths=[1024,2048] "
                            "eval.depths=[0.0,0.5,1.0]")
        if self.curve_length is not None and self.buckets > self.curve_length:
            problems.append(f"buckets={self.buckets} exceeds curve_length={self.curve_length}; set eval.buckets "
                            f"<= {self.curve_length}")
        _fail(problems)
        return self


MIN_PROBE_LENGTH = 128


class LaunchConfig(_Section):
    """How `distattn train` places its ranks on a Ray cluster (ignored by --launcher local/torchrun)."""

    section_key: ClassVar[str] = "launch"
    engine: Literal[ENGINES] = "actors"
    cpus_per_worker: PosFloat = 1.0
    gpus_per_worker: NonNegInt | None = None  # None: 1 when the cluster has GPUs, else 0
    placement: Literal[PLACEMENTS] = "PACK"
    nodes: NonNegInt = 0  # 0: wherever placement puts them; N: exactly N nodes, world_size/N each
    max_failures: Annotated[int, Strict(), Field(ge=-1)] = 0  # -1: unlimited restarts
    start_timeout_s: PosInt = 60  # resources must be granted and ranks up within this

    @model_validator(mode="after")
    def _check(self) -> "LaunchConfig":
        if self.nodes > 1 and self.placement == "STRICT_PACK":
            _fail([f"placement=STRICT_PACK keeps every rank on one node, but nodes={self.nodes}; "
                   f"set launch.nodes=1 (or 0) or launch.placement=PACK"])
        return self


class BenchConfig(_Section):
    section_key: ClassVar[str] = "bench"
    seq_len: PosInt = 4096
    heads: PosInt = 8
    kv_heads: PosInt = 8
    head_dim: PosInt = 64
    dtype: DType = "fp32"
    # our schemes, "usp:U" for USP with ulysses degree U, and peers in the same run
    schemes: list[str] = Field(default_factory=lambda: ["ring", "allgather", "ulysses"])
    iters: PosInt = 3
    warmup: NonNegInt = 1
    causal: bool = True
    world_size: PosInt = 2
    doc_lens: list[PosInt] | None = None

    @model_validator(mode="after")
    def _check(self) -> "BenchConfig":
        problems: list[str] = []
        for i, full in enumerate(self.schemes):
            name, _, layout = full.partition("@")
            base, _, degree = name.partition(":")
            ok = ((name in SCHEMES or name in BENCH_PEERS
                   or (base == "usp" and degree.isdigit() and int(degree) >= 1))
                  and (not layout or layout in LAYOUTS))
            if not ok:
                problems.append(f"bench.schemes[{i}]: {full!r} is not a scheme; choose from "
                                f"{', '.join(SCHEMES + BENCH_PEERS)}, usp:U (ulysses degree U), optionally "
                                f"with @LAYOUT ({', '.join(LAYOUTS)})"
                                f"{_did_you_mean(full, SCHEMES + BENCH_PEERS)}")
        if self.heads % self.kv_heads:
            choices = ", ".join(map(str, _divisors(self.heads)))
            problems.append(f"heads={self.heads} is not divisible by kv_heads={self.kv_heads}; "
                            f"set bench.kv_heads to one of {choices}")
        if "ulysses" in self.schemes and self.heads % self.world_size:
            problems.append(f"schemes includes ulysses, which needs heads % world_size == 0: "
                            f"{self.heads} heads, world_size={self.world_size}; set bench.heads to a "
                            f"multiple of {self.world_size} or drop ulysses from bench.schemes")
        if self.doc_lens is not None and sum(self.doc_lens) != self.seq_len:
            total = sum(self.doc_lens)
            problems.append(f"doc_lens sum to {total} but seq_len={self.seq_len}; make bench.doc_lens "
                            f"add up to {self.seq_len} or set bench.seq_len={total}")
        _fail(problems)
        return self


DEFAULT_WARMUP_STEPS = 10


def config_notes(cfg: "Config") -> list[str]:
    """What the config derived that a user may not expect (printed by `distattn train`)."""
    notes = []
    t = cfg.train
    if "warmup_steps" not in t.model_fields_set and t.warmup_steps < DEFAULT_WARMUP_STEPS:
        notes.append(f"train.warmup_steps: {t.warmup_steps} (the default {DEFAULT_WARMUP_STEPS} is cut to half "
                     f"of train.steps={t.steps}); set train.warmup_steps to choose")
    return notes


def _largest_divisor_dividing(cp: int, heads: int) -> int:
    return max(d for d in _divisors(cp) if heads % d == 0)


class Config(_Section):
    """One training / benchmark job. All sections have working defaults."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        problems: list[str] = []
        par, scheme, heads = self.parallel, self.attention.scheme, self.model.num_attention_heads
        if scheme == "ulysses":
            if par.ulysses == 1 and "ring" not in par.model_fields_set:
                # Plain ulysses splits all of cp by heads: with ulysses left at 1 and
                # ring not chosen (derived), fill that in rather than error.
                self.parallel = par = par.model_copy(update={"ulysses": par.cp, "ring": 1})
            if par.ulysses != par.cp:
                problems.append(f"attention.scheme: ulysses needs parallel.ulysses == parallel.cp, got "
                                f"ulysses={par.ulysses}, cp={par.cp}; set parallel.ulysses={par.cp} "
                                f"and parallel.ring=1, or use scheme usp for ulysses x ring")
            elif heads % par.ulysses:
                problems.append(self._heads_problem("ulysses", heads, par.ulysses, par.cp))
        elif scheme == "usp" and heads % par.ulysses:
            problems.append(self._heads_problem("usp", heads, par.ulysses, par.cp))
        elif scheme in ("ring", "allgather", "hetero") and par.ulysses > 1:
            problems.append(f"attention.scheme: {scheme} does not split heads, but parallel.ulysses="
                            f"{par.ulysses}; use scheme usp (ulysses={par.ulysses}, ring={par.ring}) "
                            f"or set parallel.ulysses=1")
        if scheme == "cad" and "layout" not in self.attention.model_fields_set:
            # cad's token owners keep documents whole: its own default, not the ring's zigzag
            self.attention = self.attention.model_copy(update={"layout": "contiguous"})
        problems.extend(attention_problems(self.attention, self.model, par))
        problems.extend(tp_problems(self))
        if par.attention_servers > 0 and scheme != "cad":
            problems.append(f"parallel.attention_servers={par.attention_servers} needs attention.scheme "
                            f"cad, got {scheme!r}; set attention.scheme=cad or parallel.attention_servers=0")
        if par.attention_servers > 0 and par.attention_servers % par.dp:
            problems.append(f"parallel.attention_servers={par.attention_servers} is split in equal blocks "
                            f"over the dp groups, but parallel.dp={par.dp} does not divide it; set "
                            f"parallel.attention_servers to a multiple of {par.dp}")
        if par.attention_servers > 0 and self.train.zero_stage > 0:
            problems.append(f"parallel.attention_servers={par.attention_servers} with "
                            f"train.zero_stage={self.train.zero_stage}: DeepSpeed would include the servers "
                            f"in its groups; set train.zero_stage=0 or parallel.attention_servers=0")
        if self.train.shard == "fsdp" and self.train.zero_stage > 0:
            problems.append(f"train.shard=fsdp and train.zero_stage={self.train.zero_stage} both shard the "
                            f"optimizer state; choose one: train.zero_stage=0 (FSDP shards parameters too) or "
                            f"train.shard=none")
        if self.train.shard == "fsdp" and par.attention_servers > 0:
            problems.append(f"train.shard=fsdp with parallel.attention_servers={par.attention_servers}: servers "
                            f"hold no parameters to shard; set train.shard=none or parallel.attention_servers=0")
        nodes = self.launch.nodes
        if nodes and par.world_size % nodes:
            fits = ", ".join(str(d) for d in _divisors(par.world_size))
            problems.append(f"launch.nodes={nodes} cannot hold world_size={par.world_size} ranks evenly; "
                            f"set launch.nodes to one of {fits} (or 0 to let placement decide)")
        if self.launch.engine == "ray_train" and par.attention_servers:
            problems.append(f"launch.engine=ray_train runs one uniform worker group, but "
                            f"parallel.attention_servers={par.attention_servers} needs a separate server "
                            f"role; set launch.engine=actors")
        _fail(problems)
        return self

    @staticmethod
    def _heads_problem(scheme: str, heads: int, ulysses: int, cp: int) -> str:
        best = _largest_divisor_dividing(cp, heads)
        if best > 1:
            fix = (f"use scheme usp with ulysses={best} "
                   f"(parallel.ulysses={best}, parallel.ring={cp // best})")
        else:
            fix = "use scheme ring (parallel.ulysses=1)"
        return (f"attention.scheme: {scheme} needs heads % ulysses == 0: {heads} heads, ulysses={ulysses}; "
                f"{fix}, or set model.num_attention_heads to a multiple of {ulysses}")

    def to_yaml(self) -> str:
        """The fully resolved job (derived values included), loadable by `load_config`."""
        return yaml.safe_dump(self.model_dump(mode="python"), sort_keys=False, default_flow_style=None)
