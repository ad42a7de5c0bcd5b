"""Document sources: collections of documents with known lengths, read lazily.

Text sources (``stdlib``, ``text_dir``, ``jsonl``) yield a document's UTF-8
bytes, so their token ids are 0..255. They index documents up front (lengths
only) and read them when asked, so start-up is fast even on large corpora.
Megatron's indexed format lives in ``megatron_source``, the synthetic
long-context tasks in ``synthetic``.
"""
from __future__ import annotations

import codecs
import json
import os
import sysconfig
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

BYTE_VOCAB = 256  # a text source's token is a byte
VOCAB_SIZE = BYTE_VOCAB

# Files with these suffixes are taken as text without looking inside; any other
# file is taken when its first bytes decode as UTF-8 and hold no NUL byte.
TEXT_SUFFIXES = frozenset({
    ".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org", ".adoc", ".py", ".pyi", ".c", ".h",
    ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go", ".java", ".js", ".ts", ".sh", ".toml", ".yaml", ".yml",
    ".ini", ".cfg", ".json", ".csv", ".tsv", ".html", ".htm", ".xml", ".css",
})
_SNIFF_BYTES = 64 * 1024

__all__ = ["BYTE_VOCAB", "VOCAB_SIZE", "DataError", "DocSource", "ListSource", "StdlibSource",
           "TextDirSource", "JsonlSource"]


class DataError(ValueError):
    """A data source or stream that cannot produce samples; the message says why and what to do."""


def _u64(x: int) -> int:
    # numpy seeds must be non-negative; run.seed may be any integer.
    return int(x) % (1 << 64)


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

    def vocab_needed(self) -> int | None:
        """The smallest ``model.vocab_size`` that embeds every token id of this source (a text
        source's ids are bytes: 256), or None when it cannot be known without reading everything."""
        return BYTE_VOCAB


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

    def vocab_needed(self) -> int:
        return max((int(a.max()) + 1 for a in self._docs), default=1)

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
