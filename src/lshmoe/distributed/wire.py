"""Wire codecs: how a payload's rows are encoded as bytes for one direction of an exchange.

A codec turns each row of a float tensor into a fixed number of bytes and back (`encode(x_ND) ->
bytes_NB` uint8, `decode(bytes_NB, dtype) -> x_ND`). It works row by row, so encoding commutes with
any reordering of rows (the dispatchers regroup after the exchange). The differentiable all-to-all
(`distributed/autograd.py`, `async_autograd.py`) applies a codec around the exchange itself:

    forward   x ─► encode ─► uint8 all-to-all ─► decode ─► y
    backward  dy ─► (encode ─► uint8 all-to-all ─► decode, when the backward direction has a codec) ─► dx

so the ledger records the real uint8 bytes, bit patterns never pass through float arithmetic, and
the gradient is straight-through (the decoded tensor's gradient is handed to the reverse exchange as
if encode/decode were the identity).

`Wire(fwd, bwd)` names the codecs of one exchange (None = rows travel in their own dtype);
`Wires(dispatch, combine)` those of an MoE layer's two exchanges. A compressor chooses them
(`Compressor.wires()`), the layer puts them on the dispatch metadata, the dispatcher hands them to
its all-to-alls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class WireCodec(Protocol):
    name: str

    def row_bytes(self, width: int) -> int:
        """Bytes per encoded row of `width` values."""
        ...

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        """uint8 [N, row_bytes(D)]; row n depends on x_ND[n] only."""
        ...

    def decode(self, bytes_NB: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
        """[N, width] in `dtype` from the encoded rows."""
        ...


@dataclass(frozen=True, slots=True)
class Wire:
    """The codecs of one exchange: its forward direction and its backward (the gradient's) one."""

    fwd: WireCodec | None = None
    bwd: WireCodec | None = None


@dataclass(frozen=True, slots=True)
class Wires:
    """The codecs of an MoE layer's two exchanges (dispatch: tokens to experts; combine: back)."""

    dispatch: Wire = Wire()
    combine: Wire = Wire()


PLAIN = Wire()
NO_WIRES = Wires()


def send_encoded(x: torch.Tensor, codec: WireCodec | None, exchange) -> torch.Tensor:
    """`exchange(t)` on the rows of x, through `codec` when one is given (forward or backward)."""
    if codec is None:
        return exchange(x)
    width = x.shape[-1]
    return codec.decode(exchange(codec.encode(x.reshape(x.shape[0], width))), width, x.dtype)
