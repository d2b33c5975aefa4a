"""Autograd-aware all-to-all through the ledger.

The forward is an uneven-split `all_to_all_single`; its backward is the reverse exchange (splits
swapped) of the incoming gradient, recorded with phase `backward`. Both directions therefore move
exactly the rows the forward moved, which is what makes a compressor in front of the dispatch cut
the backward traffic too. A `Wire` (distributed/wire.py) encodes either direction as uint8 bytes
(straight-through: the gradient of decode(exchange(encode(x))) is taken as the identity's).
"""

from __future__ import annotations

import torch

from lshmoe.distributed.comm import Comm, Group
from lshmoe.distributed.wire import PLAIN, Wire, send_encoded


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        comm: Comm,
        group: Group,
        out_splits: list[int],
        in_splits: list[int],
        tag: str,
        wire: Wire,
    ) -> torch.Tensor:
        ctx.comm, ctx.group, ctx.splits, ctx.tag, ctx.wire = comm, group, (out_splits, in_splits), tag, wire
        return send_encoded(x, wire.fwd, lambda t: comm.all_to_all_single(t, out_splits, in_splits, group, tag))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        comm, group, tag = ctx.comm, ctx.group, ctx.tag
        g = send_encoded(
            grad.contiguous(),
            ctx.wire.bwd,
            lambda t: comm.all_to_all_single(t, in_splits, out_splits, group, tag, phase="backward"),
        )
        return g, None, None, None, None, None, None


def all_to_all(
    x: torch.Tensor,
    comm: Comm,
    group: Group,
    out_splits: list[int],
    in_splits: list[int],
    tag: str,
    wire: Wire = PLAIN,
) -> torch.Tensor:
    """Differentiable all-to-all of rows: rank r sends `in_splits[q]` rows to rank q (each direction
    through `wire`'s codec when it has one)."""
    return _AllToAll.apply(x, comm, group, list(out_splits), list(in_splits), tag, wire)
