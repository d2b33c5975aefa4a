"""Checkpoint integrity: the manifest catches every altered, truncated or missing file; `--resume auto`
falls back to the previous complete checkpoint; a full disk fails a save in one line and keeps the
previous checkpoint and `latest` usable (a real 1 MiB tmpfs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from cli_util import losses, run, train_args

from lshmoe import integrity
from lshmoe.train import checkpoint as ckpt


def _fake_checkpoint(root: Path, step: int, sizes=(3000, 5000)) -> Path:
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    for i, n in enumerate(sizes):
        (d / f"__{i}_0.distcp").write_bytes(os.urandom(n))
    (d / ".metadata").write_bytes(os.urandom(200))
    (d / "meta.json").write_text(json.dumps({"format": ckpt.FORMAT, "step": step}))
    integrity.write_manifest(d, {}, step)
    return d


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_names_every_kind_of_damage(tmp_path):
    d = _fake_checkpoint(tmp_path, 3)
    assert integrity.verify(d) is None
    assert set(json.loads((d / "manifest.json").read_text())["files"]) == {
        "__0_0.distcp",
        "__1_0.distcp",
        ".metadata",
        "meta.json",
    }
    shard = d / "__1_0.distcp"
    good = shard.read_bytes()
    _flip(shard, 2500)  # one bit in the middle of the file
    assert integrity.verify(d) == f"checkpoint {d} is corrupted: __1_0.distcp fails its checksum " + (
        "(its content changed after the save)"
    )
    shard.write_bytes(good[:1000])
    assert integrity.verify(d) == f"checkpoint {d} is corrupted: __1_0.distcp is truncated (1000 of 5000 bytes)"
    shard.unlink()
    assert integrity.verify(d) == f"checkpoint {d} is corrupted: __1_0.distcp is missing"
    shard.write_bytes(good)
    assert integrity.verify(d) is None
    (d / "manifest.json").write_text("{")
    assert "manifest.json is unreadable" in integrity.verify(d)
    (d / "manifest.json").unlink()
    assert "is incomplete: it has no manifest.json" in integrity.verify(d)


def test_split_verification_agrees_with_the_whole(tmp_path):
    """Ranks check every W-th file; the minimum of their codes is the first bad file, whatever W."""
    d = _fake_checkpoint(tmp_path, 3, sizes=(100, 200, 300, 400, 500))
    files = integrity.read_manifest(d)
    _flip(d / "__3_0.distcp", 7)
    (d / "__4_0.distcp").write_bytes(b"x")
    whole = integrity.first_problem(d, files)
    for world in (1, 2, 3, 4, 7):
        assert min(integrity.first_problem(d, files, r, world) for r in range(world)) == whole
    assert integrity.explain(d, files, whole).endswith(
        "__3_0.distcp fails its checksum (its content changed after the save)"
    )


def test_candidates_latest_first_then_older_and_a_dangling_latest(tmp_path):
    root = tmp_path / "ck"
    for s in (2, 4, 6):
        _fake_checkpoint(root, s)
    (root / "step_00000008.tmp").mkdir()  # an interrupted save is never a candidate
    (root / "latest").write_text("step_00000004")
    assert [p.name for p in ckpt.candidates(root)] == ["step_00000004", "step_00000002"]
    (root / "latest").write_text("step_00000009")  # points to a checkpoint being replaced
    assert [p.name for p in ckpt.candidates(root)] == ["step_00000006", "step_00000004", "step_00000002"]
    (root / "step_00000006" / "manifest.json").unlink()  # renamed but never committed
    assert [p.name for p in ckpt.candidates(root)] == ["step_00000004", "step_00000002"]


# ------------------------------------------------------------------------------------------ real runs


def _train(tmp, out, *extra, nproc=2, steps=6):
    return run(train_args(tmp, out, "--nproc", str(nproc), "--timeout-s", "60", *extra, steps=steps), timeout=600)


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("lshmoe: error:")]


@pytest.mark.slow
def test_a_flipped_bit_is_detected_and_auto_resume_falls_back(tmp_path):
    out = tmp_path / "run"
    rc, err, _ = _train(tmp_path, out, "--save-every", "3")
    assert rc == 0, err
    first = losses(out)
    ck = out / "checkpoints"
    shard = ck / "step_00000006" / "__1_0.distcp"
    _flip(shard, shard.stat().st_size // 2)

    rc, err, _ = _train(tmp_path, out, "--save-every", "3", "--resume", str(ck / "step_00000006"))
    lines = _error_lines(err)
    assert rc == 2 and len(lines) == 1, err
    assert "step_00000006 is corrupted: __1_0.distcp fails its checksum" in lines[0], err

    rc, err, _ = _train(tmp_path, out, "--save-every", "3", steps=8)  # --resume auto is the default
    assert rc == 0, err
    assert "step_00000006 is corrupted: __1_0.distcp fails its checksum" in err, err
    assert "falling back to the previous complete checkpoint step_00000003" in err, err
    assert "step_00000003 at step 3" in err, err
    again = losses(out)
    assert sorted(again) == list(range(1, 9))
    assert all(again[s] == first[s] for s in range(1, 7)), (first, again)  # steps 4-6 recomputed bitwise
    assert (ck / "latest").read_text() == "step_00000008"
    assert integrity.verify(ck / "step_00000006") is None, "step 6 was saved afresh over the corrupted one"


def _can_mount() -> str | None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "mounting a tmpfs needs root"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_can_mount() is not None, reason="mounting a tmpfs needs root")
def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    mnt = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        ck = mnt / "ck"
        # one checkpoint of this model takes ~0.7 MB: step 3 fits, step 6 fills the disk mid-save
        rc, err, _ = _train(tmp_path, tmp_path / "run", "--save-every", "3", "--ckpt-dir", str(ck))
        lines = _error_lines(err)
        assert rc == 2 and len(lines) == 1, err
        assert "saving checkpoint step_00000006 failed" in lines[0] and "no space left" in lines[0], err
        assert "the previous checkpoint step_00000003 and 'latest' are intact" in lines[0], err
        assert "Traceback" not in err
        assert (ck / "latest").read_text() == "step_00000003"
        assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000003"], "the partial save is removed"
        assert integrity.verify(ck / "step_00000003") is None
        rc, err, _ = _train(tmp_path, tmp_path / "run", "--save-every", "0", "--ckpt-dir", str(ck), steps=5)
        assert rc == 0 and "step_00000003 at step 3" in err, err
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
