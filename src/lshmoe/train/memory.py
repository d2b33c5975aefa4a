"""Per-rank memory in the metrics: model state from the local shards, and the process's peak.

    mem_params_bytes   this rank's parameters (under FSDP its shards: the fp32 master weights)
    mem_grads_bytes    its gradients (FSDP: the reduced shards), as they are before the optimizer
                       step frees them
    mem_optim_bytes    its AdamW state (exp_avg, exp_avg_sq, step)
    peak_rss_bytes     on the CPU the highest resident set (VmHWM) since the previous log line, measured
                       from a trimmed heap: glibc's free pages go back (malloc_trim) and the kernel's
                       high-water mark is reset (writing 5 to /proc/self/clear_refs) when an interval
                       starts, so the number is the interval's own peak, not a warm-up step's leftover;
                       on CUDA `torch.cuda.max_memory_allocated`, reset the same way

These are the quantities `lshmoe plan` predicts (lshmoe/plan/memory.py: params.master, grads.local,
optim.adamw); `lshmoe bench memory` sets them side by side. Unsharded working copies, all-gather and
reduce-scatter buffers and activations are transient: they show in the peak, not in the three sums.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lshmoe.train.allocator import _malloc_trim


def _local_bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def grad_bytes(model: nn.Module) -> int:
    """This rank's gradient bytes now (call it after the sync, before `zero_grad` frees them)."""
    return sum(_local_bytes(p.grad) for p in model.parameters())


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer, grads: int | None = None) -> dict[str, int]:
    """This rank's parameter, gradient (`grads`, measured earlier, or now) and optimizer-state bytes."""
    optim = sum(_local_bytes(v) for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))
    return {
        "mem_params_bytes": sum(_local_bytes(p) for p in model.parameters()),
        "mem_grads_bytes": grad_bytes(model) if grads is None else grads,
        "mem_optim_bytes": optim,
    }


class PeakMemory:
    """The peak since `reset()`: VmHWM on the CPU (after a heap trim), allocated bytes on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._trim = None if self.cuda else _malloc_trim()

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if self._trim is not None:
            self._trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:  # not Linux, or not allowed: the peak is then the process's since it started
            pass

    def read(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0


__all__ = ["PeakMemory", "grad_bytes", "state_bytes"]
