"""Autograd-aware all-to-all through the ledger.

The forward is an uneven-split `all_to_all_single`; its backward is the reverse exchange (splits
swapped) of the incoming gradient, recorded with phase `backward`. Both directions therefore move
exactly the rows the forward moved, which is what makes a compressor in front of the dispatch cut
the backward traffic too. A `Wire` (distributed/wire.py) encodes either direction as uint8 bytes
(straight-through: the gradient of decode(exchange(encode(x))) is taken as the identity's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lshmoe.distributed.comm import Comm, Group
from lshmoe.distributed.wire import PLAIN, Wire, send_encoded


@dataclass(frozen=True, slots=True)
class Exchange:
    """One uneven all-to-all: rank r sends `in_splits[q]` rows to rank q and receives `out_splits[q]`."""

    comm: Comm
    group: Group
    out_splits: list[int]
    in_splits: list[int]
    tag: str
    wire: Wire = PLAIN

    def run(self, x: torch.Tensor, codec, backward: bool = False) -> torch.Tensor:
        """The exchange of `x` (through `codec` when it has one); `backward` swaps the splits."""
        recv, send = (self.in_splits, self.out_splits) if backward else (self.out_splits, self.in_splits)
        phase = "backward" if backward else None
        return send_encoded(
            x, codec, lambda t: self.comm.all_to_all_single(t, recv, send, self.group, self.tag, phase=phase)
        )


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, ex: Exchange) -> torch.Tensor:
        ctx.ex = ex
        return ex.run(x, ex.wire.fwd)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.ex.run(grad.contiguous(), ctx.ex.wire.bwd, backward=True), None


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
    return _AllToAll.apply(x, Exchange(comm, group, list(out_splits), list(in_splits), tag, wire))
