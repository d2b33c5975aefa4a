"""The two differentiable steps of LSH-MoE with hand-written backward passes.

Autograd's generic backward of `index_add / size` and `E(c)[inv] + (x - c[inv])` makes about a
dozen passes over the N routed rows; these functions make the minimum, and they are the reference
any faster implementation of the same steps is tested against:

    segment_mean:  c_MD = (sum_{n: inv[n]=m} x_n) / size_m                   (0 for an empty bucket)
                   backward: g_x = (g_c / size)[inv]                       one gather over N
    restore:       y_ND = (out_MD - a c_MD)[inv] + a x_ND     (= E(c) + a (x - c), a a constant)
                   backward: g_out = scatter_sum(g_y by inv), g_c = -b g_out, g_x = b g_y   one scatter over N
                   with b = a, or another scale of the residual's gradient (b != a: a residual the
                   forward does not add, or adds at another scale, still routes each row's own gradient)
    grad_path:     y_ND = out_ND                                 (exact rows: E(x) + b (x - stopgrad x))
                   backward: g_out = g_y, g_x = b g_y
"""

from __future__ import annotations

import torch


class _SegmentMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, inverse_N: torch.Tensor, size_M: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse_N, size_M)
        c = x_ND.new_zeros((size_M.numel(), x_ND.shape[1])).index_add_(0, inverse_N, x_ND)
        return c.div_(size_M.clamp(min=1).to(c.dtype)[:, None])  # an empty bucket's mean is 0

    @staticmethod
    def backward(ctx, g_MD: torch.Tensor):
        inverse_N, size_M = ctx.saved_tensors
        return (g_MD / size_M.clamp(min=1).to(g_MD.dtype)[:, None]).index_select(0, inverse_N), None, None


class _Restore(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        out_MD: torch.Tensor,
        c_MD: torch.Tensor,
        x_ND: torch.Tensor,
        inverse_N: torch.Tensor,
        alpha: float,
        grad_alpha: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse_N)
        ctx.m, ctx.alpha = out_MD.shape[0], grad_alpha
        if alpha == 0.0:
            return out_MD.index_select(0, inverse_N)
        if alpha == 1.0:
            return (out_MD - c_MD).index_select(0, inverse_N).add_(x_ND)
        return (out_MD - alpha * c_MD).index_select(0, inverse_N).add_(x_ND, alpha=alpha)

    @staticmethod
    def backward(ctx, g_ND: torch.Tensor):
        (inverse_N,) = ctx.saved_tensors
        g_MD = g_ND.new_zeros((ctx.m, g_ND.shape[1])).index_add_(0, inverse_N, g_ND)
        return (*restore_grads(g_MD, g_ND, ctx.alpha), None)


def restore_grads(g_MD: torch.Tensor, g_ND: torch.Tensor, alpha: float) -> tuple:
    """The restore's gradients (out, c, x, inverse, alpha) from the scattered g_MD and the incoming g_ND:
    g_out = g_MD, g_c = -alpha g_MD, g_x = alpha g_ND (none for c and x when alpha = 0)."""
    if alpha == 0.0:
        return g_MD, None, None, None, None
    if alpha == 1.0:
        return g_MD, -g_MD, g_ND, None, None
    return g_MD, -alpha * g_MD, alpha * g_ND, None, None


class _GradPath(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_ND: torch.Tensor, x_ND: torch.Tensor, b: float) -> torch.Tensor:
        ctx.b = b
        return out_ND.clone()

    @staticmethod
    def backward(ctx, g_ND: torch.Tensor):
        return g_ND, ctx.b * g_ND, None


def grad_path(out_ND: torch.Tensor, x_ND: torch.Tensor, b: float) -> torch.Tensor:
    """out + b (x - stopgrad(x)): the values of `out` unchanged, each row's gradient also sent to x, times b."""
    return _GradPath.apply(out_ND, x_ND, float(b))


def segment_mean(x_ND: torch.Tensor, inverse_N: torch.Tensor, size_M: torch.Tensor) -> torch.Tensor:
    """Mean of the rows of each bucket (bucket of row n = inverse_N[n], size_M rows per bucket)."""
    return _SegmentMean.apply(x_ND, inverse_N, size_M)


def restore_compensated(
    out_MD: torch.Tensor,
    c_MD: torch.Tensor,
    x_ND: torch.Tensor,
    inverse_N: torch.Tensor,
    alpha: float = 1.0,
    grad_alpha: float | None = None,
) -> torch.Tensor:
    """E(c_b(n)) + alpha (x_n - c_b(n)) for every row n; the residual's gradient is scaled by
    `grad_alpha` (default: alpha)."""
    return _Restore.apply(
        out_MD, c_MD, x_ND, inverse_N, float(alpha), float(alpha if grad_alpha is None else grad_alpha)
    )
