"""Megatron's indexed ``.bin/.idx`` datasets as a document source (read through megatron-core).

Token ids are whatever the dataset's tokenizer wrote, so the model's
``model.vocab_size`` must exceed the largest one; ``max_token_id`` finds it
with one pass over the ``.bin`` file so the driver can say so before launch.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from distattn.train.sources import VOCAB_SIZE, DataError, DocSource

__all__ = ["MegatronSource"]


class MegatronSource(DocSource):
    """Megatron's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``) via megatron-core.

    A document is the concatenation of its sequences (Megatron's
    ``document_indices``); empty documents are skipped. Token ids must be below
    ``vocab_size``, the model's ``model.vocab_size``. Byte-level data is written
    with ``IndexedDatasetBuilder(bin_path, dtype=numpy.uint8)`` and one
    ``add_item(torch.tensor(list(text.encode())))`` + ``end_document()`` per document.
    """

    SCAN_LIMIT_BYTES = 8 << 30  # larger files are checked document by document as they are read

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
            with warnings.catch_warnings():  # its optional fused kernels: noise for reading a file
                warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
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
            raise DataError(_outside(self, hi if hi >= self.vocab_size else lo, self.name(i)))
        return doc

    def _scan(self) -> tuple[int, int, int] | None:
        """(smallest id, largest id, flat position of the first id outside the vocab or -1), from one
        pass over the .bin file; None when the file is larger than SCAN_LIMIT_BYTES."""
        if getattr(self, "_scanned", None) is not None:
            return self._scanned
        dtype = np.dtype(self._ds.index.dtype)
        path = self.prefix + ".bin"
        size = os.path.getsize(path)
        if size > self.SCAN_LIMIT_BYTES:
            return None
        data = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        lo, hi, first = 0, 0, -1
        chunk = 1 << 24
        for at in range(0, data.shape[0], chunk):
            part = data[at:at + chunk]
            lo, hi = min(lo, int(part.min())), max(hi, int(part.max()))
            if first < 0:
                bad = np.nonzero((part < 0) | (part >= self.vocab_size))[0]
                if bad.size:
                    first = at + int(bad[0])
        self._scanned = (lo, hi, first)
        return self._scanned

    def vocab_needed(self) -> int | None:
        """The smallest model.vocab_size covering every token id (from the dtype when it bounds the
        ids to the vocab anyway; None for files too large to scan before launch)."""
        dtype = np.dtype(self._ds.index.dtype)
        if dtype.kind == "u" and (1 << (8 * dtype.itemsize)) <= self.vocab_size:
            return None  # no id of this dtype can exceed the vocab: no need to read the data
        scan = self._scan()
        return None if scan is None else scan[1] + 1

    def first_outside(self) -> str | None:
        """The problem with the first token id outside [0, vocab_size), naming its document, or None."""
        dtype = np.dtype(self._ds.index.dtype)
        if dtype.kind == "u" and (1 << (8 * dtype.itemsize)) <= self.vocab_size:
            return None
        scan = self._scan()
        if scan is None or scan[2] < 0:
            return None
        pos = scan[2]
        token = int(np.memmap(self.prefix + ".bin", dtype=dtype, mode="r")[pos])
        seq_starts = np.asarray(self._ds.index.sequence_pointers, dtype=np.int64) // dtype.itemsize
        seq = int(np.searchsorted(seq_starts, pos, side="right")) - 1
        doc = int(np.searchsorted(np.asarray(self._ds.document_indices, dtype=np.int64), seq, side="right")) - 1
        hi = scan[1]
        return _outside(self, token, f"{self.prefix}.bin document {doc}", largest=hi)

    def name(self, i: int) -> str:
        return f"{self.prefix}.bin document {int(self._doc_ids[i])}"

    def describe(self) -> str:
        return f"data.source=megatron at {self.prefix}"


def _outside(src: MegatronSource, token: int, where: str, largest: int | None = None) -> str:
    """Why a token id cannot be embedded, and the model.vocab_size that would work."""
    if token < 0:
        return (f"data.path={src.prefix!r} (data.source=megatron): {where} holds token id {token}; token ids "
                f"must be >= 0, so rewrite the dataset with non-negative ids")
    if largest is not None:
        fix = f"its largest token id is {largest}: set model.vocab_size={largest + 1} or more"
    else:
        fix = (f"set model.vocab_size above {token} (the dataset's largest id + 1), or use the vocabulary "
               f"the dataset was tokenized for")
    return (f"data.path={src.prefix!r} (data.source=megatron): {where} holds token id {token}, outside "
            f"model.vocab_size={src.vocab_size} (ids 0..{src.vocab_size - 1}); {fix}")
