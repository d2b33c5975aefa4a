"""Local launcher: start N ranks of a command as subprocesses with torchrun's environment.

Each rank is `python -m lshmoe.cli <args>` with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set, exactly what torchrun would provide, so one code path serves both.
The launcher watches its children: when one exits with an error, the others get `grace_s` seconds
to notice on their own (their collectives fail once the peer is gone), then they are terminated.
The launcher returns the first non-zero exit status, or 0. Ctrl-C terminates every rank.

With `max_restarts` N (like torchrun's `--max-restarts`), a job that failed for any reason but a user
error, a numerical stop, a requested stop or Ctrl-C is started again, up to N times, each attempt on a
fresh rendezvous port and with TORCHELASTIC_RESTART_COUNT set as torchrun's agent sets it, so the
ranks resume from the latest checkpoint.

Stopping: SIGTERM and SIGINT sent to the launcher are forwarded to every rank (SIGTERM: the ranks
save a checkpoint of the current step when the run saves checkpoints, then exit; train/stop.py); ranks
still running `stop_grace_s` later are killed. A rank also ends when its launcher dies, whatever killed
it: the kernel sends it SIGTERM then (PR_SET_PDEATHSIG), so no rank trains on unsupervised.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from lshmoe.errors import EXIT_INTERRUPTED, EXIT_NUMERIC, EXIT_STOPPED, EXIT_USER

# A job that ended with one of these is not restarted: a restart would fail the same way, or was not wanted.
FINAL_STATUSES = (0, EXIT_USER, EXIT_NUMERIC, EXIT_INTERRUPTED, EXIT_STOPPED)
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    argv: list[str], nproc: int, grace_s: float = 10.0, max_restarts: int = 0, stop_grace_s: float = 300.0
) -> int:
    """Run `python -m lshmoe.cli *argv` on `nproc` local ranks, restarted up to `max_restarts` times
    after a failure; return the job's exit status. `stop_grace_s`: how long ranks asked to stop may take."""
    cmds = [[sys.executable, "-m", "lshmoe.cli", *argv]] * nproc
    return with_restarts(
        lambda attempt: supervise(cmds, restart_envs(loopback_envs(nproc, nproc), attempt), grace_s, stop_grace_s),
        max_restarts,
    )


def restart_envs(envs: list[dict[str, str]], attempt: int) -> list[dict[str, str]]:
    """The rank environments of attempt `attempt` (0 = the first start), as torchrun's agent numbers them."""
    return [{**env, "TORCHELASTIC_RESTART_COUNT": str(attempt)} for env in envs]


def with_restarts(run_attempt: Callable[[int], int], max_restarts: int) -> int:
    """Call `run_attempt(attempt)` until it succeeds, fails finally (FINAL_STATUSES) or the restarts are
    spent; return the last exit status."""
    attempt = 0
    while True:
        rc = run_attempt(attempt)
        if rc in FINAL_STATUSES or attempt >= max_restarts:
            if rc not in FINAL_STATUSES and max_restarts:
                print(f"lshmoe: giving up after {max_restarts} restart(s) (fault.max_restarts)", file=sys.stderr)
            return rc
        attempt += 1
        print(
            f"lshmoe: restarting the job (restart {attempt} of {max_restarts}); it resumes from the latest checkpoint",
            file=sys.stderr,
            flush=True,
        )


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


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A child's pre-exec hook: the kernel sends it SIGTERM when the launcher dies (Linux)."""

    def hook() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: the launcher's own handlers still forward signals
            return
        if os.getppid() != parent:  # the launcher died before the hook ran
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


class _Forwarder:
    """While installed, SIGTERM and SIGINT to the launcher are passed on to every running rank."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs, self.signal, self.when = procs, 0, 0.0
        self.previous = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGINT)}

    def _forward(self, signum: int, frame: object) -> None:
        if not self.signal:
            self.signal, self.when = signum, time.monotonic()
            what = (
                "SIGTERM: the ranks save (when the run saves checkpoints) and stop"
                if signum == signal.SIGTERM
                else "SIGINT"
            )
            print(f"lshmoe: {what}", file=sys.stderr, flush=True)
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def close(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def supervise(
    cmds: list[list[str]], envs: list[dict[str, str]], grace_s: float = 10.0, stop_grace_s: float = 300.0
) -> int:
    """Start one process per rank (command and extra environment each) and supervise them."""
    procs: list[subprocess.Popen] = []
    forwarder = _Forwarder(procs)
    try:
        for cmd, extra in zip(cmds, envs, strict=True):
            env = dict(os.environ)
            env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d's warnings with C++ traces, when a peer goes away
            env.update(extra)
            procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent(os.getpid())))
        return _watch(procs, forwarder, grace_s, stop_grace_s)
    except BaseException:
        _stop(procs)
        raise
    finally:
        forwarder.close()


def _watch(procs: list[subprocess.Popen], forwarder: _Forwarder, grace_s: float, stop_grace_s: float) -> int:
    """Wait for the ranks; the first failure gives the others `grace_s` to notice, a forwarded stop
    signal gives them `stop_grace_s`; return the job's exit status."""
    first_fail: tuple[int, int] | None = None
    fail_time = 0.0
    while True:
        codes = [p.poll() for p in procs]
        for rank, code in enumerate(codes):
            if code not in (None, 0) and first_fail is None and not forwarder.signal:
                first_fail, fail_time = (rank, code), time.monotonic()
        if all(c is not None for c in codes):
            break
        if first_fail is not None and time.monotonic() - fail_time > grace_s:
            _stop(procs)
            break
        if forwarder.signal and time.monotonic() - forwarder.when > stop_grace_s:
            print(
                f"lshmoe: ranks still running {stop_grace_s:.0f} s after the stop signal; killing them", file=sys.stderr
            )
            _stop(procs)
            break
        time.sleep(0.05)
    if forwarder.signal == signal.SIGINT:
        return EXIT_INTERRUPTED
    if forwarder.signal:
        return EXIT_STOPPED
    if first_fail is not None:
        rank, code = first_fail
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        if code != EXIT_USER:  # a user error was already reported in one line by rank 0
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
