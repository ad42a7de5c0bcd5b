"""Hybrid models (LASP-2H style): linear and softmax layers sharing ONE token layout.

A hybrid stack (e.g. "LLLN": three linear-attention layers, then a softmax
layer) keeps the residual stream sharded once; every layer must therefore
expect the same tokens on every rank. `HybridSpec` builds both schemes with the
same `layout_name` and refuses combinations whose layouts differ:

    spec = HybridSpec(linear="lasp2", softmax="allgather", layout="zigzag")
    spec.scheme_for("linear")   # Lasp2(layout_name='zigzag', ...)
    spec.scheme_for("N")        # AllGather(layout_name='zigzag', ...)
    spec.check(n_tokens=4096, world=4, cu_seqlens=cu)  # the realised layouts agree token for token

lasp2 works under every layout (each run is a chunk with its own prefix), so
the softmax side decides: zigzag or doc_zigzag balance causal softmax cost.
lasp1 only runs on the contiguous layout.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from distattn.layout import LAYOUTS
from distattn.schemes.base import Scheme, get_scheme

KIND_ALIASES = {"linear": "linear", "L": "linear", "softmax": "softmax", "N": "softmax"}


def _build(what: str, scheme: "str | Scheme", kind: str, layout: str, options: dict[str, Any]) -> Scheme:
    if isinstance(scheme, Scheme):
        if options:
            raise ValueError(f"HybridSpec {what}_options given with an already configured {what} "
                             f"scheme {scheme!r}; put the options on the scheme instead")
        obj = scheme
        got = getattr(obj, "layout_name", None)
        if got != layout:
            raise ValueError(f"HybridSpec: the {what} scheme {obj!r} uses layout {got!r} but the "
                             f"hybrid layout is {layout!r}; every layer must see the same tokens, so "
                             f"build it with layout_name={layout!r} (or pass its name as a string)")
    else:
        if not isinstance(scheme, str):
            raise ValueError(f"HybridSpec {what} must be a scheme name or a Scheme, got {scheme!r}")
        if scheme == "local" and kind == "linear":
            from distattn.schemes.lasp2 import LinearLocal
            obj = LinearLocal(layout_name=layout, **options)
        else:
            cls_opts = dict(options)
            cls_opts.setdefault("layout_name", layout)
            if cls_opts["layout_name"] != layout:
                raise ValueError(f"HybridSpec {what}_options sets layout_name="
                                 f"{cls_opts['layout_name']!r} but the hybrid layout is {layout!r}")
            try:
                obj = get_scheme(scheme, **cls_opts)
            except ValueError as e:
                if "has no option" in str(e) and "layout_name" in str(e):
                    raise ValueError(f"HybridSpec: {what} scheme {scheme!r} has no layout_name option, "
                                     f"so it cannot share the hybrid layout {layout!r}") from None
                raise
    if obj.kind != kind:
        raise ValueError(f"HybridSpec {what}={getattr(obj, 'name', obj)!r} is a {obj.kind} scheme; "
                         f"the {what} side needs a {kind} scheme")
    return obj


@dataclass
class HybridSpec:
    """Schemes for the linear ('L') and softmax ('N') layers of one model, on one layout."""

    linear: "str | Scheme" = "lasp2"
    softmax: "str | Scheme" = "allgather"
    layout: str = "zigzag"
    linear_options: dict[str, Any] = field(default_factory=dict)
    softmax_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"HybridSpec layout must be one of {sorted(LAYOUTS)}, got {self.layout!r}")
        self._schemes = {
            "linear": _build("linear", self.linear, "linear", self.layout, dict(self.linear_options)),
            "softmax": _build("softmax", self.softmax, "softmax", self.layout, dict(self.softmax_options)),
        }

    def scheme_for(self, kind: str) -> Scheme:
        """The configured scheme of a layer kind: "linear"/"L" or "softmax"/"N"."""
        key = KIND_ALIASES.get(kind)
        if key is None:
            raise ValueError(f"layer kind must be one of {sorted(KIND_ALIASES)}, got {kind!r}")
        return self._schemes[key]

    def for_pattern(self, pattern: str) -> list[Scheme]:
        """One scheme per layer of a pattern such as "LLLN" (the objects are shared, not copied)."""
        bad = sorted({c for c in pattern if c not in "LN"})
        if not pattern or bad:
            raise ValueError(f"layer pattern must be a non-empty string of 'L' (linear) and 'N' "
                             f"(softmax), got {pattern!r}")
        return [self.scheme_for(c) for c in pattern]

    def check(self, n_tokens: int, world: int, cu_seqlens=None) -> None:
        """Raise if the two schemes would place any token on different ranks for this sequence.

        Catches schemes whose realised layout is not the named one (e.g. usp with
        ulysses > 1 reorders ranks); call once per sequence shape at set-up time.
        """
        lin = self._schemes["linear"].layout(n_tokens, world, cu_seqlens)
        soft = self._schemes["softmax"].layout(n_tokens, world, cu_seqlens)
        for r in range(world):
            if lin.ranges(r) != soft.ranges(r):
                raise ValueError(f"HybridSpec: rank {r} would hold {lin.ranges(r)} in linear layers "
                                 f"but {soft.ranges(r)} in softmax layers ({self._schemes['softmax']!r}); "
                                 f"choose a softmax scheme that uses the plain {self.layout!r} layout")

    def __repr__(self) -> str:
        return (f"HybridSpec(linear={self._schemes['linear']!r}, softmax={self._schemes['softmax']!r}, "
                f"layout={self.layout!r})")

    def replace(self, **changes) -> "HybridSpec":
        return dataclasses.replace(self, **changes)
