"""CUDA checks (skipped without a GPU): grouped GEMM, the MoE layer on CUDA against the CPU, and a
2-rank expert-parallel exactness check with gloo on CUDA tensors (NCCL refuses two ranks on one GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import EXACT
from moe_cases import D, full_expert_params, init_layer, rank_input, router_weight

from lshmoe.config import MoEConfig
from lshmoe.distributed.comm import Comm
from lshmoe.moe.grouped_mm import grouped_mm
from lshmoe.moe.layer import MoELayer
from lshmoe.moe.reference import reference_moe
from lshmoe.testing import run_ranks

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("counts", [[5, 0, 17, 3], [32, 32], [0, 0, 9]])
def test_grouped_mm_fast_path_equals_loop(counts):
    """bf16 torch._grouped_mm against the per-group loop in float32, forward and both gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), 64, generator=g).cuda().bfloat16().requires_grad_(True)
    w = torch.randn(len(counts), 64, 48, generator=g).cuda().bfloat16().requires_grad_(True)
    cot = torch.randn(sum(counts), 48, generator=g).cuda()
    y = grouped_mm(x, w, counts)
    y.float().backward(cot)
    xr, wr = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    yr = torch.cat([a @ b for a, b in zip(torch.split(xr, counts), wr.unbind(0), strict=True)])
    yr.backward(cot)
    for a, ref in ((y, yr), (x.grad, xr.grad), (w.grad, wr.grad)):
        err = (a.float() - ref).abs().max().item() if ref.numel() else 0.0
        assert err <= 2**-6 * max(ref.abs().max().item(), 1.0), err  # a few bf16 roundings


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_moe_layer_cuda_fp32_equals_cpu(act):
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=5, activation=act)
    out = {}
    for dev in ("cpu", "cuda"):
        layer = MoELayer(cfg, D, Comm.local(dev), layer_id=0).double()
        init_layer(layer, cfg)
        layer = layer.float().to(dev)
        x, cot = rank_input(0, 37, starve=False)
        x = x.float().to(dev).requires_grad_(True)
        o = layer(x)
        (o.y_TD * cot.float().to(dev)).sum().backward()
        out[dev] = [o.y_TD, x.grad, layer.router.weight.grad, *[p.grad for p in layer.experts.parameters()]]
    for a, ref in zip(out["cuda"], out["cpu"], strict=True):
        torch.testing.assert_close(a.cpu(), ref, rtol=1e-5, atol=1e-6)


def _ep_cuda_worker(comm, tokens):
    comm = Comm(comm.rank, comm.world_size, comm.groups, comm.ledger, torch.device("cuda"), comm.node_of)
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=5, activation="swiglu")
    layer = MoELayer(cfg, D, comm, layer_id=0).double()
    init_layer(layer, cfg)
    layer = layer.cuda()
    x, cot = rank_input(comm.rank, tokens[comm.rank], starve=False)
    x = x.cuda().requires_grad_(True)
    o = layer(x)
    (o.y_TD * cot.cuda()).sum().backward()
    grads = {n: p.grad.cpu() for n, p in layer.experts.named_parameters()}
    return {"y": o.y_TD.detach().cpu(), "gx": x.grad.cpu(), "g": grads, "first": layer.experts.first_expert}


def test_expert_parallel_two_ranks_gloo_cuda_equals_reference():
    tokens = [11, 6]
    results = run_ranks(_ep_cuda_worker, 2, tokens, timeout_s=60)
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=5, activation="swiglu")
    gate, params = router_weight(cfg, D), full_expert_params(cfg, D)
    for r, res in enumerate(results):
        x, cot = rank_input(r, tokens[r], starve=False)
        x.requires_grad_(True)
        y, _, _ = reference_moe(x, gate, params, cfg)
        (y * cot).sum().backward()
        assert (res["y"] - y.detach()).abs().max().item() <= EXACT
        assert (res["gx"] - x.grad).abs().max().item() <= EXACT
    # expert gradients: each rank holds its experts' sums over both ranks' tokens
    for res in results:
        for name, g in res["g"].items():
            ref = params[name].grad[res["first"] : res["first"] + g.shape[0]]
            assert (g - ref).abs().max().item() <= EXACT, name
