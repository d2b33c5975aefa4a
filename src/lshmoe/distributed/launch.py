"""Local launcher: start N ranks of a command as subprocesses with torchrun's environment.

Each rank is `python -m lshmoe.cli <args>` with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set, exactly what torchrun would provide, so one code path serves both.
The launcher watches its children: when one exits with an error, the others get `grace_s` seconds
to notice on their own (their collectives fail once the peer is gone), then they are terminated.
The launcher returns the first non-zero exit status, or 0. Ctrl-C terminates every rank.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

USER_ERROR_STATUS = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], nproc: int, grace_s: float = 10.0) -> int:
    """Run `python -m lshmoe.cli *argv` on `nproc` local ranks; return the job's exit status."""
    return supervise([[sys.executable, "-m", "lshmoe.cli", *argv]] * nproc, loopback_envs(nproc, nproc), grace_s)


def loopback_envs(world: int, ranks_per_node: int) -> list[dict[str, str]]:
    """torchrun-style environment of every rank of a job on this machine (rendezvous on a free port);
    `ranks_per_node` < world makes consecutive ranks emulated nodes for the topology map."""
    port = free_port()
    return [
        {
            "RANK": str(r),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(r % ranks_per_node),
            "LOCAL_WORLD_SIZE": str(ranks_per_node),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        for r in range(world)
    ]


def supervise(cmds: list[list[str]], envs: list[dict[str, str]], grace_s: float = 10.0) -> int:
    """Start one process per rank (command and extra environment each) and supervise them."""
    procs: list[subprocess.Popen] = []
    for cmd, extra in zip(cmds, envs, strict=True):
        env = dict(os.environ)
        env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d's warnings with C++ traces, when a peer goes away
        env.update(extra)
        procs.append(subprocess.Popen(cmd, env=env))
    first_fail: tuple[int, int] | None = None
    fail_time = 0.0
    try:
        while True:
            codes = [p.poll() for p in procs]
            for rank, code in enumerate(codes):
                if code not in (None, 0) and first_fail is None:
                    first_fail, fail_time = (rank, code), time.monotonic()
            if all(c is not None for c in codes):
                break
            if first_fail is not None and time.monotonic() - fail_time > grace_s:
                _stop(procs)
                break
            time.sleep(0.05)
    except BaseException:
        _stop(procs)
        raise
    if first_fail is not None:
        rank, code = first_fail
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        if code != USER_ERROR_STATUS:  # a user error was already reported in one line by rank 0
            print(f"lshmoe: the job failed: rank {rank} was the first to stop ({how})", file=sys.stderr)
        return 128 - code if code < 0 else code
    return 0


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
