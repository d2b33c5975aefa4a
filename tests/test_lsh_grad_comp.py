"""`lsh.grad_compensation` in float64: the residual x - c enters the restore's gradient only, so the
forward is unchanged and each row's gradient gains b (g_n - mean of its bucket's g)."""

from __future__ import annotations

import pytest
import torch

from lshmoe.compress.lsh import LSHCompressor
from lshmoe.config import LSHConfig


def _clustered(N: int = 64, D: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, D, generator=g, dtype=torch.float64)
    rows = base[torch.randint(0, 6, (N,), generator=g)] + 0.3 * torch.randn(N, D, generator=g, dtype=torch.float64)
    return rows, torch.tensor([20, 14, 30, 0])


def _run(cfg: LSHConfig, rows: torch.Tensor, counts: torch.Tensor, w: torch.Tensor):
    comp = LSHCompressor(cfg, num_experts=4, d_model=rows.shape[1], layer_id=0, seed=1)
    comp.set_step(0)
    x = rows.clone().requires_grad_(True)
    payload, _, meta = comp.compress(x, counts)
    y = comp.restore(torch.tanh(payload @ w), meta)  # a differentiable stand-in for the experts
    cot = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)
    (y * cot).sum().backward()
    return y.detach(), x.grad, meta, cot


@pytest.mark.parametrize("b", [1.0, 0.3])
def test_the_gradient_gains_each_rows_own_residual_and_the_forward_is_unchanged(b):
    rows, counts = _clustered()
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64) / 4
    y0, g0, meta, cot = _run(LSHConfig(kernels="torch"), rows, counts, w)
    y1, g1, meta1, _ = _run(LSHConfig(kernels="torch", grad_compensation=b), rows, counts, w)
    assert meta.centroids_MD.shape[0] < rows.shape[0]  # rows were merged
    assert torch.equal(y0, y1)
    # reference: b (g_n - mean over n's bucket of g), on top of the plain restore's gradient
    inv = meta.inverse_N
    size = torch.bincount(inv).to(torch.float64)
    mean_g = torch.zeros(size.numel(), 16, dtype=torch.float64).index_add_(0, inv, cot) / size[:, None]
    torch.testing.assert_close(g1 - g0, b * (cot - mean_g[inv]), rtol=0, atol=1e-12)


def test_the_option_is_range_checked_in_one_line():
    from lshmoe.config import Config, ConfigError, validate

    with pytest.raises(ConfigError, match=r"lsh.grad_compensation=2.0 is out of range"):
        validate(Config(lsh=LSHConfig(grad_compensation=2.0)))
