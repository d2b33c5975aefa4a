"""A stopped job leaves nothing running, as a cluster scheduler stops it.

SIGTERM to `lshmoe train --nproc 2` (what a scheduler sends before SIGKILL) reaches both ranks
through the launcher; they save a checkpoint of the step they are on and exit with 143, and
`--resume auto` then continues from it bitwise where the uninterrupted run goes (GPT-MoE and an HF
model alike). A launcher killed outright takes its ranks with it: they get SIGTERM from the kernel.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_util import corpus, losses, train_args
from hf_cases import save_checkpoint

# a constant learning rate: the schedule must not depend on --steps, so runs of any length compare
CONSTANT_LR = ["--warmup-steps", "0", "--min-lr-ratio", "1", "--eval-every", "0"]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _start(args: list[str], out: Path, at_step: int = 3) -> tuple[subprocess.Popen, list[int]]:
    """Start the job and return (launcher, ranks) once its metrics show `at_step` steps."""
    proc = subprocess.Popen([sys.executable, "-m", "lshmoe", *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        path = out / "metrics.jsonl"
        if path.exists() and max(losses(out) or {0: 0}) >= at_step:
            return proc, _children(proc.pid)
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the job did not reach step 3")


def _gone(pids: list[int], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while any(_running(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _stopped_step(out: Path) -> int:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["step"] for r in recs if r["kind"] == "stopped")


def _job(kind: str, tmp: Path, out: Path, steps: int) -> list[str]:
    if kind == "gpt":
        return train_args(tmp, out, "--nproc", "2", "--save-every", "1000", *CONSTANT_LR, steps=steps)
    src = tmp / "qwen3"
    if not src.exists():
        save_checkpoint(src, "qwen3_moe")
    args = ["train", "--hf", str(src), "--data", str(corpus(tmp)), "--seq-len", "16", "--batch-size", "4"]
    args += ["--progress", "false", "--log-every", "1", "--nproc", "2", "--save-every", "1000", *CONSTANT_LR]
    return args + ["--steps", str(steps), "--out-dir", str(out)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt", "hf"])
def test_sigterm_saves_stops_every_rank_and_resumes_bitwise(tmp_path, kind):
    out = tmp_path / "run"
    proc, ranks = _start(_job(kind, tmp_path, out, steps=5000), out)
    assert len(ranks) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, proc.stderr.read()
    assert _gone(ranks, 10), "a rank outlived its launcher"
    n = _stopped_step(out)
    assert (out / "checkpoints" / "latest").read_text() == f"step_{n:08d}"
    # the same job continues (resume auto), and ends where an uninterrupted run ends
    code = subprocess.run([sys.executable, "-m", "lshmoe", *_job(kind, tmp_path, out, steps=n + 2)]).returncode
    assert code == 0
    ref = tmp_path / "ref"
    code = subprocess.run([sys.executable, "-m", "lshmoe", *_job(kind, tmp_path, ref, steps=n + 2)]).returncode
    assert code == 0
    assert [losses(out)[s] for s in (n + 1, n + 2)] == [losses(ref)[s] for s in (n + 1, n + 2)]


@pytest.mark.slow
def test_ranks_end_when_their_launcher_is_killed(tmp_path):
    out = tmp_path / "run"
    proc, ranks = _start(_job("gpt", tmp_path, out, steps=5000), out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert _gone(ranks, 60), "ranks kept training after their launcher died"
    assert (out / "checkpoints" / "latest").is_file()  # they stopped as on SIGTERM: saved first
