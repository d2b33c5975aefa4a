"""Lina's gradient scheduler: dense gradients as all-reduce micro-ops that never compete with an all-to-all.

Every dense gradient is cut, as soon as autograd has accumulated it, into chunks of at most
`chunk_bytes` (gradients are never mixed in one chunk, so the chunks are views of `.grad` and need no
copy). A scheduler thread all-reduces the chunks one at a time on a process group of their own
("grad": the world's ranks, separate from the model's collectives, so the chunk order, identical on
every rank, never interleaves with the all-to-alls on a shared group). The policy decides when a
chunk may start:

- `fair` (DDP-like): as soon as it is ready, competing with any all-to-all in flight for the link;
- `priority` (Lina): only while no all-to-all is queued or running, and never inside a backward MoE
  window (from the combine's backward all-to-all to the dispatch's backward all-to-all of the same
  layer), because the next all-to-all is imminent there. An all-to-all therefore waits for at most
  the one chunk already in flight.

`finish()` (after backward) waits for every chunk and divides by the world size, so the result is
the same average gradient as DDP's. The Comm tells the scheduler when each all-to-all begins and ends
(`Comm.listeners`); the ledger's timeline records both kinds of operations for the invariant checker
(`sched/timeline.py`).
"""

from __future__ import annotations

import collections
import threading

import torch
from torch import nn

from lshmoe.distributed.comm import Comm
from lshmoe.distributed.tags import MoEOp, Tag
from lshmoe.moe.param_kinds import is_expert_param, is_node_param

POLICIES = ("fair", "priority")


class GradScheduler:
    def __init__(self, model: nn.Module, comm: Comm, policy: str, chunk_bytes: int):
        assert policy in POLICIES, policy
        self.comm, self.policy, self.chunk_bytes = comm, policy, max(1, chunk_bytes)
        self.params = [
            p for p in model.parameters() if p.requires_grad and not is_expert_param(p) and not is_node_param(p)
        ]  # GradSync reduces those within the node
        self.group = comm.group("grad")
        self._cv = threading.Condition()
        self._queue: collections.deque[tuple[torch.Tensor, str]] = collections.deque()
        self._pending = 0  # chunks enqueued and not yet reduced
        self._a2a_running = 0
        self._window: set[str] = set()  # layers inside their backward MoE window
        self._ready: set[int] = set()
        self._error: BaseException | None = None
        self._stop = False
        self._seq = 0
        self.armed = True  # False while micro-batches before a step's last accumulate (train/loop.py)
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)
        self._thread = threading.Thread(target=self._loop, name="lshmoe-grad-scheduler", daemon=True)
        self._thread.start()
        comm.listeners.append(self)

    # ---------------------------------------------------------------------------- events (main thread)

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.armed or id(p) in self._ready:
            return
        self._ready.add(id(p))
        flat = p.grad.view(-1)
        per = max(1, self.chunk_bytes // flat.element_size())
        with self._cv:
            for start in range(0, flat.numel(), per):
                self._queue.append((flat[start : start + per], Tag.of("grad", "chunk", self._seq)))
                self._seq += 1
                self._pending += 1
            self._cv.notify_all()

    def a2a_begin(self, tag: str, phase: str) -> None:
        with self._cv:
            self._a2a_running += 1
            t = Tag(tag)
            if phase == "backward" and t.is_moe(MoEOp.COMBINE):
                self._window.add(t.layer)

    def a2a_end(self, tag: str, phase: str) -> None:
        with self._cv:
            self._a2a_running -= 1
            t = Tag(tag)
            if phase == "backward" and t.is_moe(MoEOp.DISPATCH):
                self._window.discard(t.layer)
            self._cv.notify_all()

    # ---------------------------------------------------------------------------- scheduler thread

    def _may_start(self) -> bool:
        if not self._queue:
            return False
        return self.policy == "fair" or (self._a2a_running == 0 and not self._window)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._may_start():
                    self._cv.wait()
                if self._stop:
                    return
                chunk, tag = self._queue.popleft()
            try:
                self.comm.all_reduce(chunk, self.group, tag, phase="backward")
            except BaseException as e:  # noqa: BLE001 - surfaced in finish() on the main thread
                with self._cv:
                    self._error, self._pending = e, 0
                    self._cv.notify_all()
                return
            with self._cv:
                self._pending -= 1
                self._cv.notify_all()

    # ---------------------------------------------------------------------------- end of backward

    def finish(self) -> None:
        """Wait for every chunk of this step, then average (divide by the world size)."""
        with self._cv:
            self._window.clear()  # backward is over: nothing is imminent any more
            self._cv.notify_all()
            while self._pending and self._error is None:
                self._cv.wait()
        if self._error is not None:
            raise self._error
        missing = [p for p in self.params if id(p) not in self._ready]
        if missing:
            raise RuntimeError(
                f"{len(missing)} dense parameters got no gradient this step; the scheduler needs "
                "every rank to reduce the same gradients"
            )
        self._ready.clear()
        scale = 1.0 / self.comm.world_size
        for p in self.params:
            p.grad.mul_(scale)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread.is_alive():  # joined, not left to interpreter exit (see Watchdog.stop)
            self._thread.join(timeout=10.0)
        if self in self.comm.listeners:
            self.comm.listeners.remove(self)
