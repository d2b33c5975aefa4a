"""Grouped matrix multiply: one matmul per expert over its contiguous block of rows.

    out_NF[rows of group g] = x_ND[rows of group g] @ w_GDF[g]

On CUDA (sm90 and newer) with bfloat16 inputs this uses `torch._grouped_mm` (one kernel for all
groups; the only dtype the kernel takes); everywhere else (CPU, float32, float64, misaligned shapes)
it loops over the groups, which on a CPU is as fast as it gets and keeps float64 exactness for the
reference tests. Groups may be empty.
"""

from __future__ import annotations

import functools

import torch

_FAST_DTYPES = (torch.bfloat16,)


@functools.cache
def _capable(device_index: int) -> bool:
    # NOTE: torch._grouped_mm's bf16 kernel targets Hopper (sm90) and newer; older GPUs take the loop
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def _fast_path_ok(x_ND: torch.Tensor, w_GDF: torch.Tensor) -> bool:
    if not (x_ND.is_cuda and hasattr(torch, "_grouped_mm") and x_ND.dtype in _FAST_DTYPES):
        return False
    if not _capable(x_ND.device.index if x_ND.device.index is not None else torch.cuda.current_device()):
        return False
    # The kernel needs 16-byte aligned row strides on both operands.
    align = 16 // x_ND.element_size()
    return x_ND.shape[-1] % align == 0 and w_GDF.shape[-1] % align == 0


def grouped_mm(x_ND: torch.Tensor, w_GDF: torch.Tensor, counts_G: list[int]) -> torch.Tensor:
    """Multiply each group's rows by its own matrix; `counts_G` gives rows per group in order."""
    assert len(counts_G) == w_GDF.shape[0], (len(counts_G), tuple(w_GDF.shape))
    kind = x_ND.device.type
    if torch.is_autocast_enabled(kind):  # the grouped kernel is not autocast's: cast as autocast would
        dtype = torch.get_autocast_dtype(kind)
        x_ND, w_GDF = x_ND.to(dtype), w_GDF.to(dtype)
    if _fast_path_ok(x_ND, w_GDF):
        # NOTE: from pinned memory, non-blocking: a pageable host-to-device copy would be a host sync
        offs_G = torch.tensor(counts_G, dtype=torch.int32, pin_memory=True).to(x_ND.device, non_blocking=True)
        offs = offs_G.cumsum(0, dtype=torch.int32)
        return torch._grouped_mm(x_ND, w_GDF, offs=offs)
    if len(counts_G) == 1:
        return x_ND @ w_GDF[0]
    # NOTE: unbind, not w_GDF[g]: one backward node stacks the group gradients, where G selects would
    # each materialise a zero-filled [G, D, F] gradient and add them up.
    parts = [xg @ wg for xg, wg in zip(torch.split(x_ND, counts_G), w_GDF.unbind(0), strict=True)]
    return torch.cat(parts) if parts else x_ND.new_empty((0, w_GDF.shape[-1]))
