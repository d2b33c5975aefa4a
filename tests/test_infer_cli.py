"""`lshmoe infer` end to end: train and save with expert parallelism, then score with both placements."""

from __future__ import annotations

import json
import math

import pytest
from cli_util import TINY, corpus, run

pytestmark = pytest.mark.slow


def test_infer_scores_a_checkpoint_identically_under_both_placements(tmp_path):
    out = tmp_path / "run"
    rc, err, _ = run(
        [
            "train",
            "--nproc",
            "2",
            *TINY,
            "--n-layers",
            "3",
            "--moe-every",
            "1",
            "--num-experts",
            "4",
            "--data",
            str(corpus(tmp_path)),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--steps",
            "6",
            "--save-every",
            "6",
            "--out-dir",
            str(out),
        ]
    )
    assert rc == 0, err
    res = tmp_path / "infer.json"
    rc, err, _ = run(
        [
            "infer",
            "--checkpoint",
            str(out / "checkpoints"),
            "--nproc",
            "2",
            "--compare",
            "--batches",
            "4",
            "--profile-batches",
            "2",
            "--batch-size",
            "2",
            "--out",
            str(res),
        ]
    )
    assert rc == 0, err
    r = json.loads(res.read_text())
    assert r["world_size"] == 2 and r["identical_batches"] == 4
    pop, uni = r["placements"]["popularity"], r["placements"]["uniform"]
    assert pop["batches"] == uni["batches"] == 4 and len(pop["per_layer"]) == 3
    assert math.isfinite(pop["ce_loss"]) and pop["ce_loss"] == uni["ce_loss"]
    assert 0.0 <= pop["accuracy"] <= 1.0 and uni["accuracy"] is None
    assert 1.0 <= pop["load_max_mean"] <= 2.0 and 1.0 <= uni["load_max_mean"] <= 2.0


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--checkpoint", "/nonexistent/ckpt"], "--checkpoint /nonexistent/ckpt: no such checkpoint directory"),
        (["--checkpoint", ".", "--placement", "random"], "infer.placement='random' is not valid; choose one of: popul"),
        (["--checkpoint", ".", "--batches", "0"], "--batches 0: must be >= 1"),
        ([], "the following arguments are required: --checkpoint"),
    ],
)
def test_infer_bad_input_is_one_line(args, needle):
    rc, err, _ = run(["infer", *args])
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
