"""Corrupted inputs on disk: a truncated token cache and a tokenizer file of the wrong format are
detected and rebuilt (saying so), to exactly the data they held; a data file that changes while it is
read is one line naming it, before any rank starts."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from cli_util import TINY, corpus, run

from lshmoe.config import DataConfig
from lshmoe.data import load_data


def _cfg(tmp) -> DataConfig:
    return DataConfig(path=str(corpus(tmp)), vocab_size=300, cache_dir=str(tmp / "cache"))


def _entry(tmp):
    return next(p for p in (tmp / "cache").iterdir() if p.is_dir())


def _load(cfg):
    said: list[str] = []
    data = load_data(cfg, said.append)
    return data, said


def _same(a, b) -> bool:
    return all(np.array_equal(a.tokens(s), b.tokens(s)) for s in ("train", "val"))


def test_truncated_token_ids_are_rebuilt_to_the_same_data(tmp_path):
    cfg = _cfg(tmp_path)
    first, _ = _load(cfg)
    want = {s: np.array(first.tokens(s)) for s in ("train", "val")}
    ids = _entry(tmp_path) / "train.tokens"
    ids.write_bytes(ids.read_bytes()[: ids.stat().st_size // 2])
    again, said = _load(cfg)
    assert any("is damaged (train.tokens has" in m and "rebuilding it" in m for m in said), said
    assert all(np.array_equal(again.tokens(s), want[s]) for s in want)
    _, said = _load(cfg)
    assert not said, "an intact cache is loaded without a word"


@pytest.mark.parametrize(
    "content",
    [
        "hello 0\nworld 1\n",  # a plain vocabulary file (sentencepiece / word-level style)
        json.dumps({"vocab": {"a": 0}, "merges": []}),  # JSON, but not a `tokenizers` file
        "",
    ],
)
def test_a_tokenizer_file_of_the_wrong_format_is_rebuilt(tmp_path, content):
    cfg = _cfg(tmp_path)
    first, _ = _load(cfg)
    tok = _entry(tmp_path) / "tokenizer.json"
    good = tok.read_bytes()
    tok.write_text(content)
    again, said = _load(cfg)
    assert any("is damaged (tokenizer.json" in m for m in said), said
    assert tok.read_bytes() == good and _same(again, first)


def test_an_entry_without_its_manifest_is_rebuilt(tmp_path):
    """A build killed before its last file (the manifest) leaves an entry that is never used."""
    cfg = _cfg(tmp_path)
    first, _ = _load(cfg)
    (_entry(tmp_path) / "manifest.json").unlink()
    again, said = _load(cfg)
    assert any("is damaged (it is incomplete)" in m for m in said), said
    assert _same(again, first)


@pytest.mark.slow
def test_truncated_cache_through_the_cli_with_real_ranks(tmp_path):
    cfg = _cfg(tmp_path)
    _load(cfg)
    ids = _entry(tmp_path) / "train.tokens"
    ids.write_bytes(ids.read_bytes()[:100])
    args = ["train", "--nproc", "2", *TINY, "--data", cfg.path, "--cache-dir", cfg.cache_dir]
    rc, err, _ = run([*args, "--num-experts", "4", "--steps", "2", "--out-dir", str(tmp_path / "out")])
    assert rc == 0, err
    assert err.count("is damaged (train.tokens has 100 bytes") == 1, err  # rebuilt once, before the ranks start


@pytest.mark.slow
def test_a_data_file_that_changes_while_it_is_read_is_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    text = (corpus(tmp_path).read_text() + "\n\n") * 40  # ~0.5 MB: the build takes a while
    (data / "a.txt").write_text(text)
    growing = data / "b.txt"
    growing.write_text(text[:1000])
    stop = threading.Event()

    def writer():  # another program appending to a file of the corpus, all the time
        with open(growing, "a") as fh:
            while not stop.is_set():
                fh.write("more text arrives while the corpus is read.\n")
                fh.flush()
                time.sleep(0.002)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        rc, err, _ = run(
            [
                "train",
                "--nproc",
                "2",
                *TINY,
                "--vocab-size",
                "2000",
                "--data",
                str(data),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--out-dir",
                str(tmp_path / "out"),
            ]
        )
    finally:
        stop.set()
        t.join()
    lines = [ln for ln in err.splitlines() if ln.startswith("lshmoe:")]
    assert rc == 2 and len(lines) == 1, err
    assert f"{growing} changed (" in lines[0] and "while it was read" in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists(), "no rank started"
