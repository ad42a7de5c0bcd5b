"""`data.tokenizer: PATH`: a text source's documents as a pretrained model's token ids.

A model converted from Hugging Face reads token ids, not bytes. The text
sources (stdlib, text_dir, jsonl) still find and read the documents; each one
is decoded as UTF-8 and encoded with the tokenizer of PATH (a Hugging Face
model directory or its `tokenizer.json`), through the `tokenizers` library.
Packing needs every document's length before the first sample, so the corpus
is tokenized when the source is built and the ids kept (int32) in memory; for
corpora larger than memory, tokenize once into Megatron's `.bin/.idx` format and
use `data.source=megatron`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from distattn.train.sources import DataError, DocSource


def tokenizer_file(path: str | Path) -> Path:
    """The `tokenizer.json` of a model directory (or the file itself), or a DataError naming the path."""
    p = Path(path).expanduser()
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise DataError(f"data.tokenizer={path}: no tokenizer.json there; give a Hugging Face model directory "
                        f"with a fast tokenizer (tokenizer.json) or the file itself")
    return f


def load_tokenizer(path: str | Path):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError(f"data.tokenizer={path} needs the tokenizers package: pip install 'distattn[hf]'") from None
    f = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # the library's own parse errors
        raise DataError(f"data.tokenizer={path}: {f} could not be read as a tokenizer ({e})") from None


class TokenizedSource(DocSource):
    """The documents of a text source, tokenized; ids kept as int32."""

    kind = "tokenized"

    def __init__(self, inner: DocSource, tokenizer_path: str | Path, vocab_size: int | None = None):
        self.inner, self.tokenizer_path = inner, str(tokenizer_path)
        tok = load_tokenizer(tokenizer_path)
        texts = [bytes(inner[i]).decode("utf-8", errors="replace") for i in range(len(inner))]
        encoded = tok.encode_batch(texts, add_special_tokens=False)
        self._docs = [np.asarray(e.ids, dtype=np.int32) for e in encoded]
        keep = [i for i, d in enumerate(self._docs) if d.size]
        self._docs = [self._docs[i] for i in keep]
        self._names = [inner.name(i) for i in keep]
        if not self._docs:
            raise DataError(f"{inner.describe()} with data.tokenizer={tokenizer_path} gives no tokens")
        self._max_id = max(int(d.max()) for d in self._docs)
        if vocab_size is not None and self._max_id >= vocab_size:
            raise DataError(f"data.tokenizer={tokenizer_path} produces token id {self._max_id}, outside "
                            f"model.vocab_size={vocab_size}; set model.vocab_size={self._max_id + 1} or more "
                            f"(or use the tokenizer of the model being trained)")
        super().__init__(np.array([d.size for d in self._docs], dtype=np.int64), cache_bytes=0)

    def _load(self, i: int) -> np.ndarray:
        return self._docs[i].copy()

    def name(self, i: int) -> str:
        return self._names[i]

    def describe(self) -> str:
        return f"{self.inner.describe()} tokenized with {self.tokenizer_path}"

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "tokenizer": self.tokenizer_path}

    def vocab_needed(self) -> int:
        return self._max_id + 1


__all__ = ["TokenizedSource", "load_tokenizer", "tokenizer_file"]
