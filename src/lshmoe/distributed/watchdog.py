"""Peer health: heartbeats through the rendezvous store, so a failure names the rank that failed.

Every rank runs a daemon thread that publishes `<wall time> <collectives issued>` under
`lshmoe/<restart>/hb/<rank>` every `interval_s`, and watches the others:

- a rank whose heartbeat is older than `dead_after_s`, or that posted `.../failed/<rank>` (a rank
  that hit an error writes this before exiting), is declared failed: this rank prints one line naming
  it and exits at once, even if its main thread is blocked inside a collective;
- when a collective fails on this rank (a peer's connection closed, or the collective timed out),
  `diagnose()` compares two heartbeat snapshots taken a few intervals apart: a rank whose heartbeat
  stopped has died or hung; a rank that heartbeats but has issued fewer collectives has stalled
  outside them. The result is appended to the `DistError` message.

The store is reached through a dedicated client connection (the same MASTER_ADDR/MASTER_PORT as the
process group), so the watchdog never shares a socket with the main thread. A store connection that
fails (closed or reset: its host process is gone) names the store's host (rank 0, or torchrun's agent
beside it) at once. A call that blocks (a link that is down: TCP keeps retransmitting) is waited for:
a few seconds are ridden out, and when the store has not answered for `dead_after_s` a second thread,
which never touches the network, names it.
Keys carry the restart count (TORCHELASTIC_RESTART_COUNT): torchrun's agent keeps its store across
restarts, and a restarted job must not read the verdicts of the attempt before it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from lshmoe.errors import EXIT_DIST


class Watchdog:
    def __init__(
        self,
        rank: int,
        world_size: int,
        seq: Callable[[], int],
        interval_s: float,
        dead_after_s: float,
        store: dist.Store | None = None,
    ):
        self.rank, self.world_size, self.seq = rank, world_size, seq
        self.interval_s, self.dead_after_s = interval_s, dead_after_s
        self.prefix = f"lshmoe/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"  # see the module docstring
        self.where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        self.store: dist.Store | None = store or self._connect()
        self._own_store = store is None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last_ok = time.time()  # the last store call that answered
        self.store_failed = False  # the last store call raised: best-effort writes are skipped
        self._thread = threading.Thread(target=self._loop, name="lshmoe-watchdog", daemon=True)
        # NOTE: a store call can block far beyond the store's timeout when the link to it is down (seen:
        # `get` on an established connection waited > 30 s with a 5 s timeout), so the verdict on the
        # store is taken by a second thread that never touches the network.
        self._judge = threading.Thread(target=self._judge_loop, name="lshmoe-watchdog-judge", daemon=True)

    # ------------------------------------------------------------------------------ store access

    def _connect(self) -> dist.Store:
        return dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            self.world_size,
            is_master=False,
            timeout=timedelta(seconds=max(5.0, 3 * self.interval_s)),
        )

    def _client(self) -> dist.Store:
        if self.store is None:  # a call timed out: a fresh connection (a late reply must not be misread)
            self.store = self._connect()
        return self.store

    def _call(self, fn: Callable[[dist.Store], object]) -> object:
        if not self._lock.acquire(timeout=max(5.0, 3 * self.interval_s)):
            raise TimeoutError("the store connection is held by a call that does not return")
        try:
            out = fn(self._client())
            self._last_ok, self.store_failed = time.time(), False
            return out
        except Exception as e:
            self.store_failed = True
            if "timed out" in str(e).lower() and self._own_store:
                self.store = None
            raise
        finally:
            self._lock.release()

    def _set(self, key: str, value: str) -> None:
        self._call(lambda st: st.set(self.prefix + key, value))

    def _read(self, key: str) -> str | None:
        def read(st: dist.Store) -> str | None:
            if not st.check([self.prefix + key]):
                return None
            return st.get(self.prefix + key).decode()

        return self._call(read)

    def closed(self) -> str:
        """The verdict when the store's connection closed: its host process has gone."""
        return f"the rendezvous store at {self.where} closed its connection: rank 0 (its host) has failed"

    def unreachable(self, for_s: float | None = None) -> str:
        """The verdict when the store cannot be reached."""
        how_long = f" for {for_s:.0f} s" if for_s is not None else ""
        return (
            f"the rendezvous store at {self.where} (rank 0's node) has been unreachable{how_long}: "
            "rank 0 died or the network to it is down"
        )

    def snapshot(self) -> dict[int, tuple[float, int]]:
        """Last (wall time, collectives issued) of every rank that has heartbeaten."""
        out = {}
        for q in range(self.world_size):
            v = self._read(f"hb/{q}")
            if v:
                t, s = v.split()
                out[q] = (float(t), int(s))
        return out

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> Watchdog:
        self._beat()
        self._thread.start()
        self._judge.start()
        return self

    def stop(self) -> None:
        """Stop and join the thread. NOTE: a daemon thread still inside a store call at interpreter exit is
        unwound by the runtime through C++ frames, which aborts the process ("terminate called without an
        active exception"), so the thread must be gone before the process ends."""
        self._stop.set()
        # with the store gone the process exits at once (os._exit), so there is nothing to wait for
        wait_s = 0.5 if self.store_failed else max(5.0, 3 * self.interval_s) + 1.0
        for t in (self._judge, self._thread):
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout=wait_s)

    def mark_failed(self, reason: str) -> None:
        """Tell the peers this rank is going down, and why (best effort)."""
        if self.store_failed:
            return
        try:
            self._set(f"failed/{self.rank}", reason[:500])
        except Exception:  # noqa: BLE001 - the store may already be gone
            pass

    def _beat(self) -> None:
        self._set(f"hb/{self.rank}", f"{time.time():.3f} {self.seq()}")

    def _loop(self) -> None:
        started = time.time()
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
                verdict = self._check(started)
            except Exception as e:  # noqa: BLE001
                if self._stop.is_set():
                    return
                if "timed out" in str(e).lower() or isinstance(e, TimeoutError):
                    continue  # the link to the store may be down: the judge decides after dead_after_s
                verdict = self.closed()
            if verdict:
                self._exit(verdict)

    def _judge_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            lost_for = time.time() - self._last_ok
            if lost_for >= self.dead_after_s:
                self._exit(self.unreachable(lost_for))

    def _exit(self, verdict: str) -> None:
        if self._stop.is_set():
            return
        print(f"lshmoe: rank {self.rank}: {verdict}; exiting", file=sys.stderr, flush=True)
        if self.rank == 0:  # this process may host the store: give the peers time to read the verdict
            time.sleep(2 * self.interval_s)
        os._exit(EXIT_DIST)

    def post_abort(self, verdict: str) -> None:
        """Share a diagnosed failure so every rank exits with the same verdict (best effort)."""
        if self.store_failed:
            return
        try:
            self._set("abort", f"{verdict} (seen by rank {self.rank})"[:500])
        except Exception:  # noqa: BLE001
            pass

    def _check(self, started: float) -> str | None:
        now = time.time()
        abort = self._read("abort")
        if abort:
            return abort
        for q in range(self.world_size):
            if q == self.rank:
                continue
            failed = self._read(f"failed/{q}")
            if failed:
                return f"rank {q} failed: {failed}"
            hb = self._read(f"hb/{q}")
            last = float(hb.split()[0]) if hb else started
            if now - last > self.dead_after_s:
                return f"rank {q} stopped responding (no heartbeat for {now - last:.0f} s: died, hung or unreachable)"
        return None

    # ------------------------------------------------------------------------------ diagnosis

    def diagnose(self) -> str:
        """Which peer is to blame for a failed collective (takes about three heartbeat intervals)."""
        if self.store_failed:
            return self.unreachable()
        try:
            before = self.snapshot()
            time.sleep(3 * self.interval_s)
            after = self.snapshot()
            for q in range(self.world_size):
                failed = q != self.rank and self._read(f"failed/{q}")
                if failed:
                    return f"rank {q} failed: {failed}"
        except Exception:  # noqa: BLE001
            return self.unreachable()
        silent = [q for q in range(self.world_size) if q != self.rank and before.get(q) == after.get(q)]
        if silent:
            return f"rank {', '.join(map(str, silent))} stopped responding (died or hung)"
        mine = self.seq()
        behind = [q for q, (_, s) in after.items() if q != self.rank and s < mine]
        if behind:
            return "rank " + ", ".join(
                f"{q} stalled ({after[q][1]} collectives issued, this rank {mine})" for q in behind
            )
        return "no peer looks failed; the network or the backend may be at fault"
