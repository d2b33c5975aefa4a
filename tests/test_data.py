"""Text data: which files `--data` reads, how they become documents, the held-out split, the token
cache and its batches. Each "data silently wrong" case of issue 23 is one test here."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_util import corpus, real_docs

from lshmoe.config import DataConfig
from lshmoe.data import load_data
from lshmoe.data.corpus import embedded_corpus
from lshmoe.data.source import open_source
from lshmoe.errors import DataError

TEXT = ("The quick brown fox jumps over the lazy dog. " * 20 + "\n\n") * 30
CPU = torch.device("cpu")


def _docs(path: Path | str, log=lambda m: None) -> list[str]:
    src = open_source(DataConfig(path=str(path)), log)
    return [d for d, _ in src.load(Path("/nonexistent"), log).stream()]


def _load(path, tmp: Path, log=lambda m: None, **kw):
    return load_data(DataConfig(path=str(path), vocab_size=300, cache_dir=str(tmp / "cache"), **kw), log)


def _sentences(n: int) -> list[str]:
    """Real English lines (stdlib docstrings), each once."""
    out = list(dict.fromkeys(ln.strip() for d in real_docs() for ln in d.split("\n") if len(ln.strip()) > 30))
    assert len(out) >= n, "corpus too small"
    return out[:n]


def test_user_corpus_dir_splits_documents_and_says_which_binary_files_it_skips(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.md").write_text("Another document.\n\nWith two paragraphs.")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    said: list[str] = []
    docs = _docs(tmp_path, said.append)
    assert len(docs) > 3 and any("Another document" in d for d in docs)
    assert all("\x00" not in d for d in docs)
    assert any("skipped 1 binary file(s)" in m and "blob.bin" in m for m in said), said


@pytest.mark.parametrize("where", [".cache/corpus", "scratch/.data/texts"])
def test_data_under_a_dot_directory_is_read(tmp_path, where):
    """Before: every path component was checked for a leading dot: "the directory contains no files"."""
    d = tmp_path / where
    d.mkdir(parents=True)
    (d / "a.txt").write_text(TEXT)
    assert len(_docs(d)) >= 2
    assert len(_docs(d / "a.txt")) >= 2


def test_data_given_as_dotdot_is_read(tmp_path, monkeypatch):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(TEXT)
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    assert len(_docs("../texts")) >= 2


def test_hidden_entries_inside_the_directory_are_skipped_and_said(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n" * 300)
    (tmp_path / ".notes.txt").write_text("secret " * 1000)
    said: list[str] = []
    docs = _docs(tmp_path, said.append)
    assert not any("secret" in d or "refs/heads" in d for d in docs)
    assert any("skipped hidden entries" in m and ".git/" in m and ".notes.txt" in m for m in said), said


def test_only_hidden_files_is_one_line(tmp_path):
    (tmp_path / ".a.txt").write_text(TEXT)
    with pytest.raises(DataError, match=r"contains no files \(only hidden entries"):
        _docs(tmp_path)


def test_latin1_file_is_a_named_error_with_offset_and_iconv_hint(tmp_path):
    """Before: non-UTF-8 files in a directory were skipped without a word; a file was called binary."""
    (tmp_path / "good.txt").write_text(TEXT)
    latin = "Caf\xe9 au lait, na\xefve r\xe9sum\xe9.\n".encode("latin-1")
    head = b"plain ascii line\n" * 3
    (tmp_path / "notes.txt").write_bytes(head + latin)
    with pytest.raises(DataError) as e:
        _docs(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "notes.txt" in msg and "is not UTF-8" in msg and "binary" not in msg
    assert f"byte 0xe9 at byte offset {len(head) + 3} (line 4)" in msg, msg
    assert "iconv -f latin1 -t utf-8" in msg
    with pytest.raises(DataError, match=r"^--data \S+notes.txt: is not UTF-8"):
        _docs(tmp_path / "notes.txt")


def test_utf16_is_named_not_binary(tmp_path):
    f = tmp_path / "u16.txt"
    f.write_bytes(TEXT.encode("utf-16"))
    with pytest.raises(DataError, match="is UTF-16 text.*iconv -f utf-16 -t utf-8"):
        _docs(f)


@pytest.mark.parametrize("content, needle", [(b"", "0 documents"), (b"\x00\x01\x02binary\xff", "not a text file")])
def test_bad_data_files(tmp_path, content, needle):
    f = tmp_path / "data.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match=needle):
        _load(f, tmp_path)


def test_directory_with_only_binary(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00\xff" * 100)
    with pytest.raises(DataError, match="only binary"):
        _docs(tmp_path)


def test_a_file_without_blank_lines_is_many_documents_and_validation_is_held_out(tmp_path):
    """Before: one sentence per line = one document, and validation = the training data."""
    lines = _sentences(1500)
    f = tmp_path / "sentences.txt"
    f.write_text("\n".join(lines) + "\n")
    docs = _docs(f)
    assert len(docs) >= 10, len(docs)
    assert "".join(docs).replace("\n", "") == "".join(lines), "documents cut at line ends lose no text"
    data = _load(f, tmp_path)
    tr, va = data.tokens("train"), data.tokens("val")
    assert len(va) > 0 and len(tr) > 5 * len(va)
    # no validation window of 64 tokens occurs in the training stream
    tr_bytes = np.asarray(tr, dtype=np.int32).tobytes()
    for s in range(0, len(va) - 64, max(1, (len(va) - 64) // 20)):
        assert np.asarray(va[s : s + 64], dtype=np.int32).tobytes() not in tr_bytes


def test_two_documents_split_one_each_and_one_document_is_one_line(tmp_path):
    f = tmp_path / "two.txt"
    line = TEXT[:900].replace("\n", " ")
    f.write_text(line * 5 + "\n\n" + line.upper() * 5)  # two paragraphs of one line each
    data = _load(f, tmp_path)
    assert data.meta["splits"]["train"]["documents"] == 1 and data.meta["splits"]["val"]["documents"] == 1
    assert data.tokens("train").tobytes() != data.tokens("val").tobytes()
    one = tmp_path / "one.txt"
    one.write_text("A single short paragraph of text.")
    with pytest.raises(DataError) as e:
        _load(one, tmp_path)
    assert "1 document (33 characters) is too little" in str(e.value) and "at least 2 documents" in str(e.value)


def test_too_little_text_for_the_sequence_length_says_how_much(tmp_path):
    f = tmp_path / "small.txt"
    f.write_text("".join(f"Paragraph {i}: " + TEXT[:60] + "\n\n" for i in range(40)))
    data = _load(f, tmp_path)
    with pytest.raises(DataError) as e:
        data.check_seq_len(10**6)
    msg = str(e.value)
    assert "fewer than model.seq_len+2=1000002" in msg and "characters" in msg and "more" in msg, msg


def test_embedded_corpus_is_real_text():
    docs = embedded_corpus("stdlib")
    assert len(docs) > 3000 and sum(map(len, docs)) > 1_000_000
    assert len(set(docs)) == len(docs)


def test_load_data_is_cached_deterministic_and_split(tmp_path):
    (tmp_path / "corpus.txt").write_text("".join(f"Document {i}. " + TEXT[: 300 + 7 * i] + "\n\n" for i in range(200)))
    path = tmp_path / "corpus.txt"
    said: list[str] = []
    a = load_data(DataConfig(path=str(path), vocab_size=300, cache_dir=str(tmp_path / "c1")), said.append)
    b = load_data(DataConfig(path=str(path), vocab_size=300, cache_dir=str(tmp_path / "c2")))
    assert np.array_equal(a.tokens("train"), b.tokens("train")), "tokenizer not deterministic"
    assert np.array_equal(a.tokens("val"), b.tokens("val")) and a.key == b.key
    assert len(a.tokens("val")) > 0 and len(a.tokens("train")) > 5 * len(a.tokens("val"))
    assert a.vocab_size <= 300 and int(np.max(a.tokens("train"))) < a.vocab_size
    assert sum("building token data" in m for m in said) == 1
    said.clear()
    again = load_data(DataConfig(path=str(path), vocab_size=300, cache_dir=str(tmp_path / "c1")), said.append)
    assert not any("building" in m for m in said), "the second load is from the cache"
    assert np.array_equal(again.tokens("train"), a.tokens("train"))
    x1, y1 = a.train_batch(5, 0, 3, 16, seed=1, device=CPU)
    x2, _ = a.train_batch(5, 0, 3, 16, seed=1, device=CPU)
    x3, _ = a.train_batch(5, 1, 3, 16, seed=1, device=CPU)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1]), "targets are the inputs shifted by one"
    with pytest.raises(DataError, match="seq_len"):
        a.check_seq_len(10**7)


def test_windows_match_a_reference_over_the_token_stream(tmp_path):
    """The memmapped windows equal the windows of the same generator over the whole stream in RAM."""
    from lshmoe.seeding import generator

    data = _load(corpus(tmp_path), tmp_path)
    ids = torch.from_numpy(np.asarray(data.tokens("train"), dtype=np.int64))
    for step in (0, 7):
        g = generator(3, "batch", step, 1)
        starts = torch.randint(0, ids.numel() - 16 - 1, (4,), generator=g)
        ref = torch.stack([ids[s : s + 17] for s in starts])
        x, y = data.train_batch(step, 1, 4, 16, 3, CPU)
        assert torch.equal(x, ref[:, :-1]) and torch.equal(y, ref[:, 1:])
    xv, yv = data.val_batch(1, 0, 2, 2, 16, CPU, 4)
    assert torch.equal(xv[:, 1:], yv[:, :-1])


def test_the_data_package_stands_below_the_training_loop():
    """data imports errors / seeding / config / integrity only (DESIGN.md floors)."""
    root = Path(__file__).parents[1] / "src" / "lshmoe" / "data"
    banned = ("lshmoe.train", "lshmoe.moe", "lshmoe.compress", "lshmoe.distributed", "lshmoe.hf", "lshmoe.models")
    for f in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert not n.startswith(banned), f"{f.name} imports {n}"
    assert os.path.isfile(root.parent / "integrity.py")
