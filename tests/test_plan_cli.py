"""`lshmoe plan` through its `main(argv)`: the README's large-model example against the published
Qwen3-30B-A3B config.json (tests/data/plan/), the GPT-MoE path, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lshmoe.errors import UserError
from lshmoe.plan.command import main, parse_size

QWEN3 = str(Path(__file__).parent / "data" / "plan" / "qwen3-30b-a3b.json")
README = ["--seq-len", "1024", "--batch-size", "4", "--gpu-mem", "80GB"]  # the README's example, 80 GB GPUs


def _plan(capsys, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _row(report: dict, **want) -> dict:
    return next(r for r in report["rows"] if all(r[k] == v for k, v in want.items()))


def test_readme_example_does_not_fit_and_a_larger_setting_does(capsys):
    """README: `train --hf ./Qwen3-30B-A3B --nproc 4 --dtype bfloat16`: EP 4 on 4 GPUs, pure bf16, no FSDP."""
    four = _plan(capsys, "--hf", QWEN3, "--nodes", "1", "--gpus-per-node", "4", *README)
    example = _row(four, ep=4, fsdp=False, dtype="bf16-pure", ac="none", micro_batches=1)
    assert not example["fits"] and example["total_bytes"] > 80e9
    # 16 bytes per parameter of fp32-master AdamW: 30.5 B parameters need more than 4 (or 8) such GPUs
    assert four["recommended"] is None and "on 4 GPUs (1 x 4)" in four["recommendation"]
    eight = _plan(capsys, "--hf", QWEN3, "--nodes", "1", "--gpus-per-node", "8", *README)
    assert eight["recommended"] is None and "with fp32 master weights it fits on 2 x 8 GPUs" in eight["recommendation"]
    sixteen = _plan(capsys, "--hf", QWEN3, "--nodes", "2", "--gpus-per-node", "8", *README)
    best = sixteen["recommended"]
    assert best["fits"] and best["total_bytes"] <= sixteen["budget"]["usable_bytes"] < 80e9
    assert best["fsdp"] and best["dtype"] == "bf16-mp"
    assert sixteen["recommendation"].startswith(f"recommended: EP {best['ep']}, FSDP, bf16-mp")


def test_table_output(capsys):
    assert main(["--hf", QWEN3, "--nodes", "2", "--gpus-per-node", "8", *README]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("qwen3_moe: 30.53 B parameters (dense 1.54 B, experts 28.99 B in 48 MoE layers")
    head = ["EP", "FSDP", "dtype", "AC", "N", "mb", "params", "grads", "optim", "activ", "total", "fits"]
    assert out[2].split() == head
    assert out[4].split()[-1] == "yes" and out[-1].startswith("recommended: ")


def test_gpt_moe_config(capsys, tmp_path):
    (tmp_path / "m.yaml").write_text("model: {d_model: 256, n_layers: 4}\nmoe: {num_experts: 8, ep_size: 2}\n")
    report = _plan(capsys, "--config", str(tmp_path / "m.yaml"), "--set", "train.batch_size=2", "--gpus-per-node", "4")
    assert report["model"]["name"] == "gpt-moe (gpt)" and report["workload"]["batch_size"] == 2
    assert {r["ep"] for r in report["rows"]} == {2}  # the config's moe.ep_size
    assert report["workload"]["seq_len"] == 128 and report["recommended"]["fits"]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--gpu-mem", "80XB"], r"--gpu-mem '80XB': not a size > 0"),
        (["--gpu-mem", "0"], r"--gpu-mem '0': not a size > 0"),
        (["--nodes", "0"], r"--nodes '0': must be an integer >= 1"),
        (["--gpus-per-node", "two"], r"--gpus-per-node 'two': must be an integer >= 1"),
        (["--skew", "0.5"], r"--skew '0.5': must be a number in \[1.0, 64.0\]"),
        (["--fragmentation", "0.9"], r"--fragmentation '0.9': must be a number in \[0.0, 0.5\]"),
        (["--grad-accum", "3", "--batch-size", "4"], r"--grad-accum 3: must divide --batch-size 4"),
        (["--ep", "3"], r"--ep 3: must divide the world size 8 and the 128 experts"),
        (["--gpu-mem", "2GiB"], r"--gpu-mem 2GiB: nothing is left after --reserve 2GiB"),
        (["--ac", "some"], r"argument --ac: invalid choice: 'some'"),
        (["--set", "model.d_model=8"], r"--set changes a GPT-MoE config"),
    ],
)
def test_bad_flags_are_one_line(argv, match):
    with pytest.raises(UserError, match=match) as info:
        main(["--hf", QWEN3, *argv])
    assert "\n" not in str(info.value)


def test_bad_sources_are_one_line(tmp_path):
    with pytest.raises(UserError, match=r"one of the arguments --hf --config --gpt is required"):
        main([])
    with pytest.raises(UserError, match=r"no config.json there"):
        main(["--hf", str(tmp_path)])
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    with pytest.raises(UserError, match=r"model_type='llama' is not a supported MoE family"):
        main(["--hf", str(tmp_path)])
    with pytest.raises(UserError, match=r"model.d_model=0"):
        main(["--gpt", "--set", "model.d_model=0"])


def test_parse_size():
    assert parse_size("80GiB", "x") == 80 * 2**30 == parse_size("80", "x") == parse_size("80g", "x")
    assert parse_size("141GB", "x") == 141 * 10**9 and parse_size("1.5 TiB", "x") == int(1.5 * 2**40)
