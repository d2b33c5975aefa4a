"""Export and resume without traps, as a fine-tuner meets them, on a tiny saved Qwen3-MoE (one rank,
in this process): a plain fine-tune keeps its weights; every job writes to its own directory; `--resume
auto` continues only a run of the same model and data, says what changed, and refuses a finished
checkpoint; `lshmoe export` never writes into the source model or the checkpoint, refuses a non-empty
directory, and with `--overwrite` leaves no stale shard behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_util import corpus
from hf_cases import save_checkpoint

from lshmoe.cli import main

ARGS = ["--seq-len", "16", "--batch-size", "4", "--eval-batches", "1", "--progress", "false", "--log-every", "2"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("safety")
    src = save_checkpoint(tmp / "qwen3", "qwen3_moe")
    return tmp, src, ["--hf", str(src), "--data", str(corpus(tmp)), "--cache-dir", str(tmp / "cache"), *ARGS]


def _lshmoe(capsys, *argv: str) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _one_line(rc: int, err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("lshmoe: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def finetuned(hf, tmp_path_factory):
    """A plain fine-tune (no --save-every) into a named directory: 4 steps."""
    tmp, src, common = hf
    out = tmp_path_factory.mktemp("ft") / "run"
    assert main(["train", *common, "--steps", "4", "--out-dir", str(out)]) == 0
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


def test_a_plain_fine_tune_writes_to_its_own_directory_and_keeps_its_weights(hf, tmp_path, monkeypatch, capsys):
    tmp, src, common = hf
    monkeypatch.chdir(tmp_path)
    rc, err = _lshmoe(capsys, "train", *common, "--steps", "2")
    assert rc == 0, err
    (run,) = list((tmp_path / "runs").iterdir())
    assert run.name.startswith("qwen3-"), run
    assert f"writing to runs/{run.name} (a new directory for this job" in err
    assert "lr 1e-05 (the fine-tune default; --lr to change), a checkpoint at the end" in err
    assert (run / "checkpoints" / "step_00000002" / "manifest.json").is_file()
    # a second job of the same command is a new run, in a new directory: nothing is resumed
    rc, err = _lshmoe(capsys, "train", *common, "--steps", "2")
    assert rc == 0, err
    assert len(list((tmp_path / "runs").iterdir())) == 2 and "resumed" not in err, err


def test_resume_auto_continues_only_the_same_model_and_data(hf, finetuned, tmp_path, capsys):
    tmp, src, common = hf
    out = tmp_path / "run"
    shutil.copytree(finetuned, out)
    ck = out / "checkpoints" / "step_00000004"
    # the same command again: the checkpoint is finished, one line (it was a re-evaluation, "val loss nan", 0)
    rc, err = _lshmoe(capsys, "train", *common, "--steps", "4", "--out-dir", out)
    _one_line(rc, err, f"{ck} is already at step 4 and train.steps=4: nothing to train", "--steps above 4")
    # other data in the same directory: another run's checkpoint, and the fix
    other = tmp_path / "other.txt"
    other.write_text(corpus(tmp).read_text()[:20000])
    rc, err = _lshmoe(capsys, "train", *common, "--data", other, "--steps", "8", "--out-dir", out)
    _one_line(rc, err, "was trained on other data", str(other), "--resume none", "another --out-dir")
    # another model in the same directory
    mixtral = save_checkpoint(tmp_path / "mixtral", "mixtral")
    rc, err = _lshmoe(capsys, "train", *common, "--hf", mixtral, "--steps", "8", "--out-dir", out)
    _one_line(rc, err, "hf.model_type=qwen3_moe, this run has hf.model_type=mixtral", "--resume none")
    # the same model and data, more steps and other settings: resumed, the changes printed
    rc, err = _lshmoe(
        capsys, "train", *common, "--steps", "6", "--lr", "2e-5", "--batch-size", "2", "--compress", "fp8",
        "--out-dir", out,
    )  # fmt: skip
    assert rc == 0, err
    assert f"resumed from {ck} at step 4" in err
    changed = next(ln for ln in err.splitlines() if "changed since the checkpoint" in ln)
    for change in ("moe.compress identity -> fp8", "train.steps 4 -> 6", "train.batch_size 4 -> 2",
                   "train.lr 1e-05 -> 2e-05"):  # fmt: skip
        assert change in changed, changed
    # a checkpoint named explicitly may continue on new data: said, not refused
    rc, err = _lshmoe(capsys, "train", *common, "--data", other, "--steps", "8", "--resume", ck, "--out-dir",
                      tmp_path / "cont")  # fmt: skip
    assert rc == 0, err
    assert "-> " + str(other) in next(ln for ln in err.splitlines() if "changed since" in ln)


def test_export_never_writes_into_the_source_or_the_checkpoint(hf, finetuned, capsys):
    tmp, src, _ = hf
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    ckpts = finetuned / "checkpoints"
    for out, needle in (
        (src, "is the source model directory of this checkpoint"),
        (ckpts, "lies in the training checkpoint"),
        (ckpts / "step_00000004" / "hf", "lies in the training checkpoint"),
    ):
        for extra in ([], ["--overwrite"]):
            rc, err = _lshmoe(capsys, "export", "--checkpoint", ckpts, "--hf-out", out, *extra)
            _one_line(rc, err, needle)
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before


def test_export_refuses_a_non_empty_directory_and_overwrite_leaves_no_stale_shard(hf, finetuned, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    tmp, src, _ = hf
    ckpts = finetuned / "checkpoints"
    fresh = tmp_path / "fresh"
    rc, err = _lshmoe(capsys, "export", "--checkpoint", ckpts, "--hf-out", fresh)
    assert rc == 0, err
    trained = _weights(fresh)
    # a directory holding an older checkpoint sharded another way (three shards and an index)
    old = tmp_path / "old"
    AutoModelForCausalLM.from_pretrained(str(src)).save_pretrained(str(old), max_shard_size="20KB")
    shards = sorted(p.name for p in old.glob("*.safetensors"))
    assert len(shards) > 1 and (old / "model.safetensors.index.json").is_file()
    rc, err = _lshmoe(capsys, "export", "--checkpoint", ckpts, "--hf-out", old)
    _one_line(rc, err, f"--hf-out {old}: the directory is not empty", "--overwrite")
    rc, err = _lshmoe(capsys, "export", "--checkpoint", ckpts, "--hf-out", old, "--overwrite")
    assert rc == 0, err
    assert sorted(p.name for p in old.glob("*.safetensors")) == ["model.safetensors"]
    assert not (old / "model.safetensors.index.json").exists()
    got = _weights(old)
    assert got.keys() == trained.keys() and all(torch.equal(got[k], trained[k]) for k in got)
    # --dtype casts the weights and says so in config.json
    half = tmp_path / "bf16"
    rc, err = _lshmoe(capsys, "export", "--checkpoint", ckpts, "--hf-out", half, "--dtype", "bfloat16")
    assert rc == 0, err
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(half / "model.safetensors")).values()} == {torch.bfloat16}
