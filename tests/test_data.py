"""Corpus reading, the validation split, tokenizer determinism and batch determinism."""

from __future__ import annotations

import pytest
import torch

from lshmoe.config import DataConfig
from lshmoe.errors import DataError
from lshmoe.train.corpus import embedded_corpus, user_corpus
from lshmoe.train.data import load_data

TEXT = ("The quick brown fox jumps over the lazy dog. " * 20 + "\n\n") * 30


def test_user_corpus_dir_skips_binary_and_splits_documents(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.md").write_text("Another document.\n\nWith two paragraphs.")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    docs = user_corpus(str(tmp_path))
    assert len(docs) > 3 and any("Another document" in d for d in docs)
    assert all("\x00" not in d for d in docs)


@pytest.mark.parametrize("content, needle", [(b"", "no text"), (b"\x00\x01\x02binary\xff", "not a UTF-8 text file")])
def test_bad_data_files(tmp_path, content, needle):
    f = tmp_path / "data.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match=needle):
        user_corpus(str(f))


def test_directory_with_only_binary(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00\xff" * 100)
    with pytest.raises(DataError, match="only binary"):
        user_corpus(str(tmp_path))


def test_embedded_corpus_is_real_text():
    docs = embedded_corpus("stdlib")
    assert len(docs) > 3000 and sum(map(len, docs)) > 1_000_000
    assert len(set(docs)) == len(docs)


def test_load_data_is_cached_deterministic_and_split(tmp_path):
    (tmp_path / "corpus.txt").write_text("".join(f"Document {i}. " + TEXT[: 300 + 7 * i] + "\n\n" for i in range(200)))
    cfg = DataConfig(path=str(tmp_path / "corpus.txt"), vocab_size=300, cache_dir=str(tmp_path / "c1"))
    a = load_data(cfg)
    b = load_data(DataConfig(path=cfg.path, vocab_size=300, cache_dir=str(tmp_path / "c2")))
    assert torch.equal(a.train_ids, b.train_ids) and torch.equal(a.val_ids, b.val_ids), "tokenizer not deterministic"
    assert a.val_ids.numel() > 0 and a.train_ids.numel() > 10 * a.val_ids.numel() // 2
    assert a.vocab_size <= 300 and int(a.train_ids.max()) < a.vocab_size
    again = load_data(cfg)  # from cache
    assert torch.equal(again.train_ids, a.train_ids)
    x1, y1 = a.train_batch(5, 0, 3, 16, seed=1, device=torch.device("cpu"))
    x2, _ = a.train_batch(5, 0, 3, 16, seed=1, device=torch.device("cpu"))
    x3, _ = a.train_batch(5, 1, 3, 16, seed=1, device=torch.device("cpu"))
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1]), "targets are the inputs shifted by one"
    with pytest.raises(DataError, match="seq_len"):
        a.check_seq_len(10**7)
