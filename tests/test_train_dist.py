"""Distributed training math: after gradient sync, every rank's gradients equal those of one process
training on the union of the ranks' batches (loss = mean of per-rank losses), in float64.

Covers pure expert parallelism (ep = world) and expert + data parallelism (world 4, ep 2: experts
replicated twice, their gradients all-reduced over the expert-data-parallel group). Also checks that
the clipping norm is the same global norm on every rank.
"""

from __future__ import annotations

import pytest
import torch
from conftest import EXACT

from lshmoe.config import Config, ModelConfig, MoEConfig
from lshmoe.distributed.comm import Comm
from lshmoe.models.gpt import GPTMoE
from lshmoe.moe.param_kinds import is_expert_param
from lshmoe.seeding import generator
from lshmoe.testing import run_ranks
from lshmoe.train.grad_sync import GradSync

V, B, S = 50, 2, 6


def _cfg() -> Config:
    return Config(
        model=ModelConfig(d_model=16, n_layers=2, n_heads=2, seq_len=S, moe_every=1),
        moe=MoEConfig(num_experts=4, top_k=2, d_expert=12, capacity_factor=1.0),
    )


def _batch(rank: int):
    g = generator(3, "batch", rank)
    ids = torch.randint(0, V, (B, S + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _model(comm: Comm) -> GPTMoE:
    cfg = _cfg()
    m = GPTMoE(cfg.model, cfg.moe, V, comm).double()
    m.reset_parameters(11)
    return m


def _worker(comm):
    model = _model(comm)
    x, y = _batch(comm.rank)
    model(x, y).loss.backward()
    sync = GradSync(model, comm)
    sync.sync()
    norm = float(sync.global_norm())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    firsts = {n: m.experts.first_expert for n, m in model.named_modules() if hasattr(m, "experts")}
    return {"grads": grads, "norm": norm, "firsts": firsts}


@pytest.mark.slow
@pytest.mark.parametrize("world, ep", [(2, 2), (4, 2), (4, 4)])
def test_synced_gradients_equal_single_process(world, ep):
    results = run_ranks(_worker, world, ep_size=ep, timeout_s=30)
    ref = _model(Comm.local())
    loss = sum(ref(*_batch(r)).loss for r in range(world)) / world
    loss.backward()
    ref_grads = dict(ref.named_parameters())
    ref_norm = torch.sqrt(sum(p.grad.square().sum() for p in ref.parameters())).item()
    for res in results:
        assert abs(res["norm"] - ref_norm) <= EXACT
        for name, g in res["grads"].items():
            want = ref_grads[name].grad
            if is_expert_param(ref_grads[name]):
                layer = name.split(".experts.")[0] + ".experts"
                first = res["firsts"][layer.rsplit(".experts", 1)[0]]
                want = want[first : first + g.shape[0]]
            err = (g - want).abs().max().item()
            assert err <= EXACT, (world, ep, name, err)
