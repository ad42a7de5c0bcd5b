"""The scheme interface and registry.

A scheme is a way to compute exact attention when the sequence is split across
a context-parallel group: it chooses the token layout, moves what attention
needs through `distattn.comm`, and owns a hand-written backward. Schemes are
looked up by name (`get_scheme("usp", ulysses=2)`) so configs, benchmarks and
tests all reach the same code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.distributed as dist

from distattn.comm import Comm, CommLedger, default_ledger
from distattn.layout import Layout, Run, get_layout

_REGISTRY: dict[str, Callable[..., "Scheme"]] = {}


def register(name: str):
    """Class decorator: make a scheme constructible by name."""
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def scheme_names() -> list[str]:
    import distattn.schemes  # noqa: F401  (populates the registry)
    return sorted(_REGISTRY)


def get_scheme(scheme: "str | Scheme", **options) -> "Scheme":
    """A scheme object from a registered name (or pass one through unchanged)."""
    if isinstance(scheme, Scheme):
        if options:
            raise ValueError(f"options {sorted(options)} given with an already configured scheme {scheme!r}")
        return scheme
    names = scheme_names()
    if scheme not in _REGISTRY:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(names)}")
    cls = _REGISTRY[scheme]
    valid = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    bad = sorted(set(options) - valid)
    if bad:
        raise ValueError(f"scheme {scheme!r} has no option(s) {bad}; its options are {sorted(valid) or 'none'}")
    return cls(**options)


@dataclass(frozen=True)
class AttnShape:
    """What a scheme's traffic formula needs to know about one attention call."""

    n_tokens: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 4
    cu_seqlens: tuple[int, ...] | None = None


@dataclass
class CommVolume:
    """Analytic bytes SENT by one rank, per phase and op (the ledger's convention)."""

    fwd: dict[str, int] = field(default_factory=dict)
    bwd: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.fwd.values()) + sum(self.bwd.values())


def group_rank_size(group) -> tuple[int, int]:
    """(rank, size) in `group`; (0, 1) when running without torch.distributed."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shift_runs(runs: list[Run], offset: int) -> list[Run]:
    return [dataclasses.replace(r, local_start=r.local_start + offset) for r in runs]


def concat_runs(run_lists: list[list[Run]]) -> list[Run]:
    """Runs of a buffer made by concatenating several buffers in order."""
    out, off = [], 0
    for runs in run_lists:
        out.extend(shift_runs(runs, off))
        off += sum(r.length for r in runs)
    return out


class Scheme:
    """Base class: subclasses are dataclasses holding their options."""

    name: ClassVar[str] = "scheme"
    kind: ClassVar[str] = "softmax"   # "softmax" or "linear"
    default_layout: ClassVar[str] = "zigzag"

    # -- layout ---------------------------------------------------------------
    def layout(self, n_tokens: int, world: int, cu_seqlens=None) -> Layout:
        """The token layout this scheme expects its inputs in.

        Schemes with a `layout_weights` option (per-rank speed weights) pass it
        to the layout; only the "weighted" layout accepts weights.
        """
        name = getattr(self, "layout_name", None) or self.default_layout
        weights = getattr(self, "layout_weights", None)
        return get_layout(name, n_tokens, world, cu_seqlens,
                          weights=None if weights is None else tuple(weights))

    # -- checks ---------------------------------------------------------------
    def validate(self, *, heads: int, kv_heads: int, world: int) -> None:
        """Raise ValueError (with the numbers and a way out) if this setup cannot run."""
        if heads % kv_heads != 0:
            raise ValueError(f"GQA needs heads % kv_heads == 0: {heads} heads, {kv_heads} kv heads")

    # -- traffic --------------------------------------------------------------
    def comm_bytes(self, shape: AttnShape, world: int, rank: int = 0) -> CommVolume:
        raise NotImplementedError

    # -- compute --------------------------------------------------------------
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group,
                  cu_seqlens=None, causal: bool = True, softmax_scale: float | None = None,
                  ledger: CommLedger | None = None, n_tokens: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)) \
            if dataclasses.is_dataclass(self) else ""
        return f"{type(self).__name__}({opts})"


def make_comm(group, ledger: CommLedger | None) -> Comm:
    return Comm(group, ledger if ledger is not None else default_ledger())


def total_tokens(local_len: int, comm: Comm, n_tokens: int | None) -> int:
    """The global length N: given, or recovered by one all-reduce of local lengths.

    Every rank must agree on N to compute every other rank's layout, so a wrong
    local length is caught here with a clear error rather than in a collective.
    """
    if n_tokens is not None:
        return int(n_tokens)
    if comm.size == 1:
        return local_len
    t = torch.tensor([local_len], dtype=torch.long)
    comm.all_reduce(t, op="sum")
    return int(t.item())
