"""data.tokenizer: text sources tokenized with a Hugging Face tokenizer; a vocab it overflows is refused."""
from __future__ import annotations

import pytest

pytest.importorskip("tokenizers")

from cli_util import assert_refused, run_cli  # noqa: E402
from distattn.config import load_config  # noqa: E402

TEXTS = ["the river runs under the old stone bridge", "a quiet garden in the summer morning",
         "people walked along the long road to the city"] * 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    root = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"]))
    model_dir = root / "model"
    model_dir.mkdir()
    tok.save(str(model_dir / "tokenizer.json"))
    docs = root / "docs"
    docs.mkdir()
    for i, t in enumerate(TEXTS):
        (docs / f"{i}.txt").write_text(t)
    return model_dir, docs, tok


def test_documents_are_the_tokenizer_ids(corpus):
    from distattn.train.data import build_source
    model_dir, docs, tok = corpus
    cfg = load_config(None, ["data.source=text_dir", f"data.path={docs}", f"data.tokenizer={model_dir}"])
    src = build_source(cfg.data, vocab_size=120)
    got = sorted(tuple(int(x) for x in src[i]) for i in range(len(src)))
    want = sorted(tuple(tok.encode(t, add_special_tokens=False).ids) for t in TEXTS)
    assert got == want
    assert src.vocab_needed() <= 120


def test_tokenized_training_steps(corpus, ranks, tmp_path):
    from train_util import one_step
    model_dir, docs, _ = corpus
    cfg = load_config(None, ["data.source=text_dir", f"data.path={docs}", f"data.tokenizer={model_dir}",
                             "model.vocab_size=120", "data.seq_len=64", "train.steps=2", "train.tensorboard=false",
                             "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2",
                             "model.num_query_groups=1", "model.ffn_hidden_size=64", f"run.output_dir={tmp_path}"])
    losses, _ = ranks(2, one_step, cfg.model_dump(), 2)[0]
    assert all(l > 0 for l in losses)


def test_bad_tokenizer_inputs_are_refused_before_launch(corpus, tmp_path):
    model_dir, docs, _ = corpus
    common = ["--set", "data.source=text_dir", "--set", f"data.path={docs}", "--set",
              f"run.output_dir={tmp_path / 'r'}"]
    assert_refused(run_cli(["train", *common, "--set", f"data.tokenizer={model_dir}", "--set",
                            "model.vocab_size=50"]), "data.tokenizer", "model.vocab_size=50")
    assert_refused(run_cli(["train", *common, "--set", f"data.tokenizer={tmp_path}"]),
                   "data.tokenizer", "tokenizer.json")
    assert_refused(run_cli(["train", "--set", "data.source=synthetic", "--set", f"data.tokenizer={model_dir}",
                            "--set", f"run.output_dir={tmp_path / 'r'}"]), "data.tokenizer", "text sources")
