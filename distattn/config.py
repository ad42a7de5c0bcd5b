"""Typed job configuration: pydantic models, YAML load/save, `a.b=c` overrides.

Every problem is reported as a `ConfigError` whose lines each name the dotted
key, the offending value and what would work, so a bad job fails at load time
with a fix in hand instead of deep inside a kernel or a collective.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Iterable, Literal, Sequence, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, model_validator

SCHEMES = ("ring", "allgather", "ulysses", "usp", "lasp2", "lasp1", "local", "cad", "hetero")
LAYOUTS = ("zigzag", "contiguous", "doc_zigzag", "weighted")
LINEAR_SCHEMES = ("lasp2", "lasp1", "local")
BENCH_PEERS = ("ring-unbalanced", "deepspeed-ulysses")
DATA_SOURCES = ("stdlib", "text_dir", "jsonl", "megatron", "synthetic")
LAYER_KINDS = "NL"  # N: softmax attention layer, L: linear attention layer
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
ENGINES = ("actors", "ray_train")

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"

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


class ConfigError(ValueError):
    """A config that cannot run; `problems` holds one self-contained line each."""

    def __init__(self, problems: str | Sequence[str], source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        if self.source is None:
            return "\n".join(self.problems)
        if len(self.problems) == 1:
            return f"{self.source}: {self.problems[0]}"
        return f"{self.source}:\n" + "\n".join(f"  - {p}" for p in self.problems)


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


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nearest_multiples(n: int, m: int) -> list[int]:
    lo = (n // m) * m
    return [x for x in (lo, lo + m) if x > 0]


class RunConfig(_Section):
    section_key: ClassVar[str] = "run"
    name: str = "default"
    output_dir: str = "runs/default"
    seed: AnyInt = 1234


class ModelConfig(_Section):
    section_key: ClassVar[str] = "model"
    num_layers: PosInt = 2
    hidden_size: PosInt = 128
    num_attention_heads: PosInt = 8
    num_query_groups: PosInt = 2
    ffn_hidden_size: PosInt = 512
    vocab_size: PosInt = 256
    layer_pattern: str | None = None
    rope_base: PosFloat = 10000.0
    dtype: DType = "fp32"
    # activation recomputation: none | selective (layers re-run, core attention kept) | full
    recompute: Literal["none", "selective", "full"] = "none"
    # GPU runs: keep saved activations in pinned host memory (CPU runs: a logged no-op)
    offload_activations: bool = False

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
                                f"'N' (softmax layer) and 'L' (linear-attention layer), e.g. "
                                f"model.layer_pattern={'N' * self.num_layers}")
            elif len(pattern) != self.num_layers:
                problems.append(f"layer_pattern={pattern!r} has {len(pattern)} layers but "
                                f"num_layers={self.num_layers}; set model.num_layers={len(pattern)} "
                                f"or give model.layer_pattern {self.num_layers} characters")
        _fail(problems)
        return self


class ParallelConfig(_Section):
    section_key: ClassVar[str] = "parallel"
    world_size: PosInt = 2
    dp: PosInt = 1
    cp: PosInt = 2
    ulysses: PosInt = 1
    ring: PosInt | None = None
    attention_servers: NonNegInt = 0
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
        used = self.dp * cp + self.attention_servers
        if used != self.world_size:
            fixes = []
            trainers = self.world_size - self.attention_servers
            if trainers > 0 and trainers % cp == 0:
                fixes.append(f"parallel.dp={trainers // cp}")
            fixes.append(f"parallel.world_size={used}")
            problems.append(f"world_size={self.world_size} but dp*cp + attention_servers = "
                            f"{self.dp}*{cp} + {self.attention_servers} = {used}; set {' or '.join(fixes)}")
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
    balance: Literal["tokens", "attention"] = "tokens"
    balance_max_defer: NonNegInt = 0

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
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
    warmup_steps: NonNegInt = 10
    weight_decay: NonNegFloat = 0.1
    grad_clip: NonNegFloat = 1.0  # 0 turns clipping off
    zero_stage: Literal[0, 1, 2] = 0
    log_every: PosInt = 10
    ckpt_every: NonNegInt = 50  # 0: no periodic checkpoints
    tensorboard: bool = True
    comm_timeout_s: PosInt = 300  # a collective blocked this long fails instead of hanging

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        problems: list[str] = []
        if self.lr < self.min_lr:
            problems.append(f"lr={self.lr} is below min_lr={self.min_lr}; "
                            f"set train.min_lr <= {self.lr} or train.lr >= {self.min_lr}")
        if self.warmup_steps > self.steps:
            problems.append(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}; "
                            f"set train.warmup_steps <= {self.steps} or train.steps >= {self.warmup_steps}")
        _fail(problems)
        return self


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


WEIGHTED_SCHEMES = ("ring", "allgather", "hetero", "lasp2", "lasp1")  # lasp*: layout via allgather


def _attention_problems(a: AttentionConfig, model: ModelConfig, par: ParallelConfig) -> list[str]:
    """Layout weights and the hetero pattern: checks that need the model and parallel sections."""
    problems: list[str] = []
    w = a.layout_weights
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
        problems.extend(_attention_problems(self.attention, self.model, par))
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


# --- turning pydantic errors into messages ---------------------------------------

_NOUNS = {"schemes": "scheme", "source": "data source", "zero_stage": "ZeRO stage"}


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _annotation_at(loc: Sequence[str | int]) -> Any:
    ann: Any = Config
    for part in loc:
        if isinstance(part, int):
            args = get_args(ann)
            ann = next((a for a in args if get_origin(a) is list), ann)
            ann = get_args(ann)[0] if get_origin(ann) is list else ann
            continue
        model = _model_of(ann)
        if model is None or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
    return ann


def _literal_values(ann: Any) -> list[Any]:
    if get_origin(ann) is Literal:
        return list(get_args(ann))
    for arg in get_args(ann):
        found = _literal_values(arg)
        if found:
            return found
    return []


def _did_you_mean(value: Any, options: Iterable[Any]) -> str:
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            type(None): "nothing"}.get(type(value), type(value).__name__)


_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string (quote it in YAML)",
    "list_type": "a list", "model_type": None, "model_attributes_type": None, "dict_type": None,
}


def _describe_one(err: dict[str, Any], loc: tuple[str | int, ...]) -> list[str]:
    key, kind, value = _dotted(loc), err["type"], err.get("input")
    where = f"{key}: " if key else ""
    if kind == "value_error":
        cause = err["ctx"]["error"]
        if isinstance(cause, ConfigError):  # a nested section already named its keys
            return list(cause.problems)
        return [f"{where}{line}" for line in str(cause).splitlines()]
    if kind == "literal_error":
        allowed = _literal_values(_annotation_at(loc))
        field = next((p for p in reversed(loc) if isinstance(p, str)), "value")
        noun = _NOUNS.get(field, field.replace("_", " "))
        choices = ", ".join(map(str, allowed)) if allowed else err["ctx"]["expected"]
        return [f"{where}{value!r} is not a {noun}; choose one of {choices}"
                + _did_you_mean(value, allowed)]
    if kind == "extra_forbidden":
        parent = _model_of(_annotation_at(loc[:-1]))
        valid = list(parent.model_fields) if parent else []
        name = loc[-1]
        if len(loc) == 1:
            return [f"{name}: unknown section{_did_you_mean(name, valid)}; "
                    f"valid sections are {', '.join(valid)}"]
        return [f"{key}: unknown key{_did_you_mean(name, valid)}; "
                f"valid keys of {_dotted(loc[:-1])} are {', '.join(valid)}"]
    if kind in ("greater_than_equal", "greater_than"):
        op = ">=" if kind == "greater_than_equal" else ">"
        bound = err["ctx"]["ge" if op == ">=" else "gt"]
        return [f"{where}must be {op} {bound}, got {value!r}"]
    if kind in _EXPECTED:
        expected = _EXPECTED[kind]
        if expected is None:
            model = _model_of(_annotation_at(loc))
            keys = ", ".join(model.model_fields) if model else ""
            expected = f"a mapping with keys from {keys}"
        return [f"{where}expected {expected}, got {_type_name(value)} {value!r}"]
    return [f"{where}{err['msg']}, got {value!r}"]


def _describe(err: ValidationError, prefix: tuple[str, ...] = ()) -> list[str]:
    problems: list[str] = []
    for item in err.errors(include_url=False):
        problems.extend(_describe_one(item, prefix + tuple(item["loc"])))
    return problems


# --- files and overrides ---------------------------------------------------------

def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError("no such config file", source=str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {err}", source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of sections ({', '.join(Config.model_fields)}), "
                          f"got {_type_name(data)}", source=str(path))
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"section names must be strings, got {bad!r}; valid sections are "
                          f"{', '.join(Config.model_fields)}", source=str(path))
    # An empty section (`model:` with nothing under it) means "all defaults".
    return {k: ({} if v is None else v) for k, v in data.items()}


_SECTIONS: dict[str, type[BaseModel]] = {
    name: f.annotation for name, f in Config.model_fields.items()  # type: ignore[misc]
}


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to raw config data (values parsed as YAML)."""
    if isinstance(overrides, str):
        overrides = [overrides]
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    sections = list(Config.model_fields)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. parallel.cp=4")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        section = parts[0]
        if section not in sections:
            raise ConfigError(f"override {item!r}: unknown section {section!r}"
                              f"{_did_you_mean(section, sections)}; "
                              f"valid sections are {', '.join(sections)}")
        fields = list(_SECTIONS[section].model_fields)
        if len(parts) != 2 or not parts[1]:
            raise ConfigError(f"override {item!r}: name one key, as {section}.KEY=VALUE; "
                              f"valid keys of {section} are {', '.join(fields)}")
        name = parts[1]
        if name not in fields:
            raise ConfigError(f"override {item!r}: {section}.{name} is an unknown key"
                              f"{_did_you_mean(name, fields)}; "
                              f"valid keys of {section} are {', '.join(fields)}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from None
        target = out.get(section)
        if not isinstance(target, dict):
            target = out[section] = {}
        target[name] = value
    return out


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML job (None: the shipped default job), apply overrides, validate.

    The defaults live in the models; `configs/default.yaml` mirrors them, so an
    install without the file still yields the same default job.
    """
    source: str | None = None
    data: dict[str, Any] = {}
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        source = str(path)
        data = _read_yaml(Path(path))
    data = apply_overrides(data, overrides)
    try:
        return Config.model_validate(data)
    except ConfigError as err:
        raise ConfigError(err.problems, source=source) from None


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config, so a run directory records exactly what ran."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cfg.to_yaml())
    return path


__all__ = [
    "AttentionConfig", "BenchConfig", "Config", "ConfigError", "DataConfig", "LaunchConfig", "ModelConfig",
    "ParallelConfig", "RunConfig", "TrainConfig", "DEFAULT_CONFIG_PATH", "SCHEMES", "LAYOUTS",
    "apply_overrides", "load_config", "save_config",
]
