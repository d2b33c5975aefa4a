"""`lshmoe train` end to end: two real gloo ranks for a few steps on the embedded corpus, metrics written."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from cli_util import run, train_args


@pytest.mark.slow
def test_two_rank_cli_run_writes_metrics(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "lshmoe",
        "train",
        "--nproc",
        "2",
        "--steps",
        "6",
        "--log-every",
        "3",
        "--eval-every",
        "3",
        "--eval-batches",
        "2",
        "--d-model",
        "32",
        "--n-layers",
        "2",
        "--n-heads",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--num-experts",
        "4",
        "--d-expert",
        "32",
        "--out-dir",
        str(out),
        "--progress",
        "false",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in recs]
    assert kinds[0] == "config" and kinds[-1] == "summary"
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [3, 6] and [r["step"] for r in evals] == [3, 6]
    for r in train:
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
        assert r["a2a_bytes_fwd"] > 0 and r["a2a_bytes_fwd"] == r["a2a_bytes_bwd"]
        assert 0 < r["comm_share"] <= 1 and r["a2a_time_s"] > 0 and r["allreduce_time_s"] > 0
        assert set(r["expert_load"]) == {"moe1"} and len(r["expert_load"]["moe1"]) == 4
        # two ranks x 4 seqs x 32 tokens x top-2 rows per step, all kept (dropless)
        assert sum(r["expert_load"]["moe1"]) == pytest.approx(2 * 4 * 32 * 2)
        assert r["dropped_tokens"] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and math.isfinite(summary["final_val_loss"])
    assert summary["final_val_loss"] < math.log(4096), "six steps must already beat the uniform predictor"


def test_tensorboard_events_of_a_gpt_run_are_grouped(tmp_path):
    """`--tensorboard` on the GPT-MoE writes event files (it was validated, then ignored, before the
    loops were one): grouped scalars, per-layer values and exact/compressed validation, read back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    code, err, _ = run(train_args(tmp_path, out, "--tensorboard", "--compress", "lsh", "--eval-every", "2", steps=4))
    assert code == 0, err
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "comm/a2a_share", "moe/rows_sent", "moe/compression_rate"} <= scalars
    assert {"eval/val_loss", "eval/val_loss_compressed", "moe/layer_1/compression_rate"} <= scalars, sorted(scalars)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert "moe/layer_1/expert_load" in acc.Tags()["histograms"]
