"""`lshmoe train --hf` runs the one loop with every loop feature, as a user runs it (real ranks, a tiny
saved Qwen3-MoE, real English text):

- the compressor's state is checkpointed: a run with `--compress auto` (which has switched away from
  identity by the checkpoint) and one with `--lsh-target rate` (whose L controller has adapted)
  resume bitwise where the uninterrupted run goes;
- `--fault kill:1:7 --max-restarts 1` ends with the uninterrupted run's losses;
- `--tensorboard` writes grouped events, read back here;
- a changed `hf/` side file is caught by the checkpoint's manifest;
- a checkpoint saved by 2 ranks resumes on 4 (EP 2 -> 4).
"""

from __future__ import annotations

import json

import pytest
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
    "1",
    "--keep-last",
    "0",
]
# auto decides once, at step 2, on a link it is told is slow: it leaves identity before the checkpoint
AUTO = ["--compress", "auto", "--auto-start", "2", "--auto-every", "0", "--auto-link-gbit", "0.0001"]
AUTO += ["--auto-verify", "false", "--set", "auto.margin=0"]


def _events(path) -> tuple[set[str], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    texts = [t for t in tags.get("tensors", []) if "auto_choice" in t]
    return set(tags.get("scalars", [])), texts


@pytest.mark.slow
def test_hf_run_resumes_its_compressor_restarts_after_a_kill_and_reshards(tmp_path):
    src = save_checkpoint(tmp_path / "qwen3", "qwen3_moe")
    common = ["train", "--hf", str(src), "--data", str(corpus(tmp_path)), *ARGS, *AUTO, "--steps", "10"]
    full, half, killed, wide = (tmp_path / n for n in ("full", "half", "killed", "wide"))
    code, err, _ = run([*common, "--nproc", "2", "--out-dir", str(full), "--save-every", "5", "--tensorboard"])
    assert code == 0, err
    lf = losses(full)
    last = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines() if '"train"' in x][-1]
    choices = {s.get("auto_choice_name") for s in last["layers"].values()}
    assert choices and "identity" not in choices, last["layers"]  # the state a resume must restore
    scalars, texts = _events(full / "tensorboard")
    assert {"train/loss", "train/lr", "comm/a2a_bytes", "comm/a2a_share", "moe/compression_rate"} <= scalars
    assert {"moe/layer_0/compression_rate", "moe/layer_1/load_cv"} <= scalars, sorted(scalars)
    assert texts, "auto's choice is written by name"

    step5 = full / "checkpoints" / "step_00000005"
    code, err, _ = run([*common, "--nproc", "2", "--out-dir", str(half), "--resume", str(step5)])
    assert code == 0, err
    lh = losses(half)
    assert [lh[s] for s in range(6, 11)] == [lf[s] for s in range(6, 11)], (lf, lh)

    code, err, _ = run(
        [*common, "--nproc", "2", "--out-dir", str(killed), "--save-every", "5", "--fault", "kill:1:7"]
        + ["--max-restarts", "1"]
    )
    assert code == 0, err
    assert "restarting the job" in err and "resumed from" in err
    assert losses(killed) == lf

    code, err, _ = run([*common, "--nproc", "4", "--out-dir", str(wide), "--resume", str(step5)])
    assert code == 0, err
    assert "at step 5 (saved by 2 ranks, now 4)" in err
    assert sorted(losses(wide)) == [6, 7, 8, 9, 10]

    config = step5 / "hf" / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"hidden_size": 16', '"hidden_size": 61'))  # same size, other content
    code, err, _ = run([*common, "--nproc", "2", "--out-dir", str(tmp_path / "bad"), "--resume", str(step5)])
    errors = [line for line in err.splitlines() if line.startswith("lshmoe: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "hf/config.json fails its checksum" in errors[0], err


@pytest.mark.slow
def test_hf_run_resumes_the_lsh_rate_controller_bitwise(tmp_path):
    src = save_checkpoint(tmp_path / "qwen3", "qwen3_moe")
    target = ["--compress", "lsh", "--lsh-target", "rate", "--set", "lsh.target_value=0.5"]
    common = ["train", "--hf", str(src), "--data", str(corpus(tmp_path)), *ARGS, *target, "--steps", "8"]
    full, half = tmp_path / "full", tmp_path / "half"
    code, err, _ = run([*common, "--out-dir", str(full), "--save-every", "4"])
    assert code == 0, err
    step4 = full / "checkpoints" / "step_00000004"
    code, err, _ = run([*common, "--out-dir", str(half), "--resume", str(step4)])
    assert code == 0, err
    lf, lh = losses(full), losses(half)
    assert [lh[s] for s in range(5, 9)] == [lf[s] for s in range(5, 9)], (lf, lh)
