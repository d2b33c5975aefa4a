"""Fused Triton kernels for the memory-bound passes of the layer (LSH compress/restore).

The PyTorch code in `lshmoe.compress` is the reference and the CPU default; the kernels here follow
its contract (`compress/ops.py`) and are tested against it, on CUDA and, under the Triton
interpreter (`TRITON_INTERPRET=1`), on the CPU. Nothing here imports Triton until a kernel is used,
so the package works without it.

Selection (`lsh.kernels`, flag `--kernels`):
- `auto`: the Triton kernels on CUDA tensors when Triton is importable, else PyTorch;
- `triton`: always the kernels (an error when Triton is missing, or on CPU tensors outside the
  interpreter, where Triton cannot run);
- `torch`: always the PyTorch reference.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from lshmoe.errors import UserError

KERNELS = ("auto", "triton", "torch")

__all__ = ["KERNELS", "interpreting", "triton_available", "use_triton"]


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (read by Triton when kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(mode: str, device: torch.device) -> bool:
    """Whether tensors on `device` go through the Triton kernels under selection `mode`."""
    if mode == "torch":
        return False
    if mode == "auto":
        return device.type == "cuda" and triton_available()
    if mode != "triton":
        raise UserError(f"lsh.kernels={mode!r}; choose one of {', '.join(KERNELS)}")
    if not triton_available():
        raise UserError("lsh.kernels=triton needs the triton package (pip install triton); or use --kernels auto")
    if device.type != "cuda" and not interpreting():
        raise UserError(
            f"lsh.kernels=triton on {device.type} tensors needs a CUDA device (or TRITON_INTERPRET=1 for "
            "Triton's CPU interpreter, which is slow and meant for tests); or use --kernels auto"
        )
    return True
