"""Training data from the config: document sources, packing, and the per-rank stream.

Text sources are byte-level (a document is its UTF-8 bytes, token ids 0..255);
Megatron datasets carry their tokenizer's ids, which ``model.vocab_size`` must
cover. Sources index their documents up front (lengths only) and read them
lazily, so start-up is fast even on large corpora:

- ``stdlib``    the Python standard library's ``*.py`` files (needs no download);
- ``text_dir``  every text file under a directory;
- ``jsonl``     one JSON object per line, text in a configurable field;
- ``megatron``  Megatron's indexed ``.bin/.idx`` format, read through megatron-core
  (any token ids below ``model.vocab_size``);
- ``synthetic`` long-context tasks (associative recall, needle) whose answer lies
  at least ``seq_len/2`` tokens back, so only attention across CP shards solves them.

Packing. Each epoch orders the documents by a permutation drawn from
``seed + epoch`` and concatenates them into one token stream. Sample ``i`` is
stream tokens ``[i*T, i*T + T + 1)``: ``tokens`` the first ``T``, ``labels`` the
last ``T`` (the next byte). A document cut at the end of a sample continues as a
new document at the start of the next one. ``loss_mask`` is 0 exactly where
the token is the last of its document (its label belongs to another document),
and ``cu_seqlens`` lists the document boundaries inside the sample.

Data parallelism. Sample ``i`` of that single stream goes to dp rank
``i % dp_size``; ranks skip the others' samples by arithmetic on document
lengths, never reading them. The stream position is a pure function of the
number of samples consumed by all ranks together, so a saved state is the same
on every rank and resumes exactly, even with a different ``dp_size``.

This module builds both from the config and keeps every public name importable
from one place; the sources live in ``sources``, ``megatron_source`` and
``synthetic``, the packing in ``stream``.
"""
from __future__ import annotations

from distattn.train.megatron_source import MegatronSource
from distattn.train.sources import (BYTE_VOCAB, TEXT_SUFFIXES, VOCAB_SIZE, DataError, DocSource, JsonlSource,
                                    ListSource, StdlibSource, TextDirSource)
from distattn.train.stream import STATE_VERSION, Batch, BatchStream
from distattn.train.synthetic import SyntheticSource

__all__ = [
    "BYTE_VOCAB", "VOCAB_SIZE", "STATE_VERSION", "TEXT_SUFFIXES", "DataError", "DocSource", "ListSource",
    "StdlibSource", "TextDirSource", "JsonlSource", "MegatronSource", "SyntheticSource", "Batch",
    "BatchStream", "build_source", "build_stream",
]

_PATH_NEEDS = {"text_dir": "a directory of text files", "jsonl": "a .jsonl file or a directory of them",
               "megatron": "a Megatron .bin/.idx path prefix, without the extension"}


def build_source(data_cfg, seed: int = 0, vocab_size: int = VOCAB_SIZE) -> DocSource:
    """The document source named by ``data.source`` (``seed`` only shapes synthetic documents;
    ``vocab_size``, the model's, bounds a Megatron dataset's token ids)."""
    kind = data_cfg.source
    if kind in _PATH_NEEDS and not data_cfg.path:
        raise DataError(f"data.path is required for data.source={kind}: set it to {_PATH_NEEDS[kind]}")
    text = None
    if kind == "stdlib":
        text = StdlibSource()
    elif kind == "text_dir":
        text = TextDirSource(data_cfg.path)
    elif kind == "jsonl":
        text = JsonlSource(data_cfg.path, field=getattr(data_cfg, "jsonl_field", "text"))
    tokenizer = getattr(data_cfg, "tokenizer", None)
    if text is not None:
        if tokenizer is None:
            return text
        from distattn.train.tokenized import TokenizedSource
        return TokenizedSource(text, tokenizer, vocab_size)
    if tokenizer is not None:
        raise DataError(f"data.tokenizer applies to text sources (stdlib, text_dir, jsonl); "
                        f"data.source={kind} holds {'token ids already' if kind == 'megatron' else 'bytes'}; "
                        f"set data.tokenizer=null")
    if kind == "megatron":
        return MegatronSource(data_cfg.path, vocab_size=vocab_size)
    if kind == "synthetic":
        return SyntheticSource(data_cfg.seq_len, task=data_cfg.synthetic_task, seed=seed)
    raise DataError(f"data.source={kind!r} is not a data source; choose one of stdlib, text_dir, jsonl, "
                    f"megatron, synthetic")


def build_stream(data_cfg, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 vocab_size: int = VOCAB_SIZE) -> BatchStream:
    """This dp rank's stream of packed samples for the configured data."""
    source = build_source(data_cfg, seed=seed, vocab_size=vocab_size)
    return BatchStream(source, data_cfg.seq_len, data_cfg.micro_batch_size, dp_rank, dp_size, seed)
