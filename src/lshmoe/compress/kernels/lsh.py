"""Fused Triton kernels for LSH-MoE compress and restore (the contract of `compress/ops.py`).

Shapes: N routed rows (grouped by destination expert), D width, E experts, L hashes, P projections
per hash, K = L * P projected columns, b buckets per hash, S = b^L buckets per expert, M non-empty
(expert, bucket) pairs = payload rows.

compress, without a global sort of the keys (S buckets per expert are few, so a histogram replaces
`unique`):
1. `project`:  z_NK = x_ND R_DK, read once, accumulated in float32        (one pass over x)
2. `bucket_ids`: per row the L codes (cross-polytope: signed argmax; hyperplane: sign bits),
   combined into the mixed-radix id; key = expert * S + id mod S; histogram of the keys (atomics)
3. compaction (PyTorch, over E * S integers): slot of a key = number of non-empty keys before it,
   which is the rank `torch.unique(sorted=True)` gives, so ids and payload order equal the reference;
   the rows of each bucket are listed by a stable argsort of the N slot ids (integers, not rows).
   With `lsh.causal_mode=split` a bucket is split by each row's occurrence index in its sequence
   (`compact_split`, compress/causal.py: a few sorts of N int64 keys, still one host read); with
   `earliest` the segment mean runs over the rows at each bucket's earliest position
4. `segment_rows`: one program per (bucket, column block) sums its rows in float32 and writes the
   mean, rounded once                                                        (one pass over x)
restore:   y_n = out[inv_n] - a c[inv_n] + a x_n                           (`gather_rows`)
backward:  restore: g_out = segment sums of g_y (`segment_rows`), g_c = -a g_out, g_x = a g_y
           segment mean: g_x = g_c[inv] / size[inv]                           (`gather_rows`)

Floats accumulate in float32 (float64 for float64 inputs) and are rounded once into the input's
dtype. No float atomics: a bucket's rows are summed by one program in row order, so results are
bitwise reproducible run to run (and independent of the program shape's column split).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lshmoe.compress.causal import split_keys
from lshmoe.compress.ops import restore_grads
from lshmoe.compress.protocol import Positions

__all__ = [
    "bucket_ids",
    "compact",
    "compact_split",
    "gather_rows",
    "hash_rows",
    "project",
    "restore_compensated",
    "segment_rows",
    "segments",
    "segment_mean",
]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# (rows, max columns, warps) of one program of the row kernels (gather_rows; segment_rows reads
# `rows` rows of its bucket per step); a starting point, not tuned: `lshmoe bench gpu` times
# alternatives on the GPU.
ROW_BLOCKS = (16, 256, 4)


def _row_grid(N: int, D: int) -> tuple[int, int, int, tuple[int, int]]:
    bn, bd_max, warps = ROW_BLOCKS
    bd = max(16, min(bd_max, triton.next_power_of_2(D)))
    return bn, bd, warps, (triton.cdiv(N, bn), triton.cdiv(D, bd))


# ---------------------------------------------------------------------------------------- kernels


@triton.jit
def _project_kernel(
    x_ptr,
    r_ptr,
    z_ptr,
    N,
    K,
    stride_x,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # NOTE: D is a compile-time constant (one specialisation per model width): a loop bound read from a
    # runtime scalar breaks Triton's interpreter under numpy >= 2.4.
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=r_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(
            x_ptr + rows[:, None] * stride_x + d[None, :], mask=(rows[:, None] < N) & (d[None, :] < D), other=0.0
        )
        r = tl.load(r_ptr + d[:, None] * BLOCK_K + cols[None, :], mask=d[:, None] < D, other=0.0)
        acc += tl.dot(x.to(r.dtype), r, input_precision="ieee")
    tl.store(z_ptr + rows[:, None] * K + cols[None, :], acc, mask=(rows[:, None] < N) & (cols[None, :] < K))


@triton.jit
def _bucket_kernel(
    z_ptr,
    expert_ptr,
    full_ptr,
    key_ptr,
    hist_ptr,
    N,
    span,
    L: tl.constexpr,
    P: tl.constexpr,
    B: tl.constexpr,
    CROSS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m = rows < N
    full = tl.zeros((BLOCK_N,), dtype=tl.int64)
    radix = tl.full((BLOCK_N,), 1, dtype=tl.int64)
    for l in tl.static_range(L):
        base = z_ptr + rows * (L * P) + l * P
        z = tl.load(base, mask=m, other=0.0)
        if CROSS:
            # first index of the largest |z| (torch.argmax's tie rule), and whether that entry is negative
            best = tl.abs(z)
            code = tl.zeros((BLOCK_N,), dtype=tl.int64)
            neg = z < 0
            for p in tl.static_range(1, P):
                zp = tl.load(base + p, mask=m, other=0.0)
                better = tl.abs(zp) > best
                best = tl.where(better, tl.abs(zp), best)
                code = tl.where(better, p, code)
                neg = tl.where(better, zp < 0, neg)
            code = code + tl.where(neg, P, 0)
        else:
            code = tl.where(z > 0, 1, 0).to(tl.int64)
            for p in tl.static_range(1, P):
                zp = tl.load(base + p, mask=m, other=0.0)
                code = code + tl.where(zp > 0, 1 << p, 0)
        full = full + code * radix
        radix = radix * B
    e = tl.load(expert_ptr + rows, mask=m, other=0)
    key = e * span + full % span
    tl.store(full_ptr + rows, full, mask=m)
    tl.store(key_ptr + rows, key, mask=m)
    tl.atomic_add(hist_ptr + key, tl.full((BLOCK_N,), 1, dtype=tl.int32), mask=m)


@triton.jit
def _segment_kernel(
    src_ptr,
    perm_ptr,
    start_ptr,
    size_ptr,
    out_ptr,
    D,
    stride_src,
    MEAN: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    m = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    start = tl.load(start_ptr + m)
    n = tl.load(size_ptr + m)
    if F64:
        acc = tl.zeros((BLOCK_D,), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # NOTE: a while loop: a `range` bound read from memory breaks Triton's interpreter (numpy >= 2.4)
    r0 = n * 0
    while r0 < n:
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < n
        rows = tl.load(perm_ptr + start + r, mask=rmask, other=0).to(tl.int64)
        v = tl.load(src_ptr + rows[:, None] * stride_src + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(v.to(acc.dtype), axis=0)
        r0 += BLOCK_R
    if MEAN:
        acc = acc / tl.maximum(n, 1).to(acc.dtype)
    tl.store(out_ptr + m.to(tl.int64) * D + d, acc.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _gather_kernel(
    src_ptr,
    idx_ptr,
    scale_ptr,
    sub_ptr,
    x_ptr,
    out_ptr,
    alpha,
    N,
    D,
    stride_x,
    HAS_SCALE: tl.constexpr,
    HAS_RES: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    mask = rmask[:, None] & (d[None, :] < D)
    i = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
    src = i[:, None] * D + d[None, :]
    y = tl.load(src_ptr + src, mask=mask, other=0.0)
    if F64:
        y = y.to(tl.float64)
    else:
        y = y.to(tl.float32)
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + i, mask=rmask, other=0.0).to(y.dtype)[:, None]
    if HAS_RES:
        c = tl.load(sub_ptr + src, mask=mask, other=0.0).to(y.dtype)
        x = tl.load(x_ptr + rows[:, None] * stride_x + d[None, :], mask=mask, other=0.0).to(y.dtype)
        y = y + alpha * (x - c)
    tl.store(out_ptr + rows[:, None] * D + d[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------- launchers


def project(x_ND: torch.Tensor, R_DK: torch.Tensor) -> torch.Tensor:
    """z_NK = x_ND R_DK in R's dtype (float32), x read once in its own dtype."""
    N, D = x_ND.shape
    K = R_DK.shape[1]
    BLOCK_K = max(16, triton.next_power_of_2(K))
    R = torch.zeros((D, BLOCK_K), dtype=R_DK.dtype, device=x_ND.device)
    R[:, :K] = R_DK
    z = torch.empty((N, K), dtype=R_DK.dtype, device=x_ND.device)
    if N == 0:
        return z
    x = x_ND if x_ND.stride(1) == 1 else x_ND.contiguous()
    BLOCK_N, BLOCK_D = 32, min(64, max(16, triton.next_power_of_2(D)))
    _project_kernel[(triton.cdiv(N, BLOCK_N),)](x, R, z, N, K, x.stride(0), D, BLOCK_N, BLOCK_D, BLOCK_K)
    return z


def bucket_ids(
    z_NLP: torch.Tensor, expert_N: torch.Tensor, family: str, buckets: int, num_hashes: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(full_N, key_N, hist): combined ids of all L hashes, key = expert * b^num_hashes + (id mod
    b^num_hashes), and the histogram of the keys over num_experts * b^num_hashes (int32)."""
    N, L, P = z_NLP.shape
    span = buckets**num_hashes
    dev = z_NLP.device
    full = torch.empty(N, dtype=torch.int64, device=dev)
    key = torch.empty(N, dtype=torch.int64, device=dev)
    hist = torch.zeros(num_experts * span, dtype=torch.int32, device=dev)
    if N:
        BLOCK_N = 128
        _bucket_kernel[(triton.cdiv(N, BLOCK_N),)](
            z_NLP.contiguous(),
            expert_N.contiguous(),
            full,
            key,
            hist,
            N,
            span,
            L,
            P,
            buckets,
            family == "cross_polytope",
            BLOCK_N,
        )
    return full, key, hist


def hash_rows(
    rows_ND: torch.Tensor,
    R_DLP: torch.Tensor,
    expert_N: torch.Tensor,
    *,
    family: str,
    buckets: int,
    num_hashes: int,
    num_experts: int,
    center: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`project` + optional centring + `bucket_ids`: (full_N, key_N, hist) of rows grouped by expert.

    Centring is the reference's (`LSHCompressor.bucket_ids`): (x - mean_e) R = x R - mean_e R on the
    N x K projections, in PyTorch (K = L P columns, a few per row)."""
    D, L, P = R_DLP.shape
    z_NK = project(rows_ND, R_DLP.reshape(D, L * P))
    if center:
        sums_EK = z_NK.new_zeros(num_experts, L * P).index_add_(0, expert_N, z_NK)
        ones_N = torch.ones_like(z_NK[:, 0])
        cnt_E = z_NK.new_zeros(num_experts).index_add_(0, expert_N, ones_N).clamp(min=1)  # bincount would sync
        z_NK = z_NK - (sums_EK / cnt_E[:, None]).index_select(0, expert_N)
    return bucket_ids(z_NK.view(-1, L, P), expert_N, family, buckets, num_hashes, num_experts)


def compact(
    key_N: torch.Tensor, hist: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inverse_N, size_M, sent_counts_E) from the key histogram: the slot of a key is its rank
    among the non-empty keys (= torch.unique's sorted inverse). Reads M to the host once."""
    nonempty = hist > 0
    slot = torch.cumsum(nonempty, 0, dtype=torch.int64) - 1
    sent_E = nonempty.view(num_experts, -1).sum(1)
    M = int(sent_E.sum())  # the payload's size (host sync: the uneven split the count exchange needs)
    inverse_N = slot.index_select(0, key_N)
    size_M = torch.zeros(M, dtype=torch.int64, device=hist.device)
    if M:
        # empty keys add 0 to a neighbour's slot, so every slot gets exactly its own count
        size_M.scatter_add_(0, slot.clamp(min=0), hist.to(torch.int64))
    return inverse_N, size_M, sent_E


def compact_split(
    key_N: torch.Tensor, hist: torch.Tensor, at: Positions, num_experts: int, span: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`compact` for `lsh.causal_mode=split`: no bucket holds two rows of one sequence (compress/causal.py). A row's
    sub-bucket is (the slot of its key, as in `compact`, its occurrence index); the sub-buckets are
    ranked by one sort of N int64 keys, which is the reference's `torch.unique` ranking (buckets in key
    order, a bucket's sub-buckets in occurrence order). Reads M to the host once."""
    N, dev = key_N.numel(), key_N.device
    if N == 0:
        return key_N.new_zeros(0), key_N.new_zeros(0), torch.zeros(num_experts, dtype=torch.int64, device=dev)
    slot_N = (torch.cumsum(hist > 0, 0, dtype=torch.int64) - 1).index_select(0, key_N)
    sorted_N, order = torch.sort(split_keys(slot_N, at))
    first = torch.ones(N, dtype=torch.bool, device=dev)
    first[1:] = sorted_N[1:] != sorted_N[:-1]
    rank_sorted = torch.cumsum(first, 0, dtype=torch.int64) - 1
    M = int(rank_sorted[-1]) + 1  # the payload's size (host sync: the uneven split the count exchange needs)
    inverse_N = torch.empty_like(key_N)
    inverse_N[order] = rank_sorted
    size_M = torch.zeros(M, dtype=torch.int64, device=dev).index_add_(0, rank_sorted, torch.ones_like(rank_sorted))
    expert_sorted = key_N.index_select(0, order) // span
    sent_E = torch.zeros(num_experts, dtype=torch.int64, device=dev).index_add_(0, expert_sorted, first.long())
    return inverse_N, size_M, sent_E


@dataclass(frozen=True, slots=True)
class Segments:
    """The rows of each bucket: perm_N lists row ids bucket by bucket (in row order within a bucket),
    bucket m's rows are perm_N[start_M[m] : start_M[m] + size_M[m]]."""

    perm_N: torch.Tensor
    start_M: torch.Tensor
    size_M: torch.Tensor


def segments(inverse_N: torch.Tensor, size_M: torch.Tensor) -> Segments:
    """Segments of `inverse_N` (bucket of each row) with `size_M` rows per bucket; no host sync."""
    perm_N = torch.sort(inverse_N, stable=True).indices
    return Segments(perm_N, torch.cumsum(size_M, 0) - size_M, size_M)


def segment_rows(src_ND: torch.Tensor, seg: Segments, *, mean: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """out_MD[m] = sum (mean when `mean`) of the rows of bucket m, float32 accumulation, `dtype` out."""
    M, D = seg.size_M.numel(), src_ND.shape[1]
    out = torch.empty((M, D), dtype=dtype or src_ND.dtype, device=src_ND.device)
    if M == 0 or D == 0:
        return out
    src = src_ND if src_ND.stride(1) == 1 else src_ND.contiguous()
    BLOCK_R, BLOCK_D, warps, _ = _row_grid(M, D)
    grid = (M, triton.cdiv(D, BLOCK_D))
    _segment_kernel[grid](
        src,
        seg.perm_N,
        seg.start_M,
        seg.size_M,
        out,
        D,
        src.stride(0),
        mean,
        out.dtype == torch.float64,
        BLOCK_R,
        BLOCK_D,
        num_warps=warps,
    )
    return out


def gather_rows(
    src_MD: torch.Tensor,
    idx_N: torch.Tensor,
    *,
    scale_M: torch.Tensor | None = None,
    sub_MD: torch.Tensor | None = None,
    x_ND: torch.Tensor | None = None,
    alpha: float = 0.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y_n = src[idx_n] * scale[idx_n] (when given) + alpha (x_n - sub[idx_n]) (when sub/x given)."""
    N, D = idx_N.shape[0], src_MD.shape[1]
    out = torch.empty((N, D), dtype=dtype or src_MD.dtype, device=src_MD.device)
    if N == 0 or D == 0:
        return out
    has_res = sub_MD is not None
    src = src_MD.contiguous()
    sub = sub_MD.contiguous() if has_res else src
    x = x_ND if has_res and x_ND.stride(1) == 1 else (x_ND.contiguous() if has_res else src)
    BLOCK_N, BLOCK_D, warps, grid = _row_grid(N, D)
    _gather_kernel[grid](
        src,
        idx_N.contiguous(),
        scale_M if scale_M is not None else src,
        sub,
        x,
        out,
        float(alpha),
        N,
        D,
        x.stride(0),
        scale_M is not None,
        has_res,
        out.dtype == torch.float64,
        BLOCK_N,
        BLOCK_D,
        num_warps=warps,
    )
    return out


# ---------------------------------------------------------------------------------------- autograd


class _SegmentMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, inverse_N: torch.Tensor, size_M: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse_N, size_M)
        return segment_rows(x_ND, segments(inverse_N, size_M), mean=True)

    @staticmethod
    def backward(ctx, g_MD: torch.Tensor):
        inverse_N, size_M = ctx.saved_tensors
        inv_size_M = 1.0 / size_M.clamp(min=1).to(_acc_dtype(g_MD.dtype))
        return gather_rows(g_MD, inverse_N, scale_M=inv_size_M), None, None


class _Restore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_MD, c_MD, x_ND, inverse_N, alpha: float, grad_alpha: float) -> torch.Tensor:  # as ops
        ctx.save_for_backward(inverse_N)
        ctx.m, ctx.alpha = out_MD.shape[0], grad_alpha
        if alpha == 0.0:
            return gather_rows(out_MD, inverse_N)
        return gather_rows(out_MD, inverse_N, sub_MD=c_MD, x_ND=x_ND, alpha=alpha)

    @staticmethod
    def backward(ctx, g_ND: torch.Tensor):
        (inverse_N,) = ctx.saved_tensors
        a = ctx.alpha
        ones = torch.ones_like(inverse_N)
        size_M = torch.zeros(ctx.m, dtype=inverse_N.dtype, device=inverse_N.device).index_add_(0, inverse_N, ones)
        return (*restore_grads(segment_rows(g_ND, segments(inverse_N, size_M), mean=False), g_ND, a), None)


# The fused counterparts of `lshmoe.compress.ops.segment_mean(x_ND, inverse_N, size_M)` and
# `restore_compensated(out_MD, c_MD, x_ND, inverse_N, alpha, grad_alpha)`: same arguments, same results within
# the tolerances of tests/test_kernels.py; alpha = grad_alpha = 0 is the plain gather (no gradient to c or x).
segment_mean = _SegmentMean.apply


def restore_compensated(out_MD, c_MD, x_ND, inverse_N, alpha: float = 1.0, grad_alpha: float | None = None):
    return _Restore.apply(
        out_MD, c_MD, x_ND, inverse_N, float(alpha), float(alpha if grad_alpha is None else grad_alpha)
    )
