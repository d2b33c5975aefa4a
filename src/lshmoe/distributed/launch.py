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

The rank named in "the job failed: rank N was the first to fail" is the one whose failure came first,
not the lowest rank that exited: a rank that fails on its own (an exception, a kill) often outlives the
peers it brings down (it tells them through the watchdog, then exits), and the launcher polls in rank
order. So each rank notes when and how it failed in a file of the attempt's own directory
(`note_failure`, FAILURE_DIR_ENV), and the launcher names the earliest failure a rank caused itself
(a peer's failure, DistError or exit status EXIT_DIST, counts only when no rank failed on its own);
a rank that left no note (killed by a signal, died before the loop) counts at the time its exit
was seen.

Stopping: SIGTERM and SIGINT sent to the launcher are forwarded to every rank (SIGTERM: the ranks
save a checkpoint of the current step when the run saves checkpoints, then exit; train/stop.py); ranks
still running `stop_grace_s` later are killed. A rank also ends when its launcher dies, whatever killed
it: the kernel sends it SIGTERM then (PR_SET_PDEATHSIG), so no rank trains on unsupervised.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lshmoe.errors import EXIT_DIST, EXIT_INTERRUPTED, EXIT_NUMERIC, EXIT_STOPPED, EXIT_USER, DistError

# A job that ended with one of these is not restarted: a restart would fail the same way, or was not wanted.
FINAL_STATUSES = (0, EXIT_USER, EXIT_NUMERIC, EXIT_INTERRUPTED, EXIT_STOPPED)
PR_SET_PDEATHSIG = 1
FAILURE_DIR_ENV = "LSHMOE_FAILURE_DIR"  # where the ranks of one attempt note their failures


def note_failure(exc: BaseException) -> None:
    """Note, once per rank, when and how this rank failed, for the launcher that started it (nothing
    outside lshmoe's launcher). A DistError is a peer's failure seen from here."""
    where, rank = os.environ.get(FAILURE_DIR_ENV), os.environ.get("RANK")
    if not where or rank is None:
        return
    path = Path(where) / f"rank{rank}.json"
    if path.exists():
        return
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    note = {"time": time.time(), "peer": isinstance(exc, DistError), "what": f"{type(exc).__name__}: {first}"}
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(note))
        os.replace(tmp, path)
    except OSError:  # the note is a diagnosis; a rank never fails for want of it
        pass


@dataclass(frozen=True, slots=True)
class Failure:
    """One rank's failure as the launcher knows it."""

    rank: int
    time: float  # wall clock: the rank's own note, else when its exit was seen
    code: int | None  # exit status (negative: killed by that signal); None: not exited when the job was stopped
    peer: bool  # caused by another rank's failure
    what: str = ""


def failures(exits: dict[int, tuple[float, int]], notes_dir: Path | None) -> list[Failure]:
    """Every failed rank: those that exited non-zero (`exits`: rank -> (time seen, status)) and those that
    noted a failure in `notes_dir`."""
    notes = {}
    for f in notes_dir.glob("rank*.json") if notes_dir is not None else ():
        try:
            notes[int(f.stem[4:])] = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
    out = []
    for rank in sorted(set(notes) | {r for r, (_, code) in exits.items() if code != 0}):
        seen, code = exits.get(rank, (float("inf"), None))
        note = notes.get(rank)
        if note is not None:
            out.append(Failure(rank, float(note["time"]), code, bool(note["peer"]), str(note.get("what", ""))))
        else:
            out.append(Failure(rank, seen, code, code == EXIT_DIST))
    return out


def first_failure(found: list[Failure]) -> Failure | None:
    """The earliest failure a rank caused itself; the earliest of all when every one was a peer's."""
    own = [f for f in found if not f.peer]
    return min(own or found, key=lambda f: (f.time, f.rank), default=None)


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
    notes = Path(tempfile.mkdtemp(prefix="lshmoe-failures-"))
    try:
        for cmd, extra in zip(cmds, envs, strict=True):
            env = dict(os.environ)
            env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d's warnings with C++ traces, when a peer goes away
            env[FAILURE_DIR_ENV] = str(notes)
            env.update(extra)
            procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent(os.getpid())))
        return _watch(procs, forwarder, grace_s, stop_grace_s, notes)
    except BaseException:
        _stop(procs)
        raise
    finally:
        forwarder.close()
        shutil.rmtree(notes, ignore_errors=True)


def _watch(
    procs: list[subprocess.Popen], forwarder: _Forwarder, grace_s: float, stop_grace_s: float, notes: Path | None = None
) -> int:
    """Wait for the ranks; the first failure gives the others `grace_s` to notice, a forwarded stop
    signal gives them `stop_grace_s`; return the job's exit status (the first failed rank's)."""
    exits: dict[int, tuple[float, int]] = {}  # rank -> (wall time its exit was seen, status)
    fail_time = None
    while True:
        for rank, p in enumerate(procs):
            code = p.poll() if rank not in exits else None
            if code is not None:
                exits[rank] = (time.time(), code)
                if code != 0 and fail_time is None and not forwarder.signal:
                    fail_time = time.monotonic()
        if len(exits) == len(procs):
            break
        if fail_time is not None and time.monotonic() - fail_time > grace_s:
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
    first = first_failure(failures(exits, notes)) if fail_time is not None else None
    if first is not None:
        code = first.code if first.code is not None else next(c for _, c in exits.values() if c != 0)
        if first.code is None:
            how = "stopped by the launcher"
        else:
            how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        if code != EXIT_USER:  # a user error was already reported in one line by rank 0
            what = f"{first.what}; " if first.what else ""
            print(f"lshmoe: the job failed: rank {first.rank} was the first to fail ({what}{how})", file=sys.stderr)
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
