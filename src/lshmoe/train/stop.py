"""A graceful stop on SIGTERM: what a cluster scheduler sends before it kills a preempted job.

The handler only records the signal. After every step the ranks agree whether any of them has been
asked to stop (one 8-byte all-reduce, phase `metrics`, so it is not counted as the step's
communication): every rank takes the same path even when the signal reaches them at different
times. The loop then saves a checkpoint of the step just done (when the run saves checkpoints) and
raises `lshmoe.errors.Stopped`; the process exits with 128 + SIGTERM = 143, which launchers do not
restart.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch

from lshmoe.distributed.comm import Comm


class StopSignal:
    """Records SIGTERM from installation until `close()`; `agreed(comm)` asks every rank together."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        except ValueError:  # not the main thread (a library user's worker thread): no graceful stop
            self._previous = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def agreed(self, comm: Comm) -> bool:
        """True on every rank when any rank has been asked to stop (a collective: call on all ranks)."""
        if comm.world_size == 1:
            return self.requested
        flag = torch.tensor([int(self.requested)], dtype=torch.int64, device=comm.device)
        comm.all_reduce(flag, comm.group("world"), "ctl.stop", op="max", phase="metrics")
        return bool(int(flag))

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


__all__ = ["StopSignal"]
