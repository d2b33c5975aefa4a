"""Routing features of modern MoEs, exact against the dense reference in float64 at world sizes 1, 2, 4.

Sigmoid scores, group-limited selection, the selection-only correction bias, routed_scaling_factor,
transformers' top-1 renormalisation, the sequence-level and HF-convention load-balance losses, and
shared experts (plain and gated) computed while the dispatch is in flight; each composed with the
pipelined and hierarchical dispatchers and the LSH compressor (identity experts: LSH is exact there).
Also: the auxiliary-loss-free bias update moves a skewed router towards balance.
"""

from __future__ import annotations

import pytest
import torch
from conftest import EXACT
from moe_cases import D, full_expert_params, init_layer, router_weight

from lshmoe.config import Config, ConfigError, LinaConfig, LSHConfig, MoEConfig, validate
from lshmoe.distributed.comm import Comm
from lshmoe.moe.layer import MoELayer
from lshmoe.moe.reference import reference_moe
from lshmoe.moe.router import RoutingOptions, TopKRouter, update_correction_biases
from lshmoe.seeding import generator
from lshmoe.testing import run_ranks

S = 3  # tokens per sequence
BASE = dict(d_expert=5, activation="swiglu")
CASES = [
    dict(
        name="deepseek: sigmoid+groups+bias+scale+2 shared",
        moe=dict(
            num_experts=8,
            top_k=2,
            score="sigmoid",
            n_group=4,
            topk_group=2,
            correction_bias=True,
            routed_scaling_factor=2.5,
            shared_experts=2,
            d_shared=3,
            seq_aux_weight=0.4,
        ),
        seqs=[3, 1, 2, 0],
    ),
    dict(
        name="qwen2: top1 renorm + gated shared + hf aux",
        moe=dict(
            num_experts=4,
            top_k=1,
            normalize_top1=True,
            shared_experts=1,
            d_shared=4,
            shared_gate=True,
            aux_convention="hf",
        ),
        seqs=[2, 3, 1, 2],
    ),
    dict(
        name="sigmoid top-3 unnormalised, capacity drops, seq aux",
        moe=dict(
            num_experts=8,
            top_k=3,
            score="sigmoid",
            normalize_weights=False,
            capacity_factor=0.6,
            seq_aux_weight=0.4,
            correction_bias=True,
        ),
        seqs=[4, 2, 3, 2],
    ),
    dict(
        name="pipelined a2a + groups + shared",
        moe=dict(num_experts=8, top_k=2, n_group=2, topk_group=1, shared_experts=1, correction_bias=True),
        chunks=2,
        seqs=[2, 2, 3, 1],
    ),
    dict(
        name="lsh (identity experts) + sigmoid + scale + shared",
        moe=dict(
            num_experts=8,
            top_k=2,
            score="sigmoid",
            routed_scaling_factor=1.7,
            shared_experts=1,
            compress="lsh",
            activation="identity",
            correction_bias=True,
        ),
        lsh=dict(num_hashes=2, buckets_per_hash=2, compensation="identity"),
        seqs=[3, 2, 2, 3],
    ),
]


def _cfg(c: dict, **extra) -> MoEConfig:
    return MoEConfig(**{**BASE, **c["moe"], **extra})


def _bias(cfg: MoEConfig) -> torch.Tensor | None:
    if not cfg.correction_bias:
        return None
    return 0.3 * torch.randn(cfg.num_experts, generator=generator(3, "bias"), dtype=torch.float64)


def _shared(cfg: MoEConfig) -> dict[str, torch.Tensor] | None:
    if not cfg.shared_experts:
        return None
    g, F_ = generator(4, "shared"), (cfg.d_shared or cfg.d_expert) * cfg.shared_experts
    shapes = {"gate_proj": (F_, D), "up_proj": (F_, D), "down_proj": (D, F_)}
    if cfg.shared_gate:
        shapes["gate"] = (1, D)
    return {n: (0.5 * torch.randn(s, generator=g, dtype=torch.float64)).requires_grad_(True) for n, s in shapes.items()}


def _input(rank: int, seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = generator(7, "x", rank)
    return torch.randn(seqs, S, D, generator=g, dtype=torch.float64), torch.randn(
        seqs, S, D, generator=g, dtype=torch.float64
    )


def _loss(y, cot, aux):
    return (y * cot).sum() + 0.3 * aux["load_balance"] + 0.2 * aux["z_loss"] + 0.4 * aux.get("seq_load_balance", 0.0)


def _worker(comm, cases, extra):
    out = []
    for c in cases:
        cfg = _cfg(c, **extra)
        chunks = 1 if extra.get("a2a") == "hierarchical" else c.get("chunks", 1)  # no pipelined 2-level form
        settings = Config(lsh=LSHConfig(**c.get("lsh", {})), lina=LinaConfig(a2a_chunks=chunks))
        layer = MoELayer(cfg, D, comm, layer_id=0, settings=settings).double()
        init_layer(layer, cfg)
        with torch.no_grad():
            if cfg.correction_bias:
                layer.router.e_score_correction_bias.copy_(_bias(cfg))
            if layer.shared is not None:
                for n, w in _shared(cfg).items():
                    getattr(layer.shared, n).weight.copy_(w)
        x, cot = _input(comm.rank, c["seqs"][comm.rank])
        x.requires_grad_(True)
        o = layer(x)
        _loss(o.y_TD, cot, o.aux).backward()
        out.append(
            dict(
                y=o.y_TD.detach(),
                aux={k: float(v) for k, v in o.aux.items()},
                gx=x.grad,
                g={n: p.grad for n, p in layer.named_parameters() if p.requires_grad},
                first=layer.experts.first_expert,
                local=layer.experts.num_local,
            )
        )
    return out


def _reference(c: dict, world: int):
    cfg = _cfg(c)
    gate, params, shared, bias = router_weight(cfg, D), full_expert_params(cfg, D), _shared(cfg), _bias(cfg)
    total, per_rank = 0.0, []
    for r in range(world):
        x, cot = _input(r, c["seqs"][r])
        x.requires_grad_(True)
        y, aux, _ = reference_moe(x.reshape(-1, D), gate, params, cfg, bias_E=bias, seq_len=S, shared=shared)
        total = total + _loss(y.view_as(x), cot, aux)
        per_rank.append((x, y.detach().view_as(x), {k: float(v.detach()) for k, v in aux.items()}))
    total.backward()
    grads = {"router.weight": gate.grad, **{f"shared.{n}.weight": w.grad for n, w in (shared or {}).items()}}
    return grads, {n: p.grad for n, p in params.items()}, per_rank


def _check(results, world):
    for i, c in enumerate(CASES):
        dense, experts, per_rank = _reference(c, world)
        got = [res[i] for res in results]
        for r, (x, y_ref, aux_ref) in enumerate(per_rank):
            assert (got[r]["y"] - y_ref).abs().max().item() <= EXACT if y_ref.numel() else True, (c["name"], r)
            assert got[r]["aux"].keys() == aux_ref.keys(), c["name"]
            for k, v in aux_ref.items():
                assert abs(got[r]["aux"][k] - v) <= EXACT, (c["name"], r, k)
            if x.numel():
                assert (got[r]["gx"] - x.grad).abs().max().item() <= EXACT, (c["name"], r, "grad x")
            lo, n = got[r]["first"], got[r]["local"]
            for name, g in experts.items():
                err = (got[r]["g"][f"experts.{name}"] - g[lo : lo + n]).abs().max().item()
                assert err <= EXACT, (c["name"], r, name, err)
        for name, g in dense.items():  # replicated weights: their gradients add up over the ranks
            total = sum(res["g"][name] for res in got)
            assert (total - g).abs().max().item() <= EXACT, (c["name"], name)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_routing_features_equal_dense_reference(world):
    _check(run_ranks(_worker, world, CASES, {}, timeout_s=60), world)


@pytest.mark.slow
def test_routing_features_with_hierarchical_dispatch():
    """2 nodes x 2 ranks: the two-level all-to-all gives the same exact results."""
    results = run_ranks(_worker, 4, CASES, {"a2a": "hierarchical"}, ranks_per_node=2, timeout_s=60)
    _check(results, 4)


def test_group_limited_routing_keeps_tokens_in_their_best_groups():
    cfg = MoEConfig(num_experts=8, top_k=2, score="sigmoid", n_group=4, topk_group=1, correction_bias=True)
    layer = MoELayer(cfg, D, Comm.local(), 0).double()
    init_layer(layer, cfg)
    ids = layer.router(torch.randn(50, D, dtype=torch.float64)).topk_ids_TK
    assert torch.all(ids[:, 0] // 2 == ids[:, 1] // 2), "top_group=1: both experts from one group of 2"


def test_correction_bias_changes_choice_not_weights():
    router = TopKRouter(D, 4, 1, normalize_weights=False, options=RoutingOptions(correction_bias=True))
    torch.nn.init.normal_(router.weight)
    x = torch.randn(20, D)
    before = router(x)
    with torch.no_grad():
        router.e_score_correction_bias[2] = 10.0
    after = router(x)
    assert torch.all(after.topk_ids_TK == 2)
    probs = torch.softmax(x @ router.weight.t(), -1)[:, 2]
    assert torch.allclose(after.weights_TK[:, 0], probs), "the bias must not enter the weights"
    assert not torch.all(before.topk_ids_TK == 2)


def test_aux_free_update_moves_load_towards_balance():
    """A router skewed towards expert 0: the bias updates alone (no gradient) spread the load."""
    E, K = 8, 2
    cfg = MoEConfig(num_experts=E, top_k=K, score="sigmoid", correction_bias=True, bias_update_rate=0.02)
    layer = MoELayer(cfg, D, Comm.local(), 0).train()
    g = generator(5, "skew")
    with torch.no_grad():
        layer.router.weight.copy_(0.3 * torch.randn(E, D, generator=g))
        layer.router.weight[0] += 2.0  # x has a positive mean: expert 0 (and its neighbours) win
    x = torch.randn(512, D, generator=g) + 1.0

    def imbalance() -> float:
        counts = torch.bincount(layer.router(x).topk_ids_TK.reshape(-1), minlength=E).float()
        layer.router.load_E.zero_()
        return float(counts.max() / counts.mean())

    start = imbalance()
    for _ in range(200):
        layer.router(x)
        update_correction_biases(layer, Comm.local())
    end = imbalance()
    assert start > 2.5, start
    assert end < 1.3, (start, end)
    assert float(layer.router.e_score_correction_bias[0]) < 0


@pytest.mark.parametrize(
    "moe, msg",
    [
        (dict(n_group=3), "moe.n_group=3 must divide moe.num_experts=8"),
        (dict(n_group=4, topk_group=5), "moe.topk_group=5 is out of range"),
        (dict(n_group=4, topk_group=1, top_k=3), "moe.topk_group=1 groups hold 2 experts, fewer than moe.top_k=3"),
        (dict(bias_update_rate=0.1), "moe.bias_update_rate=0.1 needs moe.correction_bias=true"),
        (dict(score="tanh"), "moe.score='tanh' is not valid; choose one of: softmax, sigmoid"),
    ],
)
def test_routing_config_errors(moe, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        validate(Config(moe=MoEConfig(num_experts=8, **moe)))


def test_shared_experts_run_while_the_dispatch_is_in_flight():
    """The layer starts the dispatch, computes the shared experts, then waits for the dispatch."""
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=5, activation="swiglu", shared_experts=1)
    layer = MoELayer(cfg, D, Comm.local(), 0).double()
    init_layer(layer, cfg)
    calls: list[str] = []

    def spy(obj, name):
        inner = getattr(obj, name)

        def wrapped(*a, **k):
            calls.append(name)
            return inner(*a, **k)

        setattr(obj, name, wrapped)

    for name in ("dispatch_start", "dispatch_wait"):
        spy(layer.dispatcher, name)
    spy(layer.shared, "forward")
    layer(torch.randn(2, 3, D, dtype=torch.float64))
    assert calls == ["dispatch_start", "forward", "dispatch_wait"], calls
