"""Quantized payloads (FP8 / INT8 dispatch): the rows travel as bytes plus power-of-two scales.

DeepSeek-V3 (§3.3.3) quantizes the activations to FP8 before the dispatch and the activation gradient
before its exchange towards the experts' down-projections, and keeps both combine directions in
BF16; DeepEP dispatches in FP8 and combines in BF16. In lshmoe's terms (distributed/wire.py):

| exchange          | carries                                   | `quant.directions=deepseek` | `all` |
|-------------------|-------------------------------------------|-----------------------------|-------|
| dispatch forward  | token rows to the experts                 | quantized                   | yes   |
| dispatch backward | d(expert input) back to the tokens        | model dtype                 | yes   |
| combine forward   | expert outputs back to the tokens         | model dtype                 | yes   |
| combine backward  | d(expert output) to the experts           | quantized                   | yes   |

Row format (one row = D values): ceil(D / 128) blocks of 128 channels, each with one power-of-two
scale 2^s. Bytes per row: D codes + ceil(D / 128) exponents (s + 127 as one byte, like UE8M0), so
a row costs D + ceil(D/128) bytes on the wire however wide the model dtype is.
- `fp8`: e4m3 (finite max 448), s = ceil(log2(amax / 448)), code = e4m3(x / 2^s). Per element
  |x - x'| <= 2^-4 |x| (3 mantissa bits, round to nearest) or <= 2^(s-10) below e4m3's smallest
  normal 2^-6 (subnormal spacing 2^-9).
- `int8`: symmetric, s = ceil(log2(amax / 127)), code = round(x / 2^s) in [-127, 127]; |x - x'| <= 2^(s-1).
A block of zeros gets s = 0 (and decodes to zeros); non-finite values are not representable
(the trainer's non-finite-step policy handles them before they would be sent).

The compressor itself keeps every row (M = N) and only chooses the wire codecs; `lsh+fp8` composes it
after LSH so that the centroids travel quantized (compress/compose.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from lshmoe.compress.protocol import CompressorBase, Positions, Stat
from lshmoe.compress.registry import CompressorContext
from lshmoe.distributed.wire import Wire, WireCodec, Wires

BLOCK = 128
_BIAS = 127  # exponent byte = s + 127


@dataclass(frozen=True)
class BlockCodec:
    """Per-row, per-128-channel power-of-two-scaled codes; subclasses choose the code format.
    Stateless: two codecs of one class are equal."""

    name: ClassVar[str] = "block"
    qmax: ClassVar[float] = 1.0

    def row_bytes(self, width: int) -> int:
        return width + math.ceil(width / BLOCK)

    def _to_code(self, q: torch.Tensor) -> torch.Tensor:  # scaled values -> uint8 codes
        raise NotImplementedError

    def _from_code(self, c: torch.Tensor) -> torch.Tensor:  # uint8 codes -> float32 scaled values
        raise NotImplementedError

    def exponents(self, x_ND: torch.Tensor) -> torch.Tensor:
        """s per (row, block) as int32 [N, nb]: the smallest power of two with amax / 2^s <= qmax."""
        N, D = x_ND.shape
        nb = math.ceil(D / BLOCK)
        a = x_ND.detach().float().abs()
        if D % BLOCK:
            a = torch.nn.functional.pad(a, (0, nb * BLOCK - D))
        amax = a.view(N, nb, BLOCK).amax(-1)
        s = torch.ceil(torch.log2(amax / self.qmax))
        return torch.where(amax > 0, s, torch.zeros_like(s)).clamp(-_BIAS, 127).to(torch.int32)

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        N, D = x_ND.shape
        s = self.exponents(x_ND)
        scale = torch.exp2(s.float()).repeat_interleave(BLOCK, 1)[:, :D]
        # NOTE: dividing by a power of two is exact in the input's own dtype, so each value rounds once.
        codes = self._to_code(x_ND.detach() / scale.to(x_ND.dtype))
        return torch.cat([codes, (s + _BIAS).to(torch.uint8)], 1)

    def decode(self, bytes_NB: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
        codes, s = bytes_NB[:, :width], bytes_NB[:, width:].to(torch.int32) - _BIAS
        scale = torch.exp2(s.float()).repeat_interleave(BLOCK, 1)[:, :width]
        return (self._from_code(codes) * scale).to(dtype)


@dataclass(frozen=True)
class FP8Codec(BlockCodec):
    name: ClassVar[str] = "fp8"
    qmax: ClassVar[float] = 448.0  # largest finite e4m3 (float8_e4m3fn)

    def _to_code(self, q: torch.Tensor) -> torch.Tensor:
        return q.clamp(-self.qmax, self.qmax).to(torch.float8_e4m3fn).view(torch.uint8)

    def _from_code(self, c: torch.Tensor) -> torch.Tensor:
        return c.contiguous().view(torch.float8_e4m3fn).float()


@dataclass(frozen=True)
class Int8Codec(BlockCodec):
    name: ClassVar[str] = "int8"
    qmax: ClassVar[float] = 127.0

    def _to_code(self, q: torch.Tensor) -> torch.Tensor:
        return torch.round(q).clamp(-self.qmax, self.qmax).to(torch.int8).view(torch.uint8)

    def _from_code(self, c: torch.Tensor) -> torch.Tensor:
        return c.contiguous().view(torch.int8).float()


CODECS: dict[str, type[BlockCodec]] = {"fp8": FP8Codec, "int8": Int8Codec}


def wires_for(codec: WireCodec, directions: str) -> Wires:
    """The quantized exchanges: DeepSeek-V3's two token->expert directions, or all four."""
    if directions == "all":
        return Wires(dispatch=Wire(codec, codec), combine=Wire(codec, codec))
    return Wires(dispatch=Wire(fwd=codec), combine=Wire(bwd=codec))


class QuantCompressor(CompressorBase):
    """Every row travels (M = N), encoded by `codec` on the exchanges `directions` selects."""

    rows_are_tokens = True

    def __init__(self, codec: BlockCodec, directions: str = "deepseek", eval_quantize: bool = True):
        self.name, self.codec = codec.name, codec
        self._wires, self.eval_quantize = wires_for(codec, directions), eval_quantize

    @property
    def stats(self) -> dict[str, Stat]:
        return {}

    def active(self, training: bool) -> bool:
        return training or self.eval_quantize

    def wires(self) -> Wires:
        return self._wires

    def compress(
        self, rows_ND: torch.Tensor, counts_E: torch.Tensor, positions: Positions | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        return rows_ND, counts_E, None

    def restore(self, out_MD: torch.Tensor, meta: None) -> torch.Tensor:
        return out_MD


def _build(kind: str, ctx: CompressorContext) -> QuantCompressor:
    cfg = ctx.config().quant
    return QuantCompressor(CODECS[kind](), cfg.directions, cfg.eval_quantize)


def build_fp8(ctx: CompressorContext) -> QuantCompressor:
    return _build("fp8", ctx)


def build_int8(ctx: CompressorContext) -> QuantCompressor:
    return _build("int8", ctx)
