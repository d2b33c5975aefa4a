"""The launcher names the rank that failed first, not the lowest rank that exited.

Two real rank processes under `supervise`, failing in a known order: rank 1 fails on its own first but
takes its time to exit (as a rank that tells its peers through the watchdog does), rank 0 fails after it
and exits at once. Polling exits in rank order named rank 0."""

from __future__ import annotations

import os
import sys
import time

import pytest

from lshmoe.distributed.launch import loopback_envs, supervise

RANK = """
import os, sys, time
from lshmoe.errors import DistError
try:
    from lshmoe.distributed.launch import note_failure
except ImportError:  # a launcher without notes
    note_failure = lambda e: None
t0, rank = float(sys.argv[1]), int(os.environ["RANK"])
def at(t):
    time.sleep(max(0.0, t0 + t - time.time()))
if rank == 1:  # fails first, on its own, and exits late
    at(0.5); note_failure(RuntimeError("rank 1 broke")); at(2.0); sys.exit(1)
at(1.0)  # rank 0: fails second, then exits at once
note_failure({exc}); sys.exit({code})
"""


@pytest.mark.parametrize(
    "exc, code, status",
    [
        ('DistError("rank 1 is gone")', 3, 1),  # rank 0 fails because rank 1 did
        ('ValueError("rank 0 broke too")', 1, 1),  # rank 0 fails on its own, but later
    ],
)
def test_the_first_rank_to_fail_is_named_not_the_first_to_exit(capfd, exc, code, status):
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = [{**e, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")} for e in loopback_envs(2, 2)]
    t0 = time.time() + 1.0  # both processes started and importing by then
    cmd = [sys.executable, "-c", RANK.format(exc=exc, code=code), str(t0)]
    rc = supervise([cmd, cmd], env, grace_s=10)
    err = capfd.readouterr().err
    assert "the job failed: rank 1 was the first to fail (RuntimeError: rank 1 broke; exited with status 1)" in err, err
    assert rc == status


def test_a_rank_killed_without_a_note_counts_when_its_exit_was_seen():
    from lshmoe.distributed.launch import Failure, first_failure

    killed = Failure(rank=1, time=10.0, code=-9, peer=False)
    victim = Failure(rank=0, time=10.2, code=3, peer=True, what="DistError: rank 1 is gone")
    assert first_failure([victim, killed]) == killed
    # only peers' failures: the earliest of them
    late = Failure(rank=1, time=11.0, code=3, peer=True)
    assert first_failure([late, victim]) == victim
    assert first_failure([]) is None
