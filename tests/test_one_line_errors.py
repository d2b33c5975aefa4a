"""The one-line errors a fine-tuner met as tracebacks: each input fails before any rank starts with one
line naming the field, file or flag (exit status 2). In this process, as the CLI runs them."""

from __future__ import annotations

import shutil

import pytest
from cli_util import TINY, corpus
from hf_cases import save_checkpoint

from lshmoe.cli import main

HF = ["--seq-len", "16", "--batch-size", "4", "--eval-batches", "1", "--progress", "false"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    src = save_checkpoint(tmp / "qwen3", "qwen3_moe")
    return tmp, src, ["--data", str(corpus(tmp)), "--cache-dir", str(tmp / "cache"), *HF]


def _one_line(capsys, *argv, needles=()) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("[lshmoe]")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("lshmoe: error:"), err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def test_ep_size_not_dividing_the_world_with_hf(hf, capsys):
    tmp, src, common = hf
    _one_line(capsys, "train", "--hf", src, *common, "--nproc", "2", "--ep-size", "3", needles=["moe.ep_size=3",
              "must divide the world size 2"])  # fmt: skip


def test_a_truncated_safetensors_file_is_named(hf, tmp_path, capsys):
    tmp, src, common = hf
    cut = tmp_path / "cut"
    shutil.copytree(src, cut)
    f = cut / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _one_line(capsys, "train", "--hf", cut, *common, "--steps", "1", needles=[f, "truncated", "model.hf"])


@pytest.mark.parametrize("kind", ["gpt", "hf"])
def test_out_dir_naming_a_file(hf, tmp_path, capsys, kind):
    tmp, src, common = hf
    model = ["--hf", src] if kind == "hf" else [*TINY, "--num-experts", "4"]
    (tmp_path / "a-file").write_text("not a directory")
    _one_line(capsys, "train", *model, *common, "--steps", "1", "--out-dir", tmp_path / "a-file",
              needles=[f"train.out_dir={tmp_path / 'a-file'} is a file"])  # fmt: skip


def test_a_yaml_model_hf_of_another_type_names_the_field_and_the_file(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text("model: {hf: 0}\n")
    _one_line(capsys, "train", "--config", f, needles=["model.hf=0", str(f), "no config.json"])


def test_infer_on_an_hf_checkpoint(hf, tmp_path, capsys):
    tmp, src, common = hf
    assert main(["train", "--hf", str(src), *common, "--steps", "2", "--save-every", "2", "--out-dir",
                 str(tmp_path / "run")]) == 0  # fmt: skip
    capsys.readouterr()
    _one_line(capsys, "infer", "--checkpoint", tmp_path / "run" / "checkpoints",
              needles=["a train --hf checkpoint (qwen3_moe)", "lshmoe export"])  # fmt: skip


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--nodes", "0"], "--nodes 0 is out of range; must be a finite number >= 1"),
        (["--nodes", "-2"], "--nodes -2 is out of range"),
        (["--rate", "1.5"], "--rate 1.5 is out of range; must be a finite number > 0 and <= 1"),
        (["--rate", "nan"], "--rate nan is out of range"),
        (["--mfu", "inf"], "--mfu inf is out of range"),
        (["--inter-gbit-per-node", "0"], "--inter-gbit-per-node 0.0 is out of range"),
        (["--moe-every", "13", "--layers", "12"], "--moe-every 13 is out of range; must be <= --layers 12"),
        (["--nodes", "x"], "argument --nodes: invalid int value: 'x'"),
    ],
)
def test_simulate_validates_its_inputs(capsys, argv, needle):
    _one_line(capsys, "simulate", "--preset", "a100-4x8", *argv, needles=[needle])
