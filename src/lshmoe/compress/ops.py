"""The two differentiable steps of LSH-MoE with hand-written backward passes.

Autograd's generic backward of `index_add / size` and `E(c)[inv] + (x - c[inv])` makes about a
dozen passes over the N routed rows; these functions make the minimum, and they are the reference
any faster implementation of the same steps is tested against:

    segment_mean:  c_MD = (sum_{n: inv[n]=m} x_n) / size_m
                   backward: g_x = (g_c / size)[inv]                       one gather over N
    restore:       y_ND = (out_MD - a c_MD)[inv] + a x_ND     (= E(c) + a (x - c), a a constant)
                   backward: g_out = scatter_sum(g_y by inv), g_c = -a g_out, g_x = a g_y   one scatter over N
"""

from __future__ import annotations

import torch


class _SegmentMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, inverse_N: torch.Tensor, size_M: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse_N, size_M)
        c = x_ND.new_zeros((size_M.numel(), x_ND.shape[1])).index_add_(0, inverse_N, x_ND)
        return c.div_(size_M.to(c.dtype)[:, None])

    @staticmethod
    def backward(ctx, g_MD: torch.Tensor):
        inverse_N, size_M = ctx.saved_tensors
        return (g_MD / size_M.to(g_MD.dtype)[:, None]).index_select(0, inverse_N), None, None


class _Restore(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, out_MD: torch.Tensor, c_MD: torch.Tensor, x_ND: torch.Tensor, inverse_N: torch.Tensor, alpha: float
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse_N)
        ctx.m, ctx.alpha = out_MD.shape[0], alpha
        if alpha == 1.0:
            return (out_MD - c_MD).index_select(0, inverse_N).add_(x_ND)
        return (out_MD - alpha * c_MD).index_select(0, inverse_N).add_(x_ND, alpha=alpha)

    @staticmethod
    def backward(ctx, g_ND: torch.Tensor):
        (inverse_N,) = ctx.saved_tensors
        g_MD = g_ND.new_zeros((ctx.m, g_ND.shape[1])).index_add_(0, inverse_N, g_ND)
        a = ctx.alpha
        if a == 1.0:
            return g_MD, -g_MD, g_ND, None, None
        return g_MD, -a * g_MD, a * g_ND, None, None


def segment_mean(x_ND: torch.Tensor, inverse_N: torch.Tensor, size_M: torch.Tensor) -> torch.Tensor:
    """Mean of the rows of each bucket (bucket of row n = inverse_N[n], size_M rows per bucket)."""
    return _SegmentMean.apply(x_ND, inverse_N, size_M)


def restore_compensated(
    out_MD: torch.Tensor, c_MD: torch.Tensor, x_ND: torch.Tensor, inverse_N: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """E(c_b(n)) + alpha (x_n - c_b(n)) for every row n."""
    return _Restore.apply(out_MD, c_MD, x_ND, inverse_N, float(alpha))
