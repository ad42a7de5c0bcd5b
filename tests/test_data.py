"""The data pipeline: sources, packing invariants, dp split, exact resume, errors."""
from __future__ import annotations

import json
import re
import sys
import time

import numpy as np
import pytest
import torch

from distattn.config import ConfigError, DataConfig
from distattn.train.data import (Batch, BatchStream, DataError, JsonlSource, ListSource, MegatronSource,
                                 StdlibSource, SyntheticSource, TextDirSource, build_source, build_stream)


def _docs(n=40, seed=0):
    """Documents with a wide spread of lengths, including 1-byte ones."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([[1, 1, 2, 3], rng.integers(1, 90, size=n - 4)])
    return [bytes(rng.integers(97, 123, size=int(k)).astype(np.uint8)) for k in lengths]


def _reference(docs, T, seed, n_samples, shuffle=True):
    """Independent packing: concatenate epochs, slice [i*T, i*T+T+1), derive everything from doc ids."""
    toks, inst, last = [], [], []
    epoch, k, need = 0, 0, (n_samples + 1) * T + 1
    while len(toks) < need:
        order = np.random.default_rng(seed + epoch).permutation(len(docs)) if shuffle else range(len(docs))
        for d in order:
            toks += list(docs[d])
            inst += [k] * len(docs[d])
            last += [0] * (len(docs[d]) - 1) + [1]
            k += 1
        epoch += 1
    toks, inst, last = np.array(toks), np.array(inst), np.array(last)
    out = []
    for i in range(n_samples):
        s = slice(i * T, i * T + T)
        ids = inst[s]
        cu = [0] + [t for t in range(1, T) if ids[t] != ids[t - 1]] + [T]
        out.append(dict(tokens=toks[s], labels=toks[i * T + 1:i * T + T + 1], loss_mask=1.0 - last[s],
                        cu_seqlens=cu))
    return out


def _same(a: Batch, b: Batch):
    assert a.index == b.index
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.loss_mask, b.loss_mask) and torch.equal(a.answer_mask, b.answer_mask)
    assert a.cu_seqlens == b.cu_seqlens


# --- packing ------------------------------------------------------------------------

@pytest.mark.parametrize("T", [7, 32, 100])
def test_packing_matches_reference(T):
    docs = _docs()
    src = ListSource(docs)
    stream = BatchStream(src, T, seed=3)
    n = 3 * src.num_tokens // T + 5  # several epochs, so samples cross epoch boundaries
    ref = _reference(docs, T, 3, n)
    for i in range(n):
        b = stream.next_sample()
        r = ref[i]
        assert b.index == i
        assert b.tokens.shape == (T,) and b.labels.shape == (T,) and b.loss_mask.shape == (T,)
        assert b.tokens.dtype == torch.long and b.loss_mask.dtype == torch.float32
        assert b.tokens.tolist() == r["tokens"].tolist()
        assert b.labels.tolist() == r["labels"].tolist()
        assert b.labels[:-1].tolist() == b.tokens[1:].tolist()  # labels are tokens shifted
        assert b.cu_seqlens == r["cu_seqlens"]
        cu = b.cu_seqlens
        assert cu[0] == 0 and cu[-1] == T and all(x < y for x, y in zip(cu, cu[1:]))
        assert b.loss_mask.tolist() == r["loss_mask"].tolist()
        # loss is masked only at document ends, i.e. only just before an inner boundary or at T-1
        zeros = set(torch.nonzero(b.loss_mask == 0).flatten().tolist())
        assert zeros <= {c - 1 for c in cu[1:]}
        assert {c - 1 for c in cu[1:-1]} <= zeros  # every in-sample document that ends here is masked
        assert not b.answer_mask.any()
        pos = b.doc_positions()
        assert pos[0] == 0 and all(pos[c] == 0 for c in cu[:-1])


def test_document_cut_continues_next_sample():
    src = ListSource([b"a" * 10, b"b" * 10])
    s = BatchStream(src, 8, shuffle=False)
    b0, b1, b2 = s.next_sample(), s.next_sample(), s.next_sample()
    assert bytes(b0.tokens.tolist()) == b"a" * 8 and b0.cu_seqlens == [0, 8]
    assert b0.loss_mask.tolist() == [1.0] * 8  # label 'a' at the cut is still the same document
    assert bytes(b1.tokens.tolist()) == b"aabbbbbb" and b1.cu_seqlens == [0, 2, 8]
    assert b1.loss_mask.tolist() == [1, 0, 1, 1, 1, 1, 1, 1]
    # the cut piece of the second document restarts at 0 in the next sample, then epoch 1 follows
    assert b2.tokens.tolist()[:4] == list(b"bbbb") and b2.cu_seqlens[:2] == [0, 4]
    assert b2.loss_mask[3] == 0


def test_determinism_and_epoch_reshuffle():
    docs = _docs()
    a = BatchStream(ListSource(docs), 16, seed=11)
    b = BatchStream(ListSource(docs), 16, seed=11)
    c = BatchStream(ListSource(docs), 16, seed=12)
    sa, sb, sc = ([s.next_sample() for _ in range(40)] for s in (a, b, c))
    for x, y in zip(sa, sb):
        _same(x, y)
    assert any(not torch.equal(x.tokens, z.tokens) for x, z in zip(sa, sc))
    perm0, _ = a._order(0)
    perm1, _ = a._order(1)
    assert sorted(perm0.tolist()) == sorted(perm1.tolist()) and perm0.tolist() != perm1.tolist()


def test_next_step_sizes_and_dp_split():
    docs = _docs()
    single = BatchStream(ListSource(docs), 16, micro_batch_size=2, seed=5)
    dp = 3
    ranks = [BatchStream(ListSource(docs), 16, micro_batch_size=2, dp_rank=r, dp_size=dp, seed=5)
             for r in range(dp)]
    got: dict[int, Batch] = {}
    for _ in range(4):
        for r, s in enumerate(ranks):
            step = s.next_step(grad_accum=3)
            assert len(step) == 6
            assert all(b.index % dp == r for b in step)
            got.update({b.index: b for b in step})
    n = 4 * 6 * dp
    assert sorted(got) == list(range(n))
    for i in range(n):
        _same(got[i], single.next_sample())
    # every rank holds the same state: the position after the step
    states = [s.state_dict() for s in ranks]
    assert all(st == states[0] for st in states) and states[0]["samples_served"] == n


@pytest.mark.parametrize("dp_after", [2, 1, 4])
def test_resume_is_exact(dp_after):
    docs = _docs()
    dp = 2
    ref = BatchStream(ListSource(docs), 24, seed=9)  # the uninterrupted single-rank stream
    live = BatchStream(ListSource(docs), 24, dp_rank=1, dp_size=dp, seed=9)
    for _ in range(7):
        live.next_step(2)
    state = live.state_dict()
    state = json.loads(json.dumps(state))  # plain values: survives any checkpoint format
    assert state["samples_served"] == 7 * 2 * dp
    for key in ("epoch", "doc_cursor", "doc_offset", "samples_served"):
        assert key in state
    served = state["samples_served"]
    for _ in range(served):
        ref.next_sample()
    ref_next = [ref.next_sample() for _ in range(12 * dp_after)]
    resumed = [BatchStream(ListSource(docs), 24, dp_rank=r, dp_size=dp_after, seed=9) for r in range(dp_after)]
    for s in resumed:
        s.load_state_dict(state)
        assert s.peek_position()["samples_served"] == served
    got = {}
    for _ in range(12):
        for s in resumed:
            b = s.next_sample()
            got[b.index] = b
    assert sorted(got) == [b.index for b in ref_next]  # nothing skipped, nothing repeated
    for b in ref_next:
        _same(got[b.index], b)
    if dp_after == dp:  # the same rank resumed continues exactly as the live stream would
        cont = live.next_step(3)
        again = BatchStream(ListSource(docs), 24, dp_rank=1, dp_size=dp, seed=9)
        again.load_state_dict(state)
        for x, y in zip(cont, again.next_step(3)):
            _same(x, y)


def test_resume_refuses_other_data():
    docs = _docs()
    s = BatchStream(ListSource(docs), 16, seed=1)
    s.next_step(3)
    state = s.state_dict()
    with pytest.raises(DataError, match=r"seq_len: saved 16, now 32"):
        BatchStream(ListSource(docs), 32, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match=r"seed: saved 1, now 2"):
        BatchStream(ListSource(docs), 16, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match=r"source: saved"):
        BatchStream(ListSource(docs[:-1]), 16, seed=1).load_state_dict(state)
    bad = dict(state, doc_offset=state["doc_offset"] + 1)
    with pytest.raises(DataError, match="inconsistent"):
        BatchStream(ListSource(docs), 16, seed=1).load_state_dict(bad)


def test_peek_position():
    s = BatchStream(ListSource([b"x" * 50, b"y" * 30]), 20, shuffle=False)
    assert s.peek_position()["doc_cursor"] == 0
    s.next_step(3)
    pos = s.peek_position()
    assert pos["samples_served"] == 3 and pos["tokens_served"] == 60
    assert (pos["epoch"], pos["doc_cursor"], pos["doc_offset"], pos["doc_id"]) == (0, 1, 10, 1)


# --- sources ------------------------------------------------------------------------

def test_text_dir_source(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.md").write_text("# two\n" * 20)
    (tmp_path / "a.txt").write_text("first document, ünïcode\n" * 10)
    (tmp_path / "notes").write_text("no suffix but text\n" * 5)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary" * 10)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / ".hidden.txt").write_text("hidden")
    src = build_source(DataConfig(source="text_dir", path=str(tmp_path)))
    assert isinstance(src, TextDirSource)
    assert src.files == ["a.txt", "b/two.md", "notes"]
    assert bytes(src[0]) == ("first document, ünïcode\n" * 10).encode()
    assert [int(x) for x in src.lengths] == [len(bytes(d)) for d in src]
    b = BatchStream(src, 64, shuffle=False).next_sample()
    assert bytes(b.tokens.tolist()) == bytes(src[0])[:64]


def test_jsonl_source(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"text": "hello world " * 5, "id": 1}, {"text": "second ✓ doc " * 4}, {"text": ""}]
    p.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    src = build_source(DataConfig(source="jsonl", path=str(p)))
    assert isinstance(src, JsonlSource) and len(src) == 2  # blank line and empty text skipped
    assert bytes(src[1]) == rows[1]["text"].encode()
    q = tmp_path / "f.jsonl"
    q.write_text(json.dumps({"body": "x" * 30}) + "\n")
    src = build_source(DataConfig(source="jsonl", path=str(q), jsonl_field="body"))
    assert bytes(src[0]) == b"x" * 30


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_megatron_indexed_round_trip(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    texts = ["first document\n" * 7, "zweites Dokument ✓\n" * 5, "third\n" * 9]
    prefix = str(tmp_path / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint8)
    for t in texts[:2]:
        builder.add_item(torch.tensor(list(t.encode())))
        builder.end_document()
    raw = texts[2].encode()  # one document stored as two sequences
    builder.add_document(torch.tensor(list(raw)), [10, len(raw) - 10])
    builder.finalize(prefix + ".idx")

    src = build_source(DataConfig(source="megatron", path=prefix))
    assert isinstance(src, MegatronSource) and len(src) == 3
    assert [bytes(src[i].astype(np.uint8)) for i in range(3)] == [t.encode() for t in texts]
    stream = BatchStream(src, 32, shuffle=False)
    b = stream.next_sample()
    assert bytes(b.tokens.tolist()) == texts[0].encode()[:32]

    # a dataset tokenized for a larger vocabulary is refused with the reason
    big = str(tmp_path / "gpt2_tokens")
    builder = IndexedDatasetBuilder(big + ".bin", dtype=np.int32)
    builder.add_item(torch.tensor([15496, 995, 300]))
    builder.end_document()
    builder.finalize(big + ".idx")
    with pytest.raises(DataError, match=r"token id 15496, outside model.vocab_size=256 .*set model.vocab_size "
                                        r"above 15496"):
        MegatronSource(big)[0]
    # ... and read with a vocabulary that covers it; the driver's scan finds what it needs
    src = MegatronSource(big, vocab_size=16000)
    assert src[0].tolist() == [15496, 995, 300]
    assert src.vocab_needed() == 15497 and src.first_outside() is None
    small = MegatronSource(big, vocab_size=1000)
    assert small.vocab_needed() == 15497
    assert re.search(r"document 0 holds token id 15496, outside model.vocab_size=1000 .*largest token id is "
                     r"15496: set model.vocab_size=15497 or more", small.first_outside())
    assert src.vocab_needed() == 15497
    # bytes in a uint8 dataset never exceed a byte vocabulary: nothing to scan
    assert MegatronSource(prefix).vocab_needed() is None and MegatronSource(prefix).first_outside() is None


def test_megatron_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"path prefix of a Megatron indexed dataset.*missing .*nope\.bin"):
        build_source(DataConfig(source="megatron", path=str(tmp_path / "nope")))
    for ext in (".bin", ".idx"):
        (tmp_path / f"junk{ext}").write_bytes(b"not an index")
    with pytest.raises(DataError, match=r"junk\.idx \(data.source=megatron\) is not a Megatron index"):
        build_source(DataConfig(source="megatron", path=str(tmp_path / "junk.bin")))


def test_megatron_unavailable_is_a_clear_error(tmp_path, monkeypatch):
    prefix = tmp_path / "c"
    (tmp_path / "c.bin").write_bytes(b"x")
    (tmp_path / "c.idx").write_bytes(b"MMIDIDX\x00\x00")
    monkeypatch.setitem(sys.modules, "megatron.core.datasets.indexed_dataset", None)
    with pytest.raises(DataError, match="through megatron-core, which could not be imported here"):
        MegatronSource(prefix)


@pytest.mark.parametrize("task", ["recall", "needle"])
def test_vocab_needed_covers_what_sources_emit(task):
    """The smallest vocab the driver demands is exactly one above the largest byte written."""
    src = SyntheticSource(512, task=task, seed=3)
    top = max(int(src[i].max()) for i in range(64))
    assert src.vocab_needed() == top + 1 <= 256
    assert ListSource([b"ab", np.array([7, 300])]).vocab_needed() == 301
    assert StdlibSource(max_bytes=100_000).vocab_needed() == 256


@pytest.mark.parametrize("T", [128, 1000, 4096])
def test_synthetic_recall_answer_is_far_back(T):
    stream = build_stream(DataConfig(source="synthetic", seq_len=T, synthetic_task="recall"), seed=7)
    for _ in range(3):
        b = stream.next_sample()
        text = bytes(b.tokens.tolist()) + bytes([b.labels[-1].item()])
        assert b.cu_seqlens == [0, T] and len(text) == T + 1
        doc = text[:T]
        m = re.search(rb"\?([a-z0-9]+)=([a-z0-9]+)\n$", doc)
        key, value = m.group(1), m.group(2)
        earlier = [x.start() for x in re.finditer(rb"(?:^|;)" + key + rb":", doc[:m.start()])]
        assert len(earlier) == 1  # keys are unique: the answer is unambiguous
        pair_at = doc.index(key + b":", earlier[0])
        assert doc[pair_at + len(key) + 1:pair_at + len(key) + 1 + len(value)] == value
        assert pair_at + len(key) + len(value) + 2 <= T // 2  # the pair lies in the first half
        answer_at = m.start(2)
        assert answer_at - (pair_at + len(key) + 1) >= SyntheticSource.min_answer_distance(T) >= T / 2
        # the answer mask covers exactly the answer bytes, as labels
        idx = torch.nonzero(b.answer_mask).flatten().tolist()
        assert idx == list(range(answer_at - 1, answer_at - 1 + len(value)))
        assert bytes(b.labels[idx].tolist()) == value
        assert b.loss_mask.sum() == T - 1 and b.loss_mask[-1] == 0


def test_synthetic_needle_answer_is_far_back():
    T = 2048
    src = build_source(DataConfig(source="synthetic", seq_len=T, synthetic_task="needle"), seed=3)
    assert isinstance(src, SyntheticSource)
    stream = BatchStream(src, T, seed=3)
    for _ in range(3):
        b = stream.next_sample()
        doc = bytes(b.tokens.tolist())
        needle = re.search(rb"the secret is (\d{4})\. ", doc)
        assert needle and needle.end() <= T // 2 and len(re.findall(rb"\d", doc)) == 8
        assert doc.endswith(b"\nQ: what is the secret? A: " + needle.group(1) + b"\n")
        idx = torch.nonzero(b.answer_mask).flatten().tolist()
        assert bytes(b.labels[idx].tolist()) == needle.group(1)
        assert idx[0] + 1 - needle.start(1) >= SyntheticSource.min_answer_distance(T) >= T / 2
    # documents depend on (seed, index) only
    other = SyntheticSource(T, "needle", seed=3)
    assert bytes(other[5]) == bytes(src[5])
    assert bytes(SyntheticSource(T, "needle", seed=4)[5]) != bytes(src[5])


def test_stdlib_source_is_real_long_tailed_and_fast():
    t0 = time.perf_counter()
    stream = build_stream(DataConfig(source="stdlib", seq_len=2048), 0, 1, seed=1234)
    b = stream.next_step(1)[0]
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"stdlib source + first batch took {elapsed:.2f}s"
    src = stream.source
    assert isinstance(src, StdlibSource) and len(src) > 200 and src.num_tokens > 2_000_000
    assert all(f.endswith(".py") and "site-packages" not in f for f in src.files)
    assert src.files == sorted(src.files)
    lengths = np.sort(src.lengths)[::-1]
    assert lengths[0] > 20 * np.median(lengths)  # long tail
    assert lengths[: len(lengths) // 10].sum() > 0.4 * lengths.sum()  # top 10% of files hold most bytes
    assert b.tokens.shape == (2048,) and b.loss_mask.sum() > 0
    capped = StdlibSource(max_bytes=300_000)
    assert 0 < capped.num_tokens <= 300_000 and capped.files == sorted(capped.files)


# --- errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["text_dir", "jsonl", "megatron"])
def test_error_missing_path(kind):
    with pytest.raises(DataError, match=f"data.path is required for data.source={kind}"):
        build_source(DataConfig.model_construct(source=kind, path=None))
    with pytest.raises(ConfigError, match="set data.path"):  # the config already refuses it at load time
        DataConfig(source=kind)


def test_error_empty_directory(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match=r"holds no non-empty text files"):
        build_source(DataConfig(source="text_dir", path=str(tmp_path)))
    with pytest.raises(DataError, match="does not exist"):
        build_source(DataConfig(source="text_dir", path=str(tmp_path / "missing")))


@pytest.mark.parametrize("line, message", [
    ('["a", "list"]', r"bad\.jsonl:2: expected a JSON object with a 'text' field, got list"),
    ('{"content": "x"}', r"bad\.jsonl:2: the object has no 'text' field \(its keys: 'content'\); "
                         r"set data.jsonl_field"),
    ('{"text": 5}', r"bad\.jsonl:2: field 'text' is int 5, expected a string"),
    ('{"text": "unterminated', r"bad\.jsonl:2: not valid JSON"),
])
def test_error_bad_jsonl_line(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        build_source(DataConfig(source="jsonl", path=str(p)))


def test_error_corpus_smaller_than_one_sequence(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 100)
    (tmp_path / "b.txt").write_text("y" * 20)
    cfg = DataConfig(source="text_dir", path=str(tmp_path), seq_len=2048)
    with pytest.raises(DataError, match=r"has 120 bytes in 2 documents, but data.seq_len=2048 needs at "
                                        r"least 2049"):
        build_stream(cfg)
    assert build_stream(DataConfig(source="text_dir", path=str(tmp_path), seq_len=119)).next_sample()


def test_error_bad_stream_arguments():
    src = ListSource(_docs())
    with pytest.raises(DataError, match=r"dp_rank must be in \[0, 2\)"):
        BatchStream(src, 16, dp_rank=2, dp_size=2)
    with pytest.raises(DataError, match="grad_accum must be an integer >= 1"):
        BatchStream(src, 16).next_step(0)
    with pytest.raises(DataError, match="needs data.seq_len >= 128"):
        SyntheticSource(64)
