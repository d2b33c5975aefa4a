"""A job that restarts itself: lshmoe's launcher with --max-restarts and torchrun's elastic agent with
its --max-restarts both bring a killed job back from the latest checkpoint, and the losses equal an
uninterrupted run bitwise. Both run without --out-dir: the job's own new directory must be the same for
every rank and every restart, or a restart would not find its checkpoints (or its fired faults)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from cli_util import losses, run, train_args

from lshmoe.distributed.launch import FINAL_STATUSES, with_restarts
from lshmoe.train.faults import read_fired

STEPS = 8


def _args(tmp, out, *extra):
    return train_args(tmp, out, "--save-every", "3", "--timeout-s", "60", *extra, steps=STEPS)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    rc, err, _ = run([*_args(tmp, tmp / "out"), "--nproc", "2"], timeout=600)
    assert rc == 0, err
    return tmp, losses(tmp / "out")


def _only_run(cwd):
    """The one directory a job without --out-dir wrote to."""
    (out,) = list((cwd / "runs").iterdir())
    return out


@pytest.mark.slow
def test_max_restarts_survives_a_kill_and_a_kill_during_a_save(uninterrupted, tmp_path):
    tmp, clean = uninterrupted
    # kill rank 1 before step 5 (resume from 3), then rank 0 inside the save of step 6 (resume from 3 again)
    rc, err, _ = run(
        [*_args(tmp, None), "--nproc", "2", "--max-restarts", "3", "--fault", "kill:1:5,killsave:0:6"],
        timeout=900,
        cwd=tmp_path,
    )
    assert rc == 0, err
    out = _only_run(tmp_path)
    assert err.count("a new directory for this job") == 1, err  # named once, by the launcher
    assert err.count(f"writing to runs/{out.name}") == 4, err  # and used by every attempt (3) after it
    assert err.count("lshmoe: restarting the job") == 2, err
    assert [r["fault"] for r in read_fired(out)] == ["kill:1:5", "killsave:0:6"]
    assert err.count("step_00000003 at step 3") == 2, err
    assert losses(out) == clean, "bitwise equal to the uninterrupted run"
    assert (out / "checkpoints" / "latest").read_text() == "step_00000008"


@pytest.mark.parametrize(
    "statuses, restarts, calls, final",
    [
        ([137, 3, 0], 5, 3, 0),  # killed, then a peer's verdict, then success
        ([137, 137, 137], 1, 2, 137),  # restarts spent: the last status
        ([2], 5, 1, 2),  # a user error is not restarted
        ([4], 5, 1, 4),  # nor a numerical stop
        ([130], 5, 1, 130),  # nor Ctrl-C
        ([137], 0, 1, 137),
    ],
)
def test_restart_policy(capsys, statuses, restarts, calls, final):
    seen = []

    def attempt(n):
        seen.append(n)
        return statuses[n]

    assert with_restarts(attempt, restarts) == final
    assert seen == list(range(calls))
    err = capsys.readouterr().err
    assert err.count("restarting the job") == calls - 1
    assert ("giving up" in err) == (final not in FINAL_STATUSES and restarts > 0)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_max_restarts_resumes_from_the_latest_checkpoint(uninterrupted, tmp_path):
    tmp, clean = uninterrupted
    # --resume none on the command line: the restarted workers resume anyway (TORCHELASTIC_RESTART_COUNT > 0);
    # no --out-dir: the workers of both attempts agree on the job's directory through the agent's store
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "--monitor-interval",
        "0.5",
        "-m",
        "lshmoe",
        *_args(tmp, None, "--fault", "kill:1:5", "--resume", "none"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = _only_run(tmp_path)
    assert "step_00000003 at step 3" in proc.stderr, proc.stderr[-3000:]
    assert [r["fault"] for r in read_fired(out)] == ["kill:1:5"]
    assert losses(out) == clean, "bitwise equal to the uninterrupted run"
