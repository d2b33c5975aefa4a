"""JSONL / parquet / Arrow files and saved datasets through `datasets`, with real text (stdlib
docstrings): the text column is what is trained on (before: JSONL was trained on as raw JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_util import real_docs
from tokenizers import Tokenizer

from lshmoe.config import DataConfig
from lshmoe.data import load_data
from lshmoe.errors import DataError

pytest.importorskip("datasets")


def _rows(n: int = 120) -> list[dict]:
    docs = [d for d in real_docs(100) if 200 < len(d) < 2000][:n]
    return [{"id": i, "body": d} for i, d in enumerate(docs)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(path, tmp: Path, **kw):
    cfg = DataConfig(path=str(path), vocab_size=400, cache_dir=str(tmp / "cache"), **kw)
    return load_data(cfg)


def _text(data, split: str) -> str:
    tok = Tokenizer.from_file(str(data.tokenizer_path))
    return tok.decode([int(i) for i in data.tokens(split)], skip_special_tokens=False)


def test_jsonl_trains_on_the_text_column_not_raw_json(tmp_path):
    rows = _rows()
    data = _load(_jsonl(tmp_path / "a.jsonl", rows), tmp_path, field="body")
    assert data.kind == "text"
    st = data.meta["splits"]
    assert st["train"]["documents"] + st["val"]["documents"] == len(rows), "one document per row"
    text = _text(data, "train") + _text(data, "val")
    assert '"body":' not in text and '{"id"' not in text
    assert rows[0]["body"][:60] in text or rows[0]["body"][:60] in _text(data, "val")


def test_parquet_arrow_and_saved_dataset_give_the_same_tokens_as_jsonl(tmp_path):
    import datasets

    rows = _rows()
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    ref = _load(_jsonl(tmp_path / "a.jsonl", rows), tmp_path, field="body")
    for path in (tmp_path / "a.parquet", arrow, tmp_path / "saved"):
        got = _load(path, tmp_path, field="body")
        for s in ("train", "val"):
            assert np.array_equal(got.tokens(s), ref.tokens(s)), path


def test_a_saved_dataset_dict_keeps_its_own_validation_split(tmp_path):
    import datasets

    rows = _rows()
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:100]), "validation": datasets.Dataset.from_list(rows[100:])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    data = _load(tmp_path / "dd", tmp_path, field="body")
    assert data.meta["splits"]["train"]["documents"] == 100 and data.meta["splits"]["val"]["documents"] == 20
    assert rows[105]["body"][:50] in _text(data, "val") and rows[105]["body"][:50] not in _text(data, "train")


def test_a_missing_field_is_one_line_naming_the_columns(tmp_path):
    f = _jsonl(tmp_path / "a.jsonl", _rows(10))
    with pytest.raises(DataError) as e:
        _load(f, tmp_path)
    msg = str(e.value)
    assert "no column 'text' (data.field, --data-field)" in msg and "id, body" in msg and "\n" not in msg
    with pytest.raises(DataError, match="no column 'txt'.*its columns are: id, body"):
        _load(f, tmp_path, field="txt", format="text")
    with pytest.raises(DataError, match="column 'id' holds .*int64.*not text"):
        _load(f, tmp_path, field="id")


def test_malformed_jsonl_names_the_file(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(DataError, match=r"cannot read \S*bad.jsonl as JSON lines"):
        _load(f, tmp_path)


def test_text_and_table_files_in_one_directory_are_refused(tmp_path):
    _jsonl(tmp_path / "a.jsonl", _rows(10))
    (tmp_path / "README.md").write_text("About this data set.\n")
    with pytest.raises(DataError, match=r"holds both text files \(README.md\) and table files \(a.jsonl\)"):
        _load(tmp_path, tmp_path)


def test_empty_rows_are_skipped_and_said(tmp_path):
    rows = [*_rows(40), {"id": 99, "body": "   "}, {"id": 100, "body": None}]
    said: list[str] = []
    _jsonl(tmp_path / "a.jsonl", rows)
    cfg = DataConfig(path=str(tmp_path / "a.jsonl"), vocab_size=300, field="body", cache_dir=str(tmp_path / "c"))
    data = load_data(cfg, said.append)
    assert data.meta["splits"]["train"]["documents"] + data.meta["splits"]["val"]["documents"] == 40
    assert any("skipped 2 row(s) whose 'body' is empty or null" in m for m in said), said
