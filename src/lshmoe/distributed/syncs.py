"""Counting host synchronisations: the CPU waiting for the GPU's queue to drain, inside a training step.

Each one stalls the launch of further GPU work, so overlap (ScMoE, Lina) only pays when a step has
few. torch's CUDA sync debug mode warns at every synchronising call: a device or stream synchronize,
a blocking device-to-host copy (`.item()`, `.tolist()`, `.cpu()`, `float(t)`), a host-to-device copy
from pageable memory, and ops whose output size depends on data (`nonzero`, `unique`, masked
indexing, `repeat_interleave` without `output_size`, ...). `HostSyncCounter` turns that mode on,
records the warnings instead of printing them, and counts them with their Python call sites; other
warnings raised meanwhile are re-issued when it stops. Without CUDA it counts nothing: CPU work has
no queue to drain. NOTE: an explicit `torch.cuda.synchronize()` is not among the calls the debug mode
flags, so the ledger counts its own (`Comm.host_syncs`, timing `sync`) and the metrics report both.
"""

from __future__ import annotations

import collections
import warnings

import torch

SYNC_MESSAGE = "called a synchronizing CUDA operation"

__all__ = ["HostSyncCounter"]


class HostSyncCounter:
    """`start()` ... `stop()` -> the number of host syncs in between; `sites` counts them by file:line."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and torch.cuda.is_available()
        self.count = 0
        self.sites: collections.Counter[str] = collections.Counter()
        self._catch: warnings.catch_warnings | None = None
        self._log: list[warnings.WarningMessage] = []
        self._prev_mode = 0

    def start(self) -> HostSyncCounter:
        if self._catch is not None:  # a step that raised never stopped its counter
            self.stop()
        self.count, self.sites = 0, collections.Counter()
        if self.enabled:
            self._catch = warnings.catch_warnings(record=True)
            self._log = self._catch.__enter__()
            warnings.simplefilter("always")
            self._prev_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def stop(self) -> int:
        if self._catch is None:
            return self.count
        torch.cuda.set_sync_debug_mode(self._prev_mode)
        self._catch.__exit__(None, None, None)
        self._catch = None
        for w in self._log:
            if SYNC_MESSAGE in str(w.message):
                self.count += 1
                self.sites[f"{w.filename}:{w.lineno}"] += 1
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self._log = []
        return self.count

    def __enter__(self) -> HostSyncCounter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
