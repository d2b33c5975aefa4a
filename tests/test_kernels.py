"""Fused Triton LSH kernels against the PyTorch reference (lshmoe.compress).

Without a GPU the kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set before a
kernel is defined, so it is set here, before lshmoe.compress.kernels.lsh is imported (no other test module
imports Triton). With a GPU the same tests run natively on CUDA and the CPU cases are skipped.

Bitwise comparisons of bucket ids use dyadic rows and projections (few mantissa bits), so every
projection x R is exact in float32 whatever the summation order: ids then cannot differ by rounding,
only by a wrong kernel. Float results are compared with a float64 reference of the same (rounded) inputs, as the largest
error relative to the largest reference entry: float64 1e-12, float32 1e-5, bfloat16 2^-6 (the
kernels round once into bf16, a few bf16 roundings stack up through the stand-in expert's matmul).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from lshmoe.compress import ops  # noqa: E402
from lshmoe.compress.hashing import codes_from_projections, combine_codes, draw_projections  # noqa: E402
from lshmoe.compress.kernels import lsh as K  # noqa: E402
from lshmoe.compress.kernels import use_triton  # noqa: E402
from lshmoe.compress.lsh import LSHCompressor  # noqa: E402
from lshmoe.compress.protocol import Positions  # noqa: E402
from lshmoe.config import LSHConfig  # noqa: E402
from lshmoe.errors import UserError  # noqa: E402

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter run is for CPU-only")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2**-6}


def dyadic(shape, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-32, 33, shape, generator=g) / 8.0).to(device=device, dtype=dtype)


def dyadic_compressor(cfg: LSHConfig, E: int, D: int, device: str, causal: bool = False) -> LSHCompressor:
    """A compressor whose cached projections are rounded to multiples of 1/64 (exact products)."""
    comp = LSHCompressor(cfg, E, D, layer_id=0, seed=3, causal=causal)
    R = comp.projections(torch.device(device))
    R.copy_((R * 64).round() / 64)
    return comp


def close(a: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """max |a - ref| <= TOL[dtype] * max |ref| (shapes equal)."""
    assert a.shape == ref.shape, (a.shape, ref.shape)
    if ref.numel():
        err, scale = (a.double() - ref.double()).abs().max().item(), ref.double().abs().max().item()
        assert err <= TOL[dtype] * max(scale, 1e-30), (err, scale, dtype)


# ------------------------------------------------------------------------------------- bucket ids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "family,buckets,center,dtype",
    [
        ("cross_polytope", 4, False, torch.float32),
        ("cross_polytope", 8, True, torch.bfloat16),
        ("hyperplane", 4, False, torch.bfloat16),
        ("hyperplane", 8, True, torch.float32),
    ],
)
@pytest.mark.parametrize("counts", [(40, 0, 57), (1,), (0, 0)], ids=["empty-group", "one-row", "no-rows"])
def test_compress_ids_match_reference(device, family, buckets, center, dtype, counts):
    E, D = len(counts), 37  # D not a power of two
    counts_E = torch.tensor(counts, device=device)
    rows = dyadic((sum(counts), D), device, dtype)
    out = {}
    for kernels in ("torch", "triton"):
        cfg = LSHConfig(family=family, buckets_per_hash=buckets, num_hashes=3, center=center, kernels=kernels)
        comp = dyadic_compressor(cfg, E, D, device)
        out[kernels] = comp.compress(rows, counts_E)
    (c_ref, sent_ref, m_ref), (c, sent, m) = out["torch"], out["triton"]
    assert torch.equal(m.full_codes_N, m_ref.full_codes_N)
    assert torch.equal(m.inverse_N, m_ref.inverse_N)
    assert torch.equal(sent.cpu(), sent_ref.cpu())
    assert c.shape == c_ref.shape and c.dtype == rows.dtype
    if c.numel():
        ref = ops.segment_mean(rows.double(), m_ref.inverse_N, torch.bincount(m_ref.inverse_N))
        close(c, ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_bucket_kernel_ties_and_zeros(device):
    """Exact ties of |z| and zero projections: the first largest axis wins, zero counts as positive
    (cross-polytope) and as a 0 bit (hyperplane), as in the reference."""
    z = torch.tensor([[1.0, -1.0], [0.0, 0.0], [-2.0, 2.0], [0.0, -0.5]], device=device).repeat(1, 3).view(4, 3, 2)
    expert = torch.zeros(4, dtype=torch.int64, device=device)
    for family in ("cross_polytope", "hyperplane"):
        full, key, hist = K.bucket_ids(z, expert, family, 4, 3, 1)
        assert torch.equal(full, combine_codes(codes_from_projections(z, family), 4))
        assert torch.equal(hist.long(), torch.bincount(key, minlength=64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_hashes", [1, 5])
def test_project_and_prefix_keys(device, num_hashes):
    """Kernel projection equals x R exactly on dyadic inputs; keys use the first num_hashes digits."""
    N, D, L = 70, 100, 5
    x = dyadic((N, D), device, seed=1)
    R = draw_projections("cross_polytope", D, L, 4, torch.Generator().manual_seed(0))
    R = ((R * 64).round() / 64).to(device)
    z = K.project(x, R.reshape(D, -1))
    assert torch.equal(z, x @ R.reshape(D, -1))
    expert = torch.repeat_interleave(torch.arange(2, device=device), torch.tensor([30, 40], device=device))
    full, key, hist = K.bucket_ids(z.view(N, L, 2), expert, "cross_polytope", 4, num_hashes, 2)
    span = 4**num_hashes
    assert torch.equal(key, expert * span + full % span)
    inverse, size, sent = K.compact(key, hist, 2)
    uniq, inv_ref, size_ref = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
    assert torch.equal(inverse, inv_ref) and torch.equal(size, size_ref)
    assert torch.equal(sent, torch.bincount(uniq // span, minlength=2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["earliest", "split"])
@pytest.mark.parametrize("target", ["none", "rate"])
def test_causal_compress_matches_reference(device, mode, target):
    """`lsh.causal`: the fused path's buckets, payload order and counts equal the reference's bitwise
    (split: the same sub-buckets; earliest: the same buckets), the payload rows, restore and gradients
    within tolerance; rows of 5 sequences routed to 3 experts, as the layer orders them."""
    E, D, Bq, S, K = 3, 37, 5, 12, 2
    g = torch.Generator().manual_seed(9)
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(Bq * S)])
    perm_N = torch.sort(ids_TK.reshape(-1), stable=True).indices
    counts_E = torch.bincount(ids_TK.reshape(-1), minlength=E).to(device)
    token_N = (perm_N // K).to(device)
    at = Positions(token_N // S, token_N % S)
    x = dyadic((Bq * S, D), device, torch.float64, seed=2).index_select(0, token_N)
    g_y = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device)
    res = {}
    for kernels in ("torch", "triton"):
        cfg = LSHConfig(
            num_hashes=3, buckets_per_hash=2, causal_mode=mode, target=target, compensation="identity", kernels=kernels
        )
        comp = dyadic_compressor(cfg, E, D, device, causal=True)
        comp.set_step(0)
        rows = x.clone().requires_grad_(True)
        for _ in range(2):  # a second step: the rate target chooses from the first one's rates
            payload, sent, meta = comp.compress(rows, counts_E, at)
        y = comp.restore(torch.tanh(payload), meta)
        y.backward(g_y)
        res[kernels] = (meta.inverse_N, sent.cpu(), comp.num_hashes, payload, y, rows.grad)
    (inv_r, sent_r, L_r, *floats_r), (inv, sent, L, *floats) = res["torch"], res["triton"]
    assert torch.equal(inv, inv_r) and torch.equal(sent, sent_r) and L == L_r
    assert int(inv.max()) + 1 < x.shape[0], "rows were merged"
    for a, ref in zip(floats, floats_r, strict=True):
        close(a, ref, torch.float64)


# ------------------------------------------------------------------------------------- floats and gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("compensation", ["none", "identity"])
def test_compress_restore_backward(device, dtype, compensation):
    """compress -> a differentiable stand-in for the experts -> restore, forward and every gradient."""
    E, D = 3, 48
    counts_E = torch.tensor([25, 0, 30], device=device)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(55, D, generator=g).to(device)
    W = torch.randn(D, D, generator=g).to(device) / D**0.5
    g_y = torch.randn(55, D, generator=g).to(device)
    res = {}
    for kernels, dt in (("torch", torch.float64), ("triton", dtype)):
        cfg = LSHConfig(num_hashes=2, compensation=compensation, kernels=kernels)
        comp = LSHCompressor(cfg, E, D, layer_id=0, seed=1)
        rows = x.to(dtype).to(dt).requires_grad_(True)
        w = W.to(dtype).to(dt).requires_grad_(True)
        payload, sent, meta = comp.compress(rows, counts_E)
        y = comp.restore(payload @ w, meta)
        y.backward(g_y.to(dtype).to(dt))
        res[kernels] = (y, rows.grad, w.grad, meta.inverse_N)
    assert torch.equal(res["triton"][3], res["torch"][3])
    for a, ref in zip(res["triton"][:3], res["torch"][:3], strict=True):
        assert a.dtype == dtype
        close(a, ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_ops_match_reference(device, alpha):
    """The two autograd functions alone, float64: small buckets, none at all, a single row, and
    buckets larger than a kernel program's row block (its loop runs several times)."""
    for N, M in ((40, 7), (0, 0), (1, 1), (70, 2)):
        g = torch.Generator().manual_seed(N)
        inv = torch.cat([torch.arange(M), torch.randint(0, max(M, 1), (N - M,), generator=g)])[:N].to(device)
        size = torch.bincount(inv, minlength=M)
        x = torch.randn(N, 13, generator=g, dtype=torch.float64).to(device)
        out = torch.randn(M, 13, generator=g, dtype=torch.float64).to(device)
        grads = []
        for mod in (K, ops):
            xx, oo = x.clone().requires_grad_(True), out.clone().requires_grad_(True)
            c = mod.segment_mean(xx, inv, size)
            y = mod.restore_compensated(oo, c, xx, inv, alpha)
            (y * torch.arange(y.numel(), device=device, dtype=y.dtype).view_as(y)).sum().backward()
            grads.append((c, y, xx.grad, oo.grad))
        for a, ref in zip(*grads, strict=True):
            assert a.shape == ref.shape
            torch.testing.assert_close(a, ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------- selection


def test_selection(monkeypatch):
    cpu = torch.device("cpu")
    assert not use_triton("torch", cpu)
    assert not use_triton("auto", cpu)  # the PyTorch reference is the CPU default, interpreter or not
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UserError, match="needs a CUDA device"):
        use_triton("triton", cpu)
    with pytest.raises(UserError, match="lsh.kernels"):
        use_triton("fast", cpu)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", ["rate", "error"])
def test_target_modes_choose_the_same_hashes(device, target):
    """The target modes pick L from the same statistics with either implementation, step after step."""
    E, D = 2, 24
    counts_E = torch.tensor([30, 26], device=device)
    comps = {
        k: dyadic_compressor(LSHConfig(num_hashes=4, target=target, target_value=0.5, kernels=k), E, D, device)
        for k in ("torch", "triton")
    }
    for step in range(3):
        rows = dyadic((56, D), device, seed=step)
        got = {}
        for k, comp in comps.items():
            comp.set_step(0)  # same (rounded) projections every step
            if target == "error":
                comp.controller.observe_errors([0.9, 0.6, 0.4 - 0.1 * step, 0.1])
            got[k] = comp.compress(rows, counts_E)
        assert comps["triton"].num_hashes == comps["torch"].num_hashes
        assert torch.equal(got["triton"][2].inverse_N, got["torch"][2].inverse_N)
        assert torch.equal(got["triton"][1].cpu(), got["torch"][1].cpu())
