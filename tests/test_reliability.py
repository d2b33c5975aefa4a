"""Checkpoints, exact resume, resharding, crash-safe saves, rank failures and numerical guards,
through the real CLI with real ranks."""

from __future__ import annotations

import json

import pytest
from cli_util import losses, run, train_args

pytestmark = pytest.mark.slow


def _train(tmp, out, *extra, nproc=2, steps=8):
    return run(train_args(tmp, out, "--nproc", str(nproc), *extra, steps=steps))


def test_resume_after_a_killed_run_reproduces_the_uninterrupted_losses_bitwise(tmp_path):
    rc, err, _ = _train(tmp_path, tmp_path / "full")
    assert rc == 0, err
    rc, err, _ = _train(tmp_path, tmp_path / "crash", "--save-every", "3", "--fault", "kill:1:5", "--timeout-s", "20")
    assert rc != 0 and "rank 1" in err, err
    ck = tmp_path / "crash" / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000003"
    rc, err, _ = _train(tmp_path, tmp_path / "crash", "--save-every", "3", "--resume", "auto")
    assert rc == 0, err
    assert "resumed from" in err and "at step 3" in err
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "crash")
    assert sorted(full) == sorted(resumed) == list(range(1, 9))
    assert all(full[s] == resumed[s] for s in full), (full, resumed)  # bitwise, CPU float32


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    rc, err, _ = _train(tmp_path, tmp_path / "full")
    assert rc == 0, err
    out = tmp_path / "run"
    rc, err, _ = _train(tmp_path, out, "--save-every", "3", "--fault", "killsave:0:6", "--timeout-s", "20")
    assert rc != 0
    ck = out / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000003"
    assert (ck / "step_00000006.tmp").is_dir() and not (ck / "step_00000006").exists()
    rc, err, _ = _train(tmp_path, out, "--save-every", "3", "--resume", "auto")
    assert rc == 0, err
    assert losses(out) == losses(tmp_path / "full")
    assert not (ck / "step_00000006.tmp").exists(), "the next save removes the interrupted one"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000003", "step_00000006", "step_00000008"]


def test_keep_last(tmp_path):
    rc, err, _ = _train(tmp_path, tmp_path / "k", "--save-every", "2", "--keep-last", "2", nproc=1)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "k" / "checkpoints").iterdir()) == [
        "latest",
        "step_00000006",
        "step_00000008",
    ]


@pytest.mark.parametrize("fault, culprit", [("kill:2:4", "rank 2 stopped responding"), ("stall:1:4", "rank 1 stalled")])
def test_a_failed_rank_is_named_and_nobody_hangs(tmp_path, fault, culprit):
    timeout = 8
    rc, err, elapsed = _train(
        tmp_path,
        tmp_path / "f",
        "--fault",
        fault,
        "--timeout-s",
        str(timeout),
        "--num-experts",
        "3",
        nproc=3,
        steps=200,
    )
    assert rc != 0, err
    assert culprit in err, err
    assert "Traceback" not in err
    # start-up (~6 s) + the fault step + the timeout + diagnosis (3 heartbeats) + the launcher's grace,
    # with start-up and diagnosis allowed 3x on a loaded machine (seen: 60 s at load 10 on 2 cores); a
    # hang runs into the 240 s subprocess timeout instead
    assert elapsed < 3 * (6 + 3 + 10) + timeout + 15, elapsed


def test_nan_skip_names_the_layer_and_continues(tmp_path):
    rc, err, _ = _train(tmp_path, tmp_path / "s", "--fault", "nan:1:3")
    assert rc == 0, err
    assert "step 3: non-finite value in the gradient of blocks.1.ffn.experts.w1_GDF; step skipped" in err
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["skipped_steps"] == 1
    assert all(v == v for v in losses(tmp_path / "s").values())


def test_nan_stop_saves_and_exits(tmp_path):
    rc, err, _ = _train(tmp_path, tmp_path / "t", "--fault", "nan:0:3", "--nan-policy", "stop", "--save-every", "100")
    assert rc == 4, err
    lines = [ln for ln in err.splitlines() if ln.startswith("lshmoe: error:")]
    assert len(lines) == 1 and "blocks.1.ffn.experts.w1_GDF at step 3" in lines[0], err
    assert (tmp_path / "t" / "checkpoints" / "latest").read_text() == "step_00000003"


def test_node_bias_checkpoint_resumes_on_the_same_nodes_and_refuses_others(tmp_path):
    out = tmp_path / "nb"
    args = ("--node-bias", "--locality-weight", "0.1", "--save-every", "4")
    rc, err, _ = _train(tmp_path, out, *args, "--ranks-per-node", "1", steps=4)
    assert rc == 0, err
    rc, err, _ = _train(tmp_path, out, *args, "--ranks-per-node", "1", "--resume", "auto", steps=6)
    assert rc == 0 and "resumed from" in err, err
    rc, err, _ = _train(tmp_path, out, *args, "--ranks-per-node", "2", "--resume", "auto", steps=8)
    assert rc == 2 and "per-node router biases (locmoe.node_bias) for 2 nodes; this run has 1 nodes" in err, err
