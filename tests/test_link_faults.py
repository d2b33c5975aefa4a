"""Link faults on the emulated 2 x 2 cluster: the veth of node 1 goes down (`ip link set ... down`)
mid-run. Down for less than --timeout-s, training rides it out; down for longer, every rank exits by
itself within the timeout (plus the diagnosis) with one line naming a peer it cannot reach. Never a hang.
Skipped with the reason when namespaces cannot be made (root + iproute2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_util import TINY, corpus

from lshmoe.bench.netns import EmulatedCluster, check_emulation
from lshmoe.config import DataConfig
from lshmoe.data import load_data

REASON = check_emulation()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(REASON is not None, reason=f"emulated cluster unavailable: {REASON}"),
]

TIMEOUT_S = 12
SHORT_DOWN_S = 4  # well below TIMEOUT_S, including TCP's retransmission backoff after the link returns
SLACK_S = 30  # diagnosis (3 heartbeats), a store call's own timeout, process exit, a loaded machine


def _last_step(out: Path) -> int:
    """The step of the newest `train` record in metrics.jsonl (0 before the first)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 200_000))
        tail = fh.read().decode("utf-8", "replace").splitlines()[1:]
    for line in reversed(tail):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind") == "train":
            return rec["step"]
    return 0


def _wait_for_step(out: Path, step: int, procs: list[subprocess.Popen], limit_s: float = 300) -> int:
    t0 = time.monotonic()
    while (s := _last_step(out)) < step:
        assert all(p.poll() is None for p in procs), "a rank exited before the link fault"
        assert time.monotonic() - t0 < limit_s, f"no progress to step {step} in {limit_s} s"
        time.sleep(0.2)
    return s


def _link(cluster: EmulatedCluster, node: int, state: str) -> None:
    subprocess.run(["ip", "-n", cluster.ns(node), "link", "set", cluster.iface(node), state], check=True)


def test_short_link_loss_is_ridden_out_and_a_long_one_ends_every_rank_naming_a_peer(tmp_path):
    data = corpus(tmp_path)
    load_data(DataConfig(path=str(data), vocab_size=300, cache_dir=str(tmp_path / "cache")))  # built once, here
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "lshmoe",
        "train",
        *TINY,
        "--data",
        str(data),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--num-experts",
        "4",
        "--steps",
        "100000",
        "--log-every",
        "1",
        "--out-dir",
        str(out),
        "--timeout-s",
        str(TIMEOUT_S),
        "--heartbeat-s",
        "1",
        "--threads",
        "1",
    ]
    with EmulatedCluster(2, 2, link=None) as cluster:
        port = 28000 + os.getpid() % 500
        logs = [open(tmp_path / f"rank{r}.err", "w+") for r in range(4)]
        procs = [
            subprocess.Popen(
                cluster.exec_prefix(cluster.node_of(r)) + cmd,
                env={**os.environ, **cluster.rank_env(r, port), "TORCH_CPP_LOG_LEVEL": "ERROR"},
                stderr=logs[r],
                stdout=subprocess.DEVNULL,
            )
            for r in range(4)
        ]
        try:
            # 1. down for a few seconds: the job continues
            _wait_for_step(out, 3, procs)
            _link(cluster, 1, "down")
            at_down = _last_step(out)
            time.sleep(SHORT_DOWN_S)
            at_up = _last_step(out)
            _link(cluster, 1, "up")
            assert at_up <= at_down + 1, "every step crosses the link: training paused while it was down"
            resumed = _wait_for_step(out, at_up + 5, procs)
            # and no verdict comes late: the job runs on for longer than the timeout after the outage
            time.sleep(TIMEOUT_S + 5)
            assert all(p.poll() is None for p in procs), "a rank exited after the link came back"
            assert _last_step(out) > resumed

            # 2. down for good: every rank ends by itself, in bounded time
            _link(cluster, 1, "down")
            t_down = time.monotonic()
            exited: dict[int, float] = {}
            while len(exited) < 4 and time.monotonic() - t_down < TIMEOUT_S + SLACK_S + 30:
                for r, p in enumerate(procs):
                    if r not in exited and p.poll() is not None:
                        exited[r] = time.monotonic() - t_down
                time.sleep(0.1)
            assert sorted(exited) == [0, 1, 2, 3], f"ranks still running: {set(range(4)) - set(exited)} (a hang)"
            assert max(exited.values()) < TIMEOUT_S + SLACK_S, exited
            assert min(exited.values()) >= TIMEOUT_S * 0.8, f"a rank gave up before --timeout-s: {exited}"
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    for r, p in enumerate(procs):
        logs[r].seek(0)
        err = logs[r].read()
        logs[r].close()
        assert p.returncode == 3, (r, p.returncode, err)
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[lshmoe]")]  # not info lines
        assert len(lines) == 1 and lines[0].startswith(f"lshmoe: rank {r}:"), (r, err)
        assert "Traceback" not in err and "terminate called" not in err, (r, err)
        # node 0's ranks name node 1's ranks, and node 1's ranks name rank 0 (the store's node)
        peers = ("rank 2", "rank 3", "rank 2, 3") if r < 2 else ("rank 0",)
        assert any(p_ in lines[0].split(":", 2)[2] for p_ in peers), (r, lines[0])
