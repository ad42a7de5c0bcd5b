"""Byte-level training data: document sources, packing, and the per-rank stream.

A token is a byte (vocab 256): a document is its UTF-8 bytes. Sources index
their documents up front (lengths only) and read them lazily, so start-up is
fast even on large corpora:

- ``stdlib``    the Python standard library's ``*.py`` files (needs no download);
- ``text_dir``  every text file under a directory;
- ``jsonl``     one JSON object per line, text in a configurable field;
- ``megatron``  Megatron's indexed ``.bin/.idx`` format, read through megatron-core;
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
"""
from __future__ import annotations

import codecs
import json
import os
import sysconfig
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

VOCAB_SIZE = 256
STATE_VERSION = 1

# Files with these suffixes are taken as text without looking inside; any other
# file is taken when its first bytes decode as UTF-8 and hold no NUL byte.
TEXT_SUFFIXES = frozenset({
    ".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org", ".adoc", ".py", ".pyi", ".c", ".h",
    ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go", ".java", ".js", ".ts", ".sh", ".toml", ".yaml", ".yml",
    ".ini", ".cfg", ".json", ".csv", ".tsv", ".html", ".htm", ".xml", ".css",
})
_SNIFF_BYTES = 64 * 1024

__all__ = [
    "VOCAB_SIZE", "DataError", "DocSource", "ListSource", "StdlibSource", "TextDirSource", "JsonlSource",
    "MegatronSource", "SyntheticSource", "Batch", "BatchStream", "build_source", "build_stream",
]


class DataError(ValueError):
    """A data source or stream that cannot produce samples; the message says why and what to do."""


def _u64(x: int) -> int:
    # numpy seeds must be non-negative; run.seed may be any integer.
    return int(x) % (1 << 64)


# --- sources -------------------------------------------------------------------------


class DocSource:
    """A fixed, ordered collection of documents with known lengths, read lazily.

    ``source[i]`` is document ``i`` as a 1-D integer numpy array (uint8 bytes for
    text sources). ``lengths`` is known without reading any document.
    """

    kind = "base"
    has_answers = False  # True when documents carry answer spans (synthetic tasks)

    def __init__(self, lengths: np.ndarray, cache_bytes: int = 64 << 20):
        self._lengths = np.asarray(lengths, dtype=np.int64)
        self._lengths.setflags(write=False)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = cache_bytes

    # sizes -------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._lengths.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        """Length in tokens of every document (read-only)."""
        return self._lengths

    @property
    def num_tokens(self) -> int:
        return int(self._lengths.sum())

    def doc_len(self, i: int) -> int:
        return int(self._lengths[i])

    # contents ----------------------------------------------------------------------
    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents")
        doc = self._cache.get(i)
        if doc is not None:
            self._cache.move_to_end(i)
            return doc
        doc = self._load(i)
        if doc.ndim != 1 or doc.shape[0] != self._lengths[i]:
            raise DataError(f"{self.name(i)} changed after it was indexed: expected "
                            f"{int(self._lengths[i])} tokens, read {doc.shape[0]}; restart the run "
                            f"so the corpus is indexed again")
        doc.setflags(write=False)
        self._cache[i] = doc
        self._cache_bytes += doc.nbytes
        while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
        return doc

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def _load(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def answer_spans(self, i: int) -> list[tuple[int, int]]:
        """Half-open ranges of answer tokens inside document ``i`` (synthetic tasks)."""
        return []

    # naming ------------------------------------------------------------------------
    def name(self, i: int) -> str:
        return f"document {i}"

    def describe(self) -> str:
        return f"data.source={self.kind}"

    def fingerprint(self) -> dict[str, Any]:
        """What a saved stream position depends on; checked when it is restored."""
        return {"kind": self.kind, "num_docs": len(self), "num_tokens": self.num_tokens}


def _bytes_doc(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


class ListSource(DocSource):
    """Documents held in memory: ``str`` (UTF-8 encoded), ``bytes`` or 1-D integer arrays.

    Empty documents are dropped.
    """

    kind = "list"

    def __init__(self, docs, name: str = "in-memory documents"):
        arrays = []
        for d in docs:
            if isinstance(d, str):
                d = d.encode("utf-8")
            arr = _bytes_doc(bytes(d)) if isinstance(d, (bytes, bytearray)) else np.asarray(d).reshape(-1)
            if arr.dtype.kind not in "iu":
                raise DataError(f"{name}: documents must be text, bytes or integer arrays, got {arr.dtype}")
            if arr.size:
                arrays.append(arr)
        self._docs = arrays
        self._label = name
        super().__init__(np.array([a.size for a in arrays], dtype=np.int64), cache_bytes=0)

    def _load(self, i: int) -> np.ndarray:
        return self._docs[i].copy()

    def describe(self) -> str:
        return f"{self._label} ({self.kind})"


class _FileSource(DocSource):
    """Documents that are whole files, given as (relative name, size) under a root."""

    def __init__(self, root: Path, files: list[tuple[str, int]]):
        self.root = Path(root)
        self.files = [f for f, _ in files]
        super().__init__(np.array([s for _, s in files], dtype=np.int64))

    def _load(self, i: int) -> np.ndarray:
        with open(self.root / self.files[i], "rb") as f:
            return _bytes_doc(f.read())

    def name(self, i: int) -> str:
        return str(self.root / self.files[i])


def _walk(root: Path, skip_dir, want_file) -> list[tuple[str, int]]:
    """(posix relative path, size) of wanted non-empty regular files, sorted by path."""
    out: list[tuple[str, int]] = []

    def visit(directory: str, rel: str) -> None:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    if not skip_dir(e.name):
                        visit(e.path, rel + e.name + "/")
                elif e.is_file():
                    size = e.stat().st_size
                    if size > 0 and want_file(e.name, e.path, size):
                        out.append((rel + e.name, size))
            except OSError:
                continue

    visit(str(root), "")
    out.sort()
    return out


class StdlibSource(_FileSource):
    """The Python standard library's ``*.py`` files: real code, long-tailed lengths, no download.

    Files are sorted by relative path; ``site-packages`` and ``__pycache__`` are
    skipped, empty files dropped. ``max_bytes`` caps the corpus: files are then
    taken in a fixed pseudo-random order until the cap (so every part of the
    library stays represented) and kept in path order.
    """

    kind = "stdlib"

    def __init__(self, root: str | Path | None = None, max_bytes: int | None = None):
        root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
        if not root.is_dir():
            raise DataError(f"data.source=stdlib: the standard library directory {root} does not exist; "
                            f"use data.source=synthetic or data.source=text_dir")
        files = _walk(root, lambda d: d in ("site-packages", "__pycache__") or d.startswith("."),
                      lambda name, path, size: name.endswith(".py"))
        if max_bytes is not None and sum(s for _, s in files) > max_bytes:
            order = np.random.default_rng(0).permutation(len(files))
            chosen, total = [], 0
            for j in order:
                size = files[j][1]
                if total + size <= max_bytes:
                    chosen.append(j)
                    total += size
            files = [files[j] for j in sorted(chosen)]
        self.max_bytes = max_bytes
        super().__init__(root, files)

    def describe(self) -> str:
        cap = f", max_bytes={self.max_bytes}" if self.max_bytes is not None else ""
        return f"data.source=stdlib ({self.root}{cap})"


def _looks_like_text(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return False
    if b"\x00" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


class TextDirSource(_FileSource):
    """Every text file under a directory (recursively, sorted by relative path).

    Files ending in a known text suffix (``TEXT_SUFFIXES``) are taken as they are;
    other files are taken when their first 64 KiB decode as UTF-8 without NUL
    bytes. Hidden files and directories and ``__pycache__`` are skipped.
    """

    kind = "text_dir"

    def __init__(self, path: str | Path):
        root = Path(path)
        if not root.exists():
            raise DataError(f"data.path={str(path)!r} does not exist; data.source=text_dir needs a "
                            f"directory of text files")
        if not root.is_dir():
            raise DataError(f"data.path={str(path)!r} is a file, not a directory; data.source=text_dir "
                            f"reads every text file under a directory (for one JSON-lines file use "
                            f"data.source=jsonl)")

        def want(name: str, full: str, size: int) -> bool:
            if name.startswith("."):
                return False
            return Path(name).suffix.lower() in TEXT_SUFFIXES or _looks_like_text(full)

        files = _walk(root, lambda d: d.startswith(".") or d == "__pycache__", want)
        if not files:
            raise DataError(f"data.path={str(path)!r} (data.source=text_dir) holds no non-empty text files: "
                            f"looked for files ending in .txt, .md, .rst, .py, ... and any other file that "
                            f"decodes as UTF-8; add text files or point data.path elsewhere")
        super().__init__(root, files)

    def describe(self) -> str:
        return f"data.source=text_dir at {self.root}"


class JsonlSource(DocSource):
    """One JSON object per line; the document is the UTF-8 bytes of ``field``.

    ``path`` is a ``.jsonl`` file or a directory of them (``*.jsonl``, sorted,
    recursive). Every line is checked when the source is built; blank lines and
    empty texts are skipped.
    """

    kind = "jsonl"

    def __init__(self, path: str | Path, field: str = "text"):
        root = Path(path)
        if not root.exists():
            raise DataError(f"data.path={str(path)!r} does not exist; data.source=jsonl needs a .jsonl file "
                            f"(one JSON object per line) or a directory of them")
        if root.is_dir():
            files = [root / rel for rel, _ in _walk(root, lambda d: d.startswith("."),
                                                    lambda n, p, s: n.endswith(".jsonl"))]
            if not files:
                raise DataError(f"data.path={str(path)!r} (data.source=jsonl) is a directory with no "
                                f"non-empty .jsonl files")
        else:
            files = [root]
        self.path = root
        self.field = field
        self.files = files
        file_idx, offsets, linenos, lengths = [], [], [], []
        for k, fpath in enumerate(files):
            with open(fpath, "rb") as f:
                offset = 0
                for lineno, line in enumerate(f, 1):
                    start, offset = offset, offset + len(line)
                    if not line.strip():
                        continue
                    n = len(self._parse(line, fpath, lineno).encode("utf-8"))
                    if n:
                        file_idx.append(k)
                        offsets.append(start)
                        linenos.append(lineno)
                        lengths.append(n)
        self._file_idx = np.array(file_idx, dtype=np.int32)
        self._offsets = np.array(offsets, dtype=np.int64)
        self._linenos = np.array(linenos, dtype=np.int64)
        super().__init__(np.array(lengths, dtype=np.int64))

    def _parse(self, line: bytes, fpath: Path, lineno: int) -> str:
        where = f"{fpath}:{lineno}"
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            detail = f"{err.msg} at column {err.colno}" if isinstance(err, json.JSONDecodeError) else str(err)
            raise DataError(f"{where}: not valid JSON ({detail}); data.source=jsonl needs one JSON object "
                            f"per line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with a {self.field!r} field, got "
                            f"{type(obj).__name__} {_short(obj)}")
        if self.field not in obj:
            keys = ", ".join(map(repr, list(obj)[:8])) or "none"
            raise DataError(f"{where}: the object has no {self.field!r} field (its keys: {keys}); set "
                            f"data.jsonl_field to the field that holds the text")
        text = obj[self.field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {self.field!r} is {type(text).__name__} {_short(text)}, "
                            f"expected a string")
        return text

    def _load(self, i: int) -> np.ndarray:
        fpath = self.files[int(self._file_idx[i])]
        with open(fpath, "rb") as f:
            f.seek(int(self._offsets[i]))
            line = f.readline()
        return _bytes_doc(self._parse(line, fpath, int(self._linenos[i])).encode("utf-8"))

    def name(self, i: int) -> str:
        return f"{self.files[int(self._file_idx[i])]}:{int(self._linenos[i])}"

    def describe(self) -> str:
        return f"data.source=jsonl at {self.path} (field {self.field!r})"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class MegatronSource(DocSource):
    """Megatron's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``) via megatron-core.

    A document is the concatenation of its sequences (Megatron's
    ``document_indices``); empty documents are skipped. Token ids must be below
    ``vocab_size`` (256 for the byte-level model): write such data with
    ``IndexedDatasetBuilder(bin_path, dtype=numpy.uint8)`` and one
    ``add_item(torch.tensor(list(text.encode())))`` + ``end_document()`` per document.
    """

    kind = "megatron"

    def __init__(self, path_prefix: str | Path, vocab_size: int = VOCAB_SIZE):
        prefix = str(path_prefix)
        for ext in (".bin", ".idx"):
            if prefix.endswith(ext) and not os.path.exists(prefix + ext):
                prefix = prefix[: -len(ext)]  # a file name given instead of the prefix
        missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
        if missing:
            raise DataError(f"data.path={str(path_prefix)!r} (data.source=megatron) must be the path prefix of "
                            f"a Megatron indexed dataset, with PREFIX.bin and PREFIX.idx next to each other; "
                            f"missing {', '.join(missing)}")
        with open(prefix + ".idx", "rb") as f:
            header = f.read(9)
        if header != b"MMIDIDX\x00\x00":
            raise DataError(f"{prefix}.idx (data.source=megatron) is not a Megatron index: it does not start "
                            f"with the MMIDIDX header; write it with megatron-core's IndexedDatasetBuilder")
        try:
            from megatron.core.datasets.indexed_dataset import IndexedDataset
        except Exception as err:
            raise DataError(f"data.source=megatron reads Megatron's .bin/.idx format through megatron-core, "
                            f"which could not be imported here ({type(err).__name__}: {err}); install "
                            f"megatron-core (pip install megatron-core) or convert the data to "
                            f"data.source=jsonl") from None
        try:
            ds = IndexedDataset(prefix, multimodal=False, mmap=True)
        except Exception as err:
            raise DataError(f"{prefix}.idx/.bin (data.source=megatron): megatron-core could not read this "
                            f"indexed dataset ({type(err).__name__}: {err or 'bad index'})") from None
        dtype = np.dtype(ds.index.dtype)
        if dtype.kind not in "iu":
            raise DataError(f"{prefix}.bin (data.source=megatron) holds {dtype} values, not token ids; "
                            f"write it with an integer dtype (numpy.uint8 for bytes)")
        self.prefix = prefix
        self.vocab_size = vocab_size
        self._ds = ds
        doc_idx = np.asarray(ds.document_indices, dtype=np.int64)
        seq_cum = np.concatenate([[0], np.cumsum(np.asarray(ds.sequence_lengths, dtype=np.int64))])
        doc_lens = seq_cum[doc_idx[1:]] - seq_cum[doc_idx[:-1]]
        keep = np.nonzero(doc_lens > 0)[0]
        self._seq_start = doc_idx[:-1][keep]
        self._seq_stop = doc_idx[1:][keep]
        self._doc_ids = keep
        super().__init__(doc_lens[keep])

    def _load(self, i: int) -> np.ndarray:
        start, stop = int(self._seq_start[i]), int(self._seq_stop[i])
        parts = [self._ds[start]] if stop - start == 1 else self._ds[start:stop]
        doc = np.concatenate([np.asarray(p) for p in parts]).astype(np.int64, copy=False)
        lo, hi = int(doc.min()), int(doc.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = hi if hi >= self.vocab_size else lo
            raise DataError(f"{self.name(i)} holds token id {bad}, outside the model's vocab of "
                            f"{self.vocab_size}: this dataset was tokenized for another vocabulary; "
                            f"distattn trains byte-level models, so write the documents' UTF-8 bytes "
                            f"(IndexedDatasetBuilder with dtype=numpy.uint8)")
        return doc

    def name(self, i: int) -> str:
        return f"{self.prefix}.bin document {int(self._doc_ids[i])}"

    def describe(self) -> str:
        return f"data.source=megatron at {self.prefix}"


# Filler for the needle task: lowercase words, no digits and no word "secret".
_FILLER_WORDS = (
    "the a of and to in is was on for with as by at from that this it his her their our an be are were "
    "river stone garden window morning evening quiet bright slowly across under over near city road house "
    "light water tree field cloud summer winter green old new small large long short warm cold people "
    "walked looked found kept told made went came saw said little great open closed along behind"
).split()
_ALNUM = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", dtype=np.uint8)


class SyntheticSource(DocSource):
    """Long-context tasks; every document is exactly ``seq_len`` bytes, one per sample.

    ``recall``: ``key:value;`` pairs of random strings over ``[a-z0-9]`` (keys
    unique within a document), then ``?key=value\\n`` asking for a pair that
    starts in the first half. ``needle``: filler sentences with
    ``the secret is NNNN. `` planted in the first half, then
    ``\\nQ: what is the secret? A: NNNN\\n``. The answer (``value`` / ``NNNN``)
    is the document's ``answer_spans``; it lies at least ``seq_len/2`` tokens
    after its only earlier occurrence. Document ``i`` depends only on ``(seed, i)``.
    """

    kind = "synthetic"
    has_answers = True
    MIN_SEQ_LEN = 128
    VALUE_LEN = 4

    def __init__(self, seq_len: int, task: str = "recall", num_docs: int = 65536, seed: int = 0):
        if task not in ("recall", "needle"):
            raise DataError(f"data.synthetic_task={task!r} is not a synthetic task; choose recall or needle")
        if seq_len < self.MIN_SEQ_LEN:
            raise DataError(f"data.source=synthetic needs data.seq_len >= {self.MIN_SEQ_LEN} so the answer "
                            f"can lie seq_len/2 tokens back, got {seq_len}")
        self.seq_len = int(seq_len)
        self.task = task
        self.seed = int(seed)
        if task == "recall":
            k = 3
            while True:
                pair = k + self.VALUE_LEN + 2
                n_pairs = (self.seq_len - (k + self.VALUE_LEN + 3)) // pair
                if len(_ALNUM) ** k >= 4 * n_pairs:
                    break
                k += 1
            self._key_len, self._n_pairs = k, n_pairs
            self._answer = (self.seq_len - 1 - self.VALUE_LEN, self.seq_len - 1)
        else:
            self._answer = (self.seq_len - 5, self.seq_len - 1)
        # Documents are generated on demand; keep only a few in memory.
        super().__init__(np.full(num_docs, self.seq_len, dtype=np.int64),
                         cache_bytes=max(4 * self.seq_len, 1 << 20))

    def answer_spans(self, i: int) -> list[tuple[int, int]]:
        return [self._answer]

    def _load(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([_u64(self.seed), int(i), 0 if self.task == "recall" else 1])
        return self._recall(rng) if self.task == "recall" else self._needle(rng)

    def _recall(self, rng: np.random.Generator) -> np.ndarray:
        T, k, v, n = self.seq_len, self._key_len, self.VALUE_LEN, self._n_pairs
        base = len(_ALNUM)
        keys = rng.choice(base ** k, size=n, replace=False)
        key_digits = (keys[:, None] // base ** np.arange(k - 1, -1, -1)) % base
        pairs = np.empty((n, k + v + 2), dtype=np.uint8)
        pairs[:, :k] = _ALNUM[key_digits]
        pairs[:, k] = ord(":")
        pairs[:, k + 1:k + 1 + v] = _ALNUM[rng.integers(0, base, size=(n, v))]
        pairs[:, -1] = ord(";")
        last_in_first_half = (T // 2 - pairs.shape[1]) // pairs.shape[1]
        q = int(rng.integers(0, last_in_first_half + 1))
        query = np.concatenate([[ord("?")], pairs[q, :k], [ord("=")], pairs[q, k + 1:k + 1 + v], [ord("\n")]])
        pad = np.full(T - pairs.size - query.size, ord(" "), dtype=np.uint8)
        return np.concatenate([pairs.reshape(-1), pad, query.astype(np.uint8)])

    def _needle(self, rng: np.random.Generator) -> np.ndarray:
        T = self.seq_len
        secret = f"{int(rng.integers(0, 10000)):04d}"
        needle = f"the secret is {secret}. ".encode()
        question = f"\nQ: what is the secret? A: {secret}\n".encode()
        room = T - len(needle) - len(question)
        words = np.array(_FILLER_WORDS, dtype=object)[rng.integers(0, len(_FILLER_WORDS), size=room // 2 + 8)]
        filler = (" ".join(words) + ". ").encode()
        while len(filler) < room:
            filler += filler
        at = int(rng.integers(0, T // 2 - len(needle) + 1))
        at = filler.rfind(b" ", 0, at) + 1  # plant it between words
        text = filler[:at] + needle + filler[at:room] + question
        return _bytes_doc(text)

    def describe(self) -> str:
        return f"data.source=synthetic (task {self.task}, seq_len {self.seq_len})"

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "task": self.task, "seed": self.seed}


# --- packing -------------------------------------------------------------------------


@dataclass
class Batch:
    """One packed sample of ``T`` tokens (micro-batch of one sequence, THD layout).

    ``labels[t]`` is the byte after ``tokens[t]``; ``loss_mask[t]`` is 0 where
    ``tokens[t]`` ends its document; ``cu_seqlens`` are the document boundaries
    (``[0, ..., T]``); ``answer_mask[t]`` is 1 where ``labels[t]`` is an answer
    byte of a synthetic task (all zeros otherwise); ``index`` is the sample's
    position in the single-rank stream.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    cu_seqlens: list[int]
    answer_mask: torch.Tensor
    index: int = -1

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_docs(self) -> int:
        return len(self.cu_seqlens) - 1

    def doc_positions(self) -> torch.Tensor:
        """Position of every token inside its document (restarting at 0 at each boundary)."""
        cu = torch.tensor(self.cu_seqlens, dtype=torch.long)
        starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1])
        return torch.arange(self.seq_len, dtype=torch.long) - starts

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.tokens.to(device), self.labels.to(device), self.loss_mask.to(device),
                     list(self.cu_seqlens), self.answer_mask.to(device), self.index)


class BatchStream:
    """An infinite, deterministic stream of packed samples for one dp rank.

    Sample ``i`` of the single-rank stream goes to dp rank ``i % dp_size``.
    ``next_step(grad_accum)`` returns ``grad_accum * micro_batch_size`` samples.
    ``state_dict()`` is identical on every dp rank and restores the exact
    position (also under a different ``dp_size``).
    """

    def __init__(self, source: DocSource, seq_len: int, micro_batch_size: int = 1, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True):
        for name, value, low in (("seq_len", seq_len, 1), ("micro_batch_size", micro_batch_size, 1),
                                 ("dp_size", dp_size, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank must be in [0, {dp_size}), got {dp_rank!r}")
        self.source = source
        self.seq_len = int(seq_len)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._lengths = source.lengths
        self._epoch_tokens = int(self._lengths.sum())
        need = self.seq_len + 1
        if self._epoch_tokens < need:
            raise DataError(f"{source.describe()} has {self._epoch_tokens} bytes in {len(source)} documents, "
                            f"but data.seq_len={self.seq_len} needs at least {need} (one sequence plus the "
                            f"shifted label); add data or lower data.seq_len")
        self._orders: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._served = 0  # samples of the single-rank stream consumed by all dp ranks together

    # positions ---------------------------------------------------------------------
    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative end offsets) of one epoch."""
        hit = self._orders.get(epoch)
        if hit is not None:
            return hit
        n = len(self.source)
        perm = (np.random.default_rng(_u64(self.seed + epoch)).permutation(n) if self.shuffle
                else np.arange(n))
        ends = np.cumsum(self._lengths[perm])
        self._orders[epoch] = (perm, ends)
        while len(self._orders) > 3:
            self._orders.popitem(last=False)
        return perm, ends

    def _where(self, sample: int) -> tuple[int, int]:
        """(epoch, token offset into that epoch) where a sample starts."""
        return divmod(sample * self.seq_len, self._epoch_tokens)

    def _locate(self, epoch: int, pos: int) -> tuple[int, int, int]:
        """(cursor into the epoch's document order, offset inside that document, document id)."""
        perm, ends = self._order(epoch)
        cursor = int(np.searchsorted(ends, pos, side="right"))
        start = int(ends[cursor - 1]) if cursor else 0
        return cursor, pos - start, int(perm[cursor])

    def _pieces(self, epoch: int, pos: int, count: int) -> list[tuple[int, int, int]]:
        """(document id, start, stop) slices covering ``count`` stream tokens from a position."""
        out = []
        while count > 0:
            perm, ends = self._order(epoch)
            cursor = int(np.searchsorted(ends, pos, side="right"))
            while count > 0 and cursor < len(perm):
                doc = int(perm[cursor])
                length = int(self._lengths[doc])
                start = pos - (int(ends[cursor]) - length)
                take = min(length - start, count)
                out.append((doc, start, start + take))
                pos += take
                count -= take
                cursor += 1
            epoch, pos = epoch + 1, 0
        return out

    # samples -----------------------------------------------------------------------
    def _sample(self, index: int) -> Batch:
        T = self.seq_len
        chunk = np.empty(T + 1, dtype=np.int64)
        loss = np.ones(T, dtype=np.float32)
        answer = np.zeros(T, dtype=np.float32)
        cu = [0]
        c = 0
        for doc, start, stop in self._pieces(*self._where(index), T + 1):
            n = stop - start
            chunk[c:c + n] = self.source[doc][start:stop]
            if 0 < c < T:
                cu.append(c)
            if stop == self._lengths[doc] and c + n - 1 < T:
                loss[c + n - 1] = 0.0  # last token of its document: its label is another document's
            if self.source.has_answers:
                for a0, a1 in self.source.answer_spans(doc):
                    # answer byte p is the label of the token before it, inside this piece
                    lo, hi = max(a0, start + 1), min(a1, stop)
                    if lo < hi:
                        t0, t1 = c + lo - start - 1, min(c + hi - start - 1, T)
                        answer[t0:t1] = 1.0
            c += n
        cu.append(T)
        full = torch.from_numpy(chunk)
        return Batch(tokens=full[:T].clone(), labels=full[1:].clone(), loss_mask=torch.from_numpy(loss),
                     cu_seqlens=cu, answer_mask=torch.from_numpy(answer * loss), index=index)

    def sample_at(self, index: int) -> Batch:
        """Sample ``index`` of the single-rank stream, whichever rank owns it (no state change)."""
        return self._sample(int(index))

    def next_sample(self) -> Batch:
        """This rank's next sample."""
        batch = self._sample(self._served + self.dp_rank)
        self._served += self.dp_size
        return batch

    def next_step(self, grad_accum: int = 1) -> list[Batch]:
        """``grad_accum * micro_batch_size`` samples for this rank, in stream order."""
        if isinstance(grad_accum, bool) or not isinstance(grad_accum, (int, np.integer)) or grad_accum < 1:
            raise DataError(f"grad_accum must be an integer >= 1, got {grad_accum!r}")
        return [self.next_sample() for _ in range(int(grad_accum) * self.micro_batch_size)]

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Batch:
        return self.next_sample()

    @property
    def samples_served(self) -> int:
        """Samples of the single-rank stream consumed by all dp ranks together."""
        return self._served

    # state -------------------------------------------------------------------------
    def peek_position(self) -> dict[str, Any]:
        """Where the next step starts (for logs): epoch, document cursor and offset, counts."""
        epoch, pos = self._where(self._served)
        cursor, offset, doc = self._locate(epoch, pos)
        return {"epoch": epoch, "doc_cursor": cursor, "doc_offset": offset, "doc_id": doc,
                "doc_name": self.source.name(doc), "samples_served": self._served,
                "tokens_served": self._served * self.seq_len,
                "epoch_fraction": pos / self._epoch_tokens}

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and strings: the position of the next step, the same on every dp rank."""
        epoch, pos = self._where(self._served)
        cursor, offset, doc = self._locate(epoch, pos)
        return {"version": STATE_VERSION, "epoch": epoch, "doc_cursor": cursor, "doc_offset": offset,
                "doc_id": doc, "samples_served": self._served, "seq_len": self.seq_len, "seed": self.seed,
                "shuffle": self.shuffle, "source": dict(self.source.fingerprint())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken: no sample skipped or repeated."""
        required = ("version", "epoch", "doc_cursor", "doc_offset", "samples_served", "seq_len", "seed",
                    "shuffle", "source")
        missing = [k for k in required if k not in state]
        if missing:
            raise DataError(f"data stream state lacks {', '.join(missing)}; it was not written by "
                            f"BatchStream.state_dict()")
        if state["version"] != STATE_VERSION:
            raise DataError(f"data stream state version {state['version']} is not supported "
                            f"(expected {STATE_VERSION})")
        ours = {"seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle,
                "source": dict(self.source.fingerprint())}
        diffs = [f"{k}: saved {state[k]!r}, now {v!r}" for k, v in ours.items() if state[k] != v]
        if diffs:
            raise DataError("cannot resume the data stream: it was saved for different data ("
                            + "; ".join(diffs) + "); resume with the same data section and run.seed")
        served = int(state["samples_served"])
        if served < 0:
            raise DataError(f"data stream state has samples_served={served}, expected >= 0")
        epoch, pos = self._where(served)
        cursor, offset, doc = self._locate(epoch, pos)
        saved = (int(state["epoch"]), int(state["doc_cursor"]), int(state["doc_offset"]))
        if saved != (epoch, cursor, offset) or int(state.get("doc_id", doc)) != doc:
            raise DataError(f"data stream state is inconsistent: samples_served={served} means epoch {epoch}, "
                            f"document cursor {cursor}, offset {offset}, but it says epoch {saved[0]}, "
                            f"cursor {saved[1]}, offset {saved[2]}")
        self._served = served


# --- from the config -----------------------------------------------------------------

_PATH_NEEDS = {"text_dir": "a directory of text files", "jsonl": "a .jsonl file or a directory of them",
               "megatron": "a Megatron .bin/.idx path prefix, without the extension"}


def build_source(data_cfg, seed: int = 0, vocab_size: int = VOCAB_SIZE) -> DocSource:
    """The document source named by ``data.source`` (``seed`` only shapes synthetic documents)."""
    kind = data_cfg.source
    if kind in _PATH_NEEDS and not data_cfg.path:
        raise DataError(f"data.path is required for data.source={kind}: set it to {_PATH_NEEDS[kind]}")
    if kind == "stdlib":
        return StdlibSource()
    if kind == "text_dir":
        return TextDirSource(data_cfg.path)
    if kind == "jsonl":
        return JsonlSource(data_cfg.path, field=getattr(data_cfg, "jsonl_field", "text"))
    if kind == "megatron":
        return MegatronSource(data_cfg.path, vocab_size=vocab_size)
    if kind == "synthetic":
        return SyntheticSource(data_cfg.seq_len, task=data_cfg.synthetic_task, seed=seed)
    raise DataError(f"data.source={kind!r} is not a data source; choose one of stdlib, text_dir, jsonl, "
                    f"megatron, synthetic")


def build_stream(data_cfg, dp_rank: int = 0, dp_size: int = 1, seed: int = 0) -> BatchStream:
    """This dp rank's stream of packed samples for the configured data."""
    source = build_source(data_cfg, seed=seed)
    return BatchStream(source, data_cfg.seq_len, data_cfg.micro_batch_size, dp_rank, dp_size, seed)
