"""Quantized payloads, in one process: the codecs' round-trip bounds and byte layout, the
straight-through all-to-all, and the `lsh+fp8` composition.

Bounds (compress/quant.py): fp8 e4m3 with a power-of-two scale 2^s per (row, 128 channels):
|x - x'| <= 2^-4 |x| + 2^(s-10) (3 mantissa bits; subnormal spacing 2^-9 below 2^-6); int8:
|x - x'| <= 2^(s-1). Each is checked element by element, and each is shown to be attained to within
a factor of two (the bound is not vacuous).
"""

from __future__ import annotations

import math

import pytest
import torch

from lshmoe.compress.quant import BLOCK, CODECS, FP8Codec, Int8Codec
from lshmoe.compress.registry import CompressorContext, build_compressor
from lshmoe.config import Config, LSHConfig, QuantConfig
from lshmoe.distributed.autograd import all_to_all
from lshmoe.distributed.comm import Comm
from lshmoe.distributed.wire import Wire


def _rows(dtype=torch.float32, N=37, D=200) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    x *= torch.logspace(-6, 4, N, dtype=torch.float64)[:, None]  # rows over ten decades
    x[0] = 0.0  # an all-zero row
    x[1, :BLOCK] = 0.0  # a zero block beside a non-zero one
    x[2, 5] = 1e3  # one outlier in a block of small values
    return x.to(dtype)


def _scales(codec, x: torch.Tensor) -> torch.Tensor:
    s = codec.exponents(x).double()
    return torch.exp2(s).repeat_interleave(BLOCK, 1)[:, : x.shape[1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_round_trip_error_is_within_the_format_bound(kind, dtype):
    codec = CODECS[kind]()
    x = _rows(dtype)
    b = codec.encode(x)
    assert b.dtype == torch.uint8 and b.shape == (x.shape[0], x.shape[1] + math.ceil(x.shape[1] / BLOCK))
    y = codec.decode(b, x.shape[1], dtype)
    assert y.dtype == dtype and y.shape == x.shape
    err, xd, scale = (y.double() - x.double()).abs(), x.double(), _scales(codec, x)
    bound = 2.0**-4 * xd.abs() + scale * 2.0**-10 if kind == "fp8" else scale / 2
    if dtype == torch.bfloat16:  # decoding into bf16 rounds once more (8 bits: half an ulp <= 2^-8 |x'|)
        bound = bound + 2.0**-8 * y.double().abs()
    assert (err <= bound * (1 + 1e-12)).all(), float((err / bound.clamp(min=1e-300)).max())
    assert float((err / bound.clamp(min=1e-300)).max()) > 0.5, "the bound should be nearly attained"
    assert torch.equal(y[0], torch.zeros_like(y[0])) and torch.equal(y[1, :BLOCK], torch.zeros_like(y[1, :BLOCK]))


def test_scales_are_powers_of_two_that_fit_the_block_maximum():
    for codec in (FP8Codec(), Int8Codec()):
        x = _rows(torch.float64)
        s = codec.exponents(x)
        amax = torch.nn.functional.pad(x.abs(), (0, 2 * BLOCK - x.shape[1])).view(x.shape[0], 2, BLOCK).amax(-1)
        nz = amax > 0
        assert (amax[nz] / torch.exp2(s[nz].double()) <= codec.qmax).all()
        assert (amax[nz] / torch.exp2(s[nz].double() - 1) > codec.qmax).all(), "the smallest such power of two"


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_encoding_is_row_wise_and_idempotent(kind):
    codec = CODECS[kind]()
    x = _rows()
    b = codec.encode(x)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    assert torch.equal(codec.encode(x[perm]), b[perm])  # so dispatchers may regroup after decoding
    # a decoded row re-encodes to the same values (the two-level dispatcher encodes at each stage;
    # the bytes may differ: a block whose maximum rounded down may get the next smaller scale)
    y = codec.decode(b, x.shape[1], x.dtype)
    assert torch.equal(codec.decode(codec.encode(y), x.shape[1], x.dtype), y)


@pytest.mark.parametrize("bwd", [False, True])
def test_all_to_all_through_a_codec_is_straight_through_and_sends_uint8(bwd):
    comm, codec = Comm.local(), FP8Codec()
    comm.ledger.enable_timeline(8)
    x = _rows().requires_grad_(True)
    n, D = x.shape
    y = all_to_all(x, comm, comm.group("ep"), [n], [n], "moe0.dispatch", Wire(codec, codec if bwd else None))
    assert torch.equal(y, codec.decode(codec.encode(x.detach()), D, x.dtype))
    g = torch.randn(n, D, generator=torch.Generator().manual_seed(2))
    y.backward(g)
    want = codec.decode(codec.encode(g), D, g.dtype) if bwd else g
    assert torch.equal(x.grad, want)
    recs = list(comm.ledger.timeline)
    assert [r.phase for r in recs] == ["forward", "backward"]
    assert recs[0].nbytes == n * (D + 2)  # the uint8 buffer: 200 codes + 2 scale bytes per row
    assert recs[1].nbytes == (n * (D + 2) if bwd else n * D * 4)


def test_quant_compressors_choose_their_directions():
    ctx = CompressorContext(4, 8, 0, 0, Config())
    fp8 = build_compressor("fp8", ctx)
    w = fp8.wires()
    assert (w.dispatch.fwd, w.dispatch.bwd, w.combine.fwd, w.combine.bwd) == (fp8.codec, None, None, fp8.codec)
    allq = build_compressor("int8", CompressorContext(4, 8, 0, 0, Config(quant=QuantConfig(directions="all"))))
    w = allq.wires()
    assert all(c is allq.codec for c in (w.dispatch.fwd, w.dispatch.bwd, w.combine.fwd, w.combine.bwd))
    assert fp8.rows_are_tokens and not build_compressor("lsh", ctx).rows_are_tokens
    noeval = build_compressor("fp8", CompressorContext(4, 8, 0, 0, Config(quant=QuantConfig(eval_quantize=False))))
    assert noeval.active(True) and not noeval.active(False)


def test_lsh_fp8_sends_the_lsh_centroids_through_the_fp8_wire():
    settings = Config(lsh=LSHConfig(target="rate", target_value=0.3))
    ctx = CompressorContext(4, 8, 0, 0, settings)
    both, lsh = build_compressor("lsh+fp8", ctx), build_compressor("lsh", ctx)
    assert both.name == "lsh+fp8" and not both.rows_are_tokens
    assert both.active(True) and lsh.active(True)
    both.set_step(5), lsh.set_step(5)
    rows = torch.randn(40, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    counts = torch.tensor([10, 10, 10, 10])
    p2, c2, m2 = both.compress(rows, counts)
    p1, c1, m1 = lsh.compress(rows, counts)
    assert torch.equal(p2, p1) and torch.equal(c2, c1) and p1.shape[0] < rows.shape[0]
    assert both.wires() == build_compressor("fp8", ctx).wires()
    out = torch.randn_like(p1)
    assert torch.equal(both.restore(out, m2), lsh.restore(out, m1))
    assert set(both.state_dict()) == {"lsh.controller"}
    fresh = build_compressor("lsh+fp8", ctx)
    fresh.load_state_dict(both.state_dict())
    assert torch.equal(
        fresh.state_dict()["lsh.controller"].nan_to_num(-1), both.state_dict()["lsh.controller"].nan_to_num(-1)
    )
    declined = build_compressor("lsh+fp8", CompressorContext(4, 8, 1, 0, Config(lsh=LSHConfig(layers="0"))))
    assert declined.name == "fp8", "a layer LSH declines still sends FP8"
