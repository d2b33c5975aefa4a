"""ScMoE / DGMoE: shortcut wiring, the shared-expert equivalence, DGMoE's no-repeat rule, overlap
exactness at world size 2 (forward and gradients, float64), and the adaptive expert slot."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from conftest import EXACT

from lshmoe.config import Config, LSHConfig, ModelConfig, MoEConfig
from lshmoe.distributed.comm import Comm
from lshmoe.models.blocks import MLP, Block
from lshmoe.models.scmoe import SharedExpertBlock, ShortcutPair, block_time, eq11_slot
from lshmoe.seeding import generator
from lshmoe.testing import run_ranks

D, T = 8, 12


def _cfgs(top_k=1, E=4):
    return (
        ModelConfig(d_model=D, n_heads=2, n_layers=2, seq_len=T, moe_every=2, mlp_ratio=2.0),
        MoEConfig(num_experts=E, top_k=top_k, d_expert=6),
    )


def _pair(comm, arch="scmoe", shortcut="pos2", combine="cg1", overlap=False, slot=1, lsh=None, seed=0):
    m, e = _cfgs()
    if lsh is not None:
        e.compress = "lsh"
    torch.manual_seed(seed)
    p = ShortcutPair(
        m,
        e,
        comm,
        1,
        with_mlp_block=True,
        arch=arch,
        shortcut=shortcut,
        combine=combine,
        overlap=overlap,
        slot=slot,
        warmup=0,
        settings=Config(lsh=lsh or LSHConfig()),
        seed=seed,
    ).double()
    g = generator(seed, "pair")
    with torch.no_grad():
        for _, prm in sorted(p.named_parameters()):
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=torch.float64) * 0.4)
    return p


def _x(rank=0, seed=0):
    return torch.randn(2, T // 2, D, generator=generator(seed, "x", rank), dtype=torch.float64)


@pytest.mark.parametrize("shortcut", ["pos1", "pos2", "pos3", "none"])
def test_routed_moe_reads_the_named_representation(shortcut):
    p = _pair(Comm.local(), shortcut=shortcut)
    seen = []
    p.norm_moe.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    x = _x()
    p(x)
    hA = x + p.attnA(p.normA1(x))
    hL = hA + p.mlpA(p.normA2(hA))
    hB = hL + p.attnB(p.normB1(hL))
    want = {"pos3": x, "pos2": hA, "pos1": hL, "none": hB}[shortcut]
    assert len(seen) == 1 and torch.equal(seen[0], want.detach())


@pytest.mark.parametrize("combine", ["add", "cg1", "cg2"])
def test_no_shortcut_is_exactly_the_shared_expert_moe(combine):
    comm = Comm.local()
    p = _pair(comm, shortcut="none", combine=combine)
    m, e = _cfgs()
    mlp_block = Block(D, 2, MLP(D, int(2.0 * D)), "layernorm").double()
    shared = SharedExpertBlock(m, e, comm, 1, combine=combine, settings=None, seed=0).double()
    with torch.no_grad():
        mlp_block.norm1.load_state_dict(p.normA1.state_dict())
        mlp_block.attn.load_state_dict(p.attnA.state_dict())
        mlp_block.norm2.load_state_dict(p.normA2.state_dict())
        mlp_block.ffn.load_state_dict(p.mlpA.state_dict())
        shared.norm1.load_state_dict(p.normB1.state_dict())
        shared.attn.load_state_dict(p.attnB.state_dict())
        shared.norm2.load_state_dict(p.norm_se.state_dict())
        p.norm_moe.load_state_dict(p.norm_se.state_dict())  # one input norm for both, as in the baseline
        shared.se.load_state_dict(p.se.state_dict())
        shared.moe.load_state_dict(p.moe.state_dict())
        shared.combine.load_state_dict(p.combine.state_dict())
    x = _x()
    y_pair, _ = p(x)
    y_ref, _ = shared(mlp_block(x)[0])
    assert (y_pair - y_ref).abs().max() <= EXACT


def test_dgmoe_never_gives_a_token_the_same_expert_twice():
    p = _pair(Comm.local(), arch="dgmoe")
    with torch.no_grad():  # adjacent representations nearly equal (the paper's observation): repeats would abound
        p.norm_se.load_state_dict(p.norm_moe.state_dict())
        for mod in (p.mlpA, p.attnB):
            for prm in mod.parameters():
                prm.mul_(0.01)
    routes = []
    p.moe.router.register_forward_hook(lambda mod, args, out: routes.append(out.topk_ids_TK[:, 0].clone()))
    x = torch.randn(4, 16, D, generator=generator(5), dtype=torch.float64)
    p(x)
    prev, cur = routes
    assert prev.numel() == cur.numel() == 64
    assert not torch.any(prev == cur)
    # the rule matters: the unconstrained choice on the current representation would repeat experts
    hA = x + p.attnA(p.normA1(x))
    hB = hA + p.mlpA(p.normA2(hA))
    hB = hB + p.attnB(p.normB1(hB))
    free = p.moe.router(p.norm_se(hB).reshape(-1, D)).topk_ids_TK[:, 0]
    assert (free == prev).float().mean() > 0.5


def _overlap_worker(comm, cases):
    out = []
    for arch, shortcut, use_lsh in cases:
        lsh = LSHConfig(num_hashes=2, buckets_per_hash=2) if use_lsh else None
        res = {}
        for name, overlap in (("seq", False), ("ovl", True)):
            p = _pair(comm, arch=arch, shortcut=shortcut, overlap=overlap, slot=1, lsh=lsh, seed=3)
            x = _x(comm.rank, seed=9).requires_grad_(True)
            y, moe_out = p(x)
            cot = torch.randn(y.shape, generator=generator(4, comm.rank), dtype=torch.float64)
            ((y * cot).sum() + 0.1 * moe_out.aux["load_balance"]).backward()
            res[name] = {
                "y": y.detach(),
                "gx": x.grad,
                "g": {n: q.grad for n, q in p.named_parameters() if q.grad is not None},
            }
        out.append(res)
    return out


@pytest.mark.slow
def test_overlapped_equals_sequential_at_world_size_2():
    cases = [
        ("scmoe", "pos1", False),
        ("scmoe", "pos2", False),
        ("scmoe", "pos3", False),
        ("dgmoe", "pos2", False),
        ("scmoe", "pos2", True),
    ]
    results = run_ranks(_overlap_worker, 2, cases, timeout_s=60)
    for rank_res in results:
        for case, res in zip(cases, rank_res, strict=True):
            s, o = res["seq"], res["ovl"]
            assert (s["y"] - o["y"]).abs().max() <= EXACT, case
            assert (s["gx"] - o["gx"]).abs().max() <= EXACT, case
            assert s["g"].keys() == o["g"].keys()
            for n in s["g"]:
                assert (s["g"][n] - o["g"][n]).abs().max() <= EXACT, (case, n)


def test_eq11_picks_the_fastest_slot_when_communication_fits():
    rng = random.Random(0)
    for _ in range(300):
        ops = [rng.uniform(0.5, 5.0) for _ in range(rng.randint(2, 4))]
        total = sum(ops)
        t_d, t_c = rng.uniform(0, total), rng.uniform(0, total)
        if t_d + t_c > total:
            continue
        times = [block_time(ops, t_d, t_c, 1.0, k) for k in range(len(ops) + 1)]
        feasible = any(sum(ops[:k]) >= t_d and sum(ops[k:]) >= t_c for k in range(len(ops) + 1))
        if feasible:
            assert block_time(ops, t_d, t_c, 1.0, eq11_slot(ops, t_d, t_c)) == pytest.approx(min(times))


def test_eq11_on_a_hand_table():
    # attn 2, mlp 3, attn 2, se 3; dispatch 4.5 fits only behind the first two ops, combine 4 behind the rest
    ops = [2.0, 3.0, 2.0, 3.0]
    assert eq11_slot(ops, 4.5, 4.0) == 2
    # k=2: max(2+3, 4.5) + 1 + max(2+3, 4) = 11; k=0: 4.5 + 1 + 10; k=4: 10 + 1 + 4
    assert [block_time(ops, 4.5, 4.0, 1.0, k) for k in range(5)] == [15.5, 13.5, 11.0, 12.0, 15.0]
    assert min(range(5), key=lambda k: block_time(ops, 4.5, 4.0, 1.0, k)) == 2


def test_slot_overflow_regime_is_reported_not_hidden():
    """When communication exceeds the window, Eq. 11 is a heuristic: count how often it misses the optimum."""
    rng = random.Random(1)
    misses = total = 0
    for _ in range(500):
        ops = [rng.uniform(0.5, 5.0) for _ in range(3)]
        t_d, t_c = rng.uniform(0, 15), rng.uniform(0, 15)
        if t_d + t_c <= sum(ops):
            continue
        total += 1
        times = [block_time(ops, t_d, t_c, 1.0, k) for k in range(4)]
        misses += block_time(ops, t_d, t_c, 1.0, eq11_slot(ops, t_d, t_c)) > min(times) + 1e-12
    assert total > 100 and misses / total < 0.35


def test_every_slot_is_reachable_by_configuration():
    for slot, shortcut in itertools.product(range(4), ["pos2"]):
        p = _pair(Comm.local(), shortcut=shortcut, slot=slot)
        assert p.window_slot() == min(slot, 3)
