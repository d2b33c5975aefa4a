"""The bad-input catalogue: every entry fails fast with one actionable line (status 2), no traceback."""

from __future__ import annotations

import shutil

import pytest
from cli_util import TINY, corpus, run

pytestmark = pytest.mark.slow


def _one_line(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lshmoe: error:"), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _train(tmp, *extra, nproc=2):
    return run(
        [
            "train",
            "--nproc",
            str(nproc),
            *TINY,
            "--cache-dir",
            str(tmp / "cache"),
            "--num-experts",
            "4",
            "--steps",
            "4",
            "--out-dir",
            str(tmp / "out"),
            *extra,
        ]
    )


def test_empty_data_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    rc, err, _ = _train(tmp_path, "--data", str(tmp_path / "empty.txt"))
    _one_line(rc, err, "empty.txt", "0 documents (0 characters) is too little")


def test_binary_data_file(tmp_path):
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 8)
    rc, err, _ = _train(tmp_path, "--data", str(tmp_path / "blob.txt"))
    _one_line(rc, err, "blob.txt", "not a text file (binary content: NUL bytes)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ck")
    rc, err, _ = _train(tmp, "--data", str(corpus(tmp)), "--d-model", "32", "--save-every", "4")
    assert rc == 0, err
    return tmp, tmp / "out" / "checkpoints" / "step_00000004"


def test_missing_checkpoint(tmp_path):
    rc, err, _ = _train(tmp_path, "--data", str(corpus(tmp_path)), "--resume", str(tmp_path / "nope"))
    _one_line(rc, err, "no such checkpoint directory")


def test_incompatible_checkpoint(checkpoint, tmp_path):
    tmp, ck = checkpoint
    rc, err, _ = _train(tmp_path, "--data", str(corpus(tmp)), "--d-model", "64", "--resume", str(ck))
    _one_line(rc, err, "was saved with model.d_model=32, this run has model.d_model=64")


def test_corrupted_checkpoint_shard(checkpoint, tmp_path):
    tmp, ck = checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(ck, bad)
    shard = sorted(bad.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:64])
    rc, err, _ = _train(tmp_path, "--data", str(corpus(tmp)), "--resume", str(bad))
    _one_line(rc, err, "is corrupted")


def test_corrupted_checkpoint_meta(checkpoint, tmp_path):
    tmp, ck = checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(ck, bad)
    (bad / "meta.json").write_text("{not json")
    rc, err, _ = _train(tmp_path, "--data", str(corpus(tmp)), "--resume", str(bad))
    _one_line(rc, err, "is corrupted", "meta.json")


def test_world_size_that_cannot_host_the_experts(tmp_path):
    rc, err, _ = _train(tmp_path, "--data", str(corpus(tmp_path)), "--nproc", "3")
    _one_line(rc, err, "moe.num_experts=4", "expert-parallel size 3")
