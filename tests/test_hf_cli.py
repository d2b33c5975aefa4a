"""`lshmoe train --hf` and `lshmoe export` as a user runs them, on a tiny saved Qwen3-MoE.

Two ranks (EP 2) fine-tune 20 steps on a small English corpus with the checkpoint's own tokenizer:
the loss falls; a run resumed from the step-10 checkpoint ends with exactly the same losses and
validation loss; the exported checkpoint loads in transformers with the trained weights.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from cli_util import corpus, losses, run
from hf_cases import save_checkpoint

ARGS = [
    "--seq-len",
    "16",
    "--batch-size",
    "4",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "2",
    "--eval-every",
    "0",
    "--eval-batches",
    "2",
    "--progress",
    "false",
    "--log-every",
    "5",
    "--nproc",
    "2",
]


@pytest.mark.slow
def test_train_hf_fine_tunes_resumes_exactly_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    src = save_checkpoint(tmp_path / "qwen3", "qwen3_moe")
    data = corpus(tmp_path)
    full, half = tmp_path / "full", tmp_path / "half"
    common = ["train", "--hf", str(src), "--data", str(data), *ARGS, "--keep-last", "0", "--steps", "20"]
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    code, err, _ = run([*common, "--out-dir", str(full), "--save-every", "10", *(["--tensorboard"] * tensorboard)])
    assert code == 0, err
    if tensorboard:  # the metrics as event files too
        assert list((full / "tensorboard").glob("events.out.tfevents.*"))
    lf = losses(full)
    assert sorted(lf) == [5, 10, 15, 20]
    assert lf[20] < lf[5] - 0.3, lf
    # resume from the step-10 checkpoint in a fresh output directory
    code, err, _ = run([*common, "--out-dir", str(half), "--resume", str(full / "checkpoints" / "step_00000010")])
    assert code == 0, err
    assert "resumed from" in err
    lh = losses(half)
    assert lh[15] == lf[15] and lh[20] == lf[20], (lf, lh)
    vf = json.loads((full / "summary.json").read_text())["final_val_loss"]
    vh = json.loads((half / "summary.json").read_text())["final_val_loss"]
    assert vf == vh
    # export: gathered experts, loadable by transformers, holding the trained weights
    out = tmp_path / "exported"
    code, err, _ = run(["export", "--checkpoint", str(full / "checkpoints"), "--hf-out", str(out)])
    assert code == 0, err
    trained = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    orig = AutoModelForCausalLM.from_pretrained(str(src)).state_dict()
    assert trained.keys() == orig.keys()
    assert (out / "tokenizer.json").is_file()
    changed = [k for k in orig if not torch.equal(orig[k], trained[k])]
    assert any(".experts." in k for k in changed) and any("self_attn" in k for k in changed)


def test_train_hf_bad_directory_is_one_line(tmp_path):
    code, err, _ = run(["train", "--hf", str(tmp_path), "--steps", "1"])
    assert code == 2
    assert err.strip().count("\n") == 0 and "no config.json" in err, err
