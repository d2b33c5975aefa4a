"""Keep a rank's resident memory flat: hand the C heap's free pages back every few steps.

glibc's malloc serves large blocks with mmap and returns them to the system on free, but after the
first such free it raises its mmap threshold to that block's size (up to 32 MiB). From then on the
activation- and gradient-sized tensors a training step allocates and frees come from the heap
arenas, whose free pages mostly stay resident. Measured here (`lshmoe bench soak`, default model, 2
ranks): resident memory grew from ~0.6 GB to ~1.9 GB per rank over the first thousand steps before
levelling off, with or without LSH; one arena (MALLOC_ARENA_MAX=1) did not help. Two remedies kept it
near 0.4 GB: a fixed mmap threshold of 128 KiB (every large block on mmap, whose page faults cost
steps ~10% here) and `malloc_trim(0)` every 10 steps (free pages of every arena returned; a few
milliseconds per call). The trainer does the second (`dist.malloc_trim_every`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _malloc_trim() -> Callable[[], object] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: fn(0)


class HeapTrimmer:
    """Call `step()` once per training step; every `every` steps the heap's free pages go back."""

    def __init__(self, every: int):
        self.every, self.count = every, 0
        self._trim = _malloc_trim() if every > 0 else None

    @property
    def active(self) -> bool:
        return self._trim is not None

    def step(self) -> None:
        if self._trim is None:
            return
        self.count += 1
        if self.count % self.every == 0:
            self._trim()
