"""Head-heterogeneous block-sparse attention patterns (S2-Attention style).

Tokens are grouped into blocks of `block` tokens, counted from the start of
their document. Every *pattern head* p is either dense or sparse. A sparse head
lets query block i see key block j (same document, causal: j <= i) when

    i - j < local_blocks                                  (the local window,
                                                           diagonal included), or
    (j + p * head_step + offset) % stride == 0           (the vertical stride)

so each sparse head sees the local window plus one residue class of blocks
mod `stride`, and different heads see different classes. The residue
``(p * head_step + offset) % stride`` is the head's *class*; heads of the same
class have identical masks. Inside the diagonal block the usual token-level
causal mask applies. The last `dense_heads` pattern heads are dense (attend to
every earlier token of their document).

Coverage: the union over heads is the whole causal mask iff a dense head exists
or the sparse heads' classes are all `stride` residues. With `head_step=None`
the step is ``max(1, stride // n_sparse)`` (so n_sparse >= stride gives step 1
and full coverage). Patterns that leave blocks unseen are refused unless the
caller allows partial coverage explicitly.

GQA (`gqa_pattern`):
- ``"kv"`` (default): pattern heads are the KV heads; the query heads of a KV
  group share their group's pattern. A KV head is only ever read at its class's
  blocks, which is what lets a context-parallel scheme fetch a fraction of the
  K/V (and what a KV cache can exploit). Coverage needs >= `stride` sparse KV
  heads (or a dense one).
- ``"q"``: pattern heads are the query heads (finer; covers with fewer KV heads).
  A KV head is then needed at the union of its query heads' blocks, so the
  fetched K/V fraction is larger than the compute fraction.

Non-causal attention uses the same rule with a symmetric window
(|i - j| < local_blocks) and the vertical stride over all blocks.

Pure functions of the pattern and shapes; no communication.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GQA_PATTERNS = ("kv", "q")


def layer_is_dense(layer_idx: int, every: int) -> bool:
    """Whether 0-based layer `layer_idx` uses dense attention when dense layers come every `every`.

    ``every == 0`` means no dense layers; otherwise layers 0, every, 2*every, ... are dense.
    """
    if every < 0:
        raise ValueError(f"dense-layer period must be >= 0 (0: no dense layers), got {every}")
    return every > 0 and layer_idx % every == 0


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"hetero {name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class HeteroPattern:
    """The per-head block pattern; see the module docstring for the rule."""

    block: int = 64
    local_blocks: int = 2
    stride: int = 4
    head_step: int | None = None   # None: max(1, stride // number of sparse pattern heads)
    offset: int = 0
    dense_heads: int = 0
    gqa_pattern: str = "kv"

    def __post_init__(self):
        _check_int("block", self.block, 1)
        _check_int("local_blocks", self.local_blocks, 1)
        _check_int("stride", self.stride, 1)
        _check_int("offset", self.offset, 0)
        _check_int("dense_heads", self.dense_heads, 0)
        if self.head_step is not None:
            _check_int("head_step", self.head_step, 1)
        if self.gqa_pattern not in GQA_PATTERNS:
            raise ValueError(f"hetero gqa_pattern must be one of {GQA_PATTERNS}, got {self.gqa_pattern!r}")

    # -- heads ------------------------------------------------------------------
    def pattern_heads(self, heads: int, kv_heads: int) -> int:
        if heads < 1 or kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"GQA needs heads % kv_heads == 0: {heads} heads, {kv_heads} kv heads")
        return kv_heads if self.gqa_pattern == "kv" else heads

    def check_heads(self, heads: int, kv_heads: int) -> None:
        p = self.pattern_heads(heads, kv_heads)
        if self.dense_heads > p:
            what = "KV heads" if self.gqa_pattern == "kv" else "query heads"
            raise ValueError(f"hetero dense_heads={self.dense_heads} exceeds the {p} {what} that carry "
                             f"the pattern (gqa_pattern={self.gqa_pattern!r}); use dense_heads <= {p}")

    def step(self, heads: int, kv_heads: int) -> int:
        if self.head_step is not None:
            return self.head_step
        n_sparse = self.pattern_heads(heads, kv_heads) - self.dense_heads
        return max(1, self.stride // max(1, n_sparse))

    def pattern_classes(self, heads: int, kv_heads: int) -> list[int | None]:
        """Class of every pattern head: its stride residue, or None for a dense head."""
        self.check_heads(heads, kv_heads)
        p = self.pattern_heads(heads, kv_heads)
        step = self.step(heads, kv_heads)
        n_sparse = p - self.dense_heads
        return [(h * step + self.offset) % self.stride if h < n_sparse else None for h in range(p)]

    def head_classes(self, heads: int, kv_heads: int) -> list[int | None]:
        """Class of every query head (GQA resolved by `gqa_pattern`)."""
        cls = self.pattern_classes(heads, kv_heads)
        if self.gqa_pattern == "q":
            return cls
        rep = heads // kv_heads
        return [cls[h // rep] for h in range(heads)]

    # -- coverage ---------------------------------------------------------------
    def coverage_problem(self, heads: int, kv_heads: int) -> str | None:
        """None if the heads together see every causal block; otherwise why not and what to do."""
        cls = self.pattern_classes(heads, kv_heads)
        if any(c is None for c in cls):
            return None
        missing = sorted(set(range(self.stride)) - set(cls))
        if not missing:
            return None
        what = "KV heads" if self.gqa_pattern == "kv" else "query heads"
        seen = sorted(set(cls))
        fixes = [f"stride <= {len(cls)}" if len(cls) < self.stride else "head_step=1",
                 f">= {self.stride} sparse {what}", "dense_heads >= 1"]
        if self.gqa_pattern == "kv" and heads >= self.stride:
            fixes.append("gqa_pattern='q'")
        fixes.append("allow_partial_coverage=True to accept it")
        return (f"hetero pattern does not cover the causal context: {len(cls)} sparse {what} with "
                f"stride={self.stride}, head_step={self.step(heads, kv_heads)}, offset={self.offset} "
                f"see stride residues {seen}, so key blocks j with (j + r) % {self.stride} == 0 for "
                f"r in {missing} beyond the {self.local_blocks}-block local window are seen by no head; "
                f"use {', or '.join(fixes)}")

    def check_coverage(self, heads: int, kv_heads: int, allow_partial: bool = False) -> None:
        problem = self.coverage_problem(heads, kv_heads)
        if problem is not None and not allow_partial:
            raise ValueError(problem)

    # -- visibility -------------------------------------------------------------
    def strided(self, cls: int | None, block: int) -> bool:
        """Whether key block `block` is on the vertical stride of class `cls` (dense: always)."""
        return cls is None or (block + cls) % self.stride == 0

    def _class_block_mask(self, cls: int | None, n_blocks: int, causal: bool) -> torch.Tensor:
        i = torch.arange(n_blocks)[:, None]
        j = torch.arange(n_blocks)[None, :]
        if cls is None:
            vis = torch.ones(n_blocks, n_blocks, dtype=torch.bool)
        else:
            vis = ((i - j).abs() < self.local_blocks) | ((j + cls) % self.stride == 0)
        return vis & (j <= i) if causal else vis

    def block_mask(self, n_blocks: int, heads: int, kv_heads: int, causal: bool = True,
                   head_range: tuple[int, int] | None = None) -> torch.Tensor:
        """[h, n_blocks, n_blocks] bool: query head h's block may see key block j.

        `head_range=(h0, h1)` gives the masks of global query heads h0..h1-1 only
        (what a rank holding a slice of the heads, e.g. under tensor or Ulysses
        parallelism, computes); the pattern still uses global head indices.
        """
        classes = self.head_classes(heads, kv_heads)
        h0, h1 = (0, heads) if head_range is None else head_range
        if not 0 <= h0 < h1 <= heads:
            raise ValueError(f"head_range must satisfy 0 <= h0 < h1 <= {heads}, got {head_range}")
        cache: dict = {}
        masks = []
        for h in range(h0, h1):
            c = classes[h]
            if c not in cache:
                cache[c] = self._class_block_mask(c, n_blocks, causal)
            masks.append(cache[c])
        return torch.stack(masks)

    def token_mask(self, n_tokens: int, heads: int, kv_heads: int, cu_seqlens=None,
                   causal: bool = True, head_range: tuple[int, int] | None = None) -> torch.Tensor:
        """[h, T, T] bool: query token i of head h may see key token j (documents, causal, pattern)."""
        idx = torch.arange(n_tokens)
        cu = torch.tensor([0, n_tokens] if cu_seqlens is None else list(cu_seqlens), dtype=torch.long)
        doc = torch.searchsorted(cu[1:], idx, right=True)
        blk = (idx - cu[doc]) // self.block
        n_blocks = int(blk.max()) + 1 if n_tokens else 0
        bm = self.block_mask(n_blocks, heads, kv_heads, causal, head_range)  # [h, nb, nb]
        same = doc[:, None] == doc[None, :]
        if causal:
            same &= idx[None, :] <= idx[:, None]
        return bm[:, blk][:, :, blk] & same

    def density(self, n_tokens: int, heads: int, kv_heads: int, cu_seqlens=None,
                causal: bool = True) -> float:
        """Visible (head, query, key) pairs over those of dense attention with the same documents."""
        m = self.token_mask(n_tokens, heads, kv_heads, cu_seqlens, causal)
        dense = HeteroPattern(block=self.block, dense_heads=self.pattern_heads(heads, kv_heads),
                              gqa_pattern=self.gqa_pattern).token_mask(n_tokens, heads, kv_heads,
                                                                       cu_seqlens, causal)
        return float(m.sum()) / float(dense.sum())


def masked_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """Dense fp32 attention with an explicit per-head [H, T, T] mask (ground truth; O(T^2) memory).

    The same math as `reference.reference_attention`, with the mask given per
    head. Rows with no visible key give 0.
    """
    from distattn.kernels.reference import masked_attention
    return masked_attention(q, k, v, mask, softmax_scale)[0]


__all__ = ["GQA_PATTERNS", "HeteroPattern", "layer_is_dense", "masked_reference"]
