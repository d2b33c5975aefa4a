"""Autograd-aware all-to-all through the ledger.

The forward is an uneven-split `all_to_all_single`; its backward is the reverse exchange (splits
swapped) of the incoming gradient, recorded with phase `backward`. Both directions therefore move
exactly the rows the forward moved, which is what makes a compressor in front of the dispatch cut
the backward traffic too.
"""

from __future__ import annotations

import torch

from lshmoe.distributed.comm import Comm, Group


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, comm: Comm, group: Group, out_splits: list[int], in_splits: list[int], tag: str
    ) -> torch.Tensor:
        ctx.comm, ctx.group, ctx.splits, ctx.tag = comm, group, (out_splits, in_splits), tag
        return comm.all_to_all_single(x, out_splits, in_splits, group, tag)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        g = ctx.comm.all_to_all_single(grad.contiguous(), in_splits, out_splits, ctx.group, ctx.tag, phase="backward")
        return g, None, None, None, None, None


def all_to_all(
    x: torch.Tensor, comm: Comm, group: Group, out_splits: list[int], in_splits: list[int], tag: str
) -> torch.Tensor:
    """Differentiable all-to-all of rows: rank r sends `in_splits[q]` rows to rank q."""
    return _AllToAll.apply(x, comm, group, list(out_splits), list(in_splits), tag)
