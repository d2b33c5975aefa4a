"""Asynchronous all-to-all whose backward is asynchronous too: a start/wait pair of autograd functions.

    handle = AsyncAllToAll(comm, group, out_splits, in_splits, tag)
    token = handle.start(x)          # issues the exchange, returns at once
    ... other work (it overlaps the transfer) ...
    y = handle.wait(token)           # blocks until the rows arrived

Backward runs the pair in reverse: `wait`'s backward issues the reverse exchange of dy asynchronously
and returns at once; `start`'s backward waits for it and returns dx. Autograd's engine runs the
backward of everything computed between `start` and `wait` in the forward pass (the overlap window)
between those two calls, so the reverse exchange overlaps the window's backward as well.

The token is a zero-size tensor that carries the autograd edge from `start` to `wait`; the handle
object carries the in-flight work. Both directions are recorded in the ledger (phase forward /
backward), with the time spent blocked in `wait` recorded as exposed communication. A `Wire`
encodes either direction as bytes: encoded at issue, decoded at completion (distributed/wire.py).
"""

from __future__ import annotations

import torch

from lshmoe.distributed.comm import Comm, Group, Pending
from lshmoe.distributed.wire import PLAIN, Wire, WireCodec


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, h: AsyncAllToAll) -> torch.Tensor:
        ctx.h = h
        h._fwd_like = (x.shape[-1], x.dtype)
        h._fwd = h.comm.all_to_all_single(
            h.encode(x.contiguous(), h.wire.fwd), h.out_splits, h.in_splits, h.group, h.tag, async_op=True
        )
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, _g: torch.Tensor):
        h = ctx.h
        grad = h.decode(h._bwd.wait(), h.wire.bwd, h._bwd_like) if h._bwd is not None else None
        h._bwd = None
        return grad, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token: torch.Tensor, h: AsyncAllToAll) -> torch.Tensor:
        ctx.h = h
        out = h.decode(h._fwd.wait(), h.wire.fwd, h._fwd_like)
        h._fwd = None
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h = ctx.h
        h._bwd_like = (g.shape[-1], g.dtype)
        g = h.encode(g.contiguous(), h.wire.bwd)
        h._bwd = h.comm.all_to_all_single(g, h.in_splits, h.out_splits, h.group, h.tag, phase="backward", async_op=True)
        return g.new_empty(0), None


class AsyncAllToAll:
    """One differentiable all-to-all split into issue and completion (see the module docstring)."""

    def __init__(
        self, comm: Comm, group: Group, out_splits: list[int], in_splits: list[int], tag: str, wire: Wire = PLAIN
    ):
        self.comm, self.group, self.tag, self.wire = comm, group, tag, wire
        self.out_splits, self.in_splits = list(out_splits), list(in_splits)
        self._fwd: Pending | None = None
        self._bwd: Pending | None = None
        self._fwd_like: tuple[int, torch.dtype] | None = None  # (width, dtype) of what the codec decodes to
        self._bwd_like: tuple[int, torch.dtype] | None = None

    @staticmethod
    def encode(x: torch.Tensor, codec: WireCodec | None) -> torch.Tensor:
        return x if codec is None else codec.encode(x.reshape(x.shape[0], x.shape[-1]))

    @staticmethod
    def decode(y: torch.Tensor, codec: WireCodec | None, like: tuple[int, torch.dtype]) -> torch.Tensor:
        return y if codec is None else codec.decode(y, *like)

    def start(self, x: torch.Tensor) -> torch.Tensor:
        return _Start.apply(x, self)

    def wait(self, token: torch.Tensor) -> torch.Tensor:
        return _Wait.apply(token, self)
