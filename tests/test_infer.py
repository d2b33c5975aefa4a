"""Lina's inference placement: the planner, the path profiles, the replica dispatcher, the engine.

The planner and the profiles are checked on hand-made tables; the dispatcher and the engine run on
real gloo ranks. Replicated inference must give exactly (torch.equal, float64) the logits of uniform
expert parallelism and of a single-process forward of the same model.
"""

from __future__ import annotations

import pytest
import torch
from conftest import EXACT

from lshmoe.config import Config, ModelConfig, MoEConfig, TrainConfig
from lshmoe.distributed.comm import Comm
from lshmoe.infer.dispatch import ReplicaDispatcher
from lshmoe.infer.engine import InferConfig, InferenceEngine
from lshmoe.infer.placement import (
    Placement,
    device_loads,
    plan_placement,
    replica_counts,
    send_table,
    split_sizes,
    uniform_placement,
)
from lshmoe.infer.profile import (
    build_profile,
    estimate_popularity,
    layer_accuracy,
    path_distribution,
    top_experts,
    top_match,
)
from lshmoe.infer.scheduler import TwoPhaseScheduler
from lshmoe.models.gpt import GPTMoE
from lshmoe.moe.experts import GroupedExperts
from lshmoe.moe.permute import sort_by_expert
from lshmoe.seeding import generator
from lshmoe.testing import run_ranks

# ----------------------------------------------------------------------------------- placement planner


def test_hot_expert_replicated_cold_experts_packed():
    pl = plan_placement(torch.tensor([0.5, 0.25, 0.125, 0.125]), 4)
    assert pl.replicas == ((0, 1), (2,), (3,), (3,))
    assert pl.replica_counts() == [2, 1, 1, 1]
    assert pl.experts_on(3) == [2, 3]
    assert pl.load_W == pytest.approx((0.25, 0.25, 0.25, 0.25))


def test_first_fit_decreasing_order_and_overflow():
    # All cold on 4 devices (capacity 25 of 100 rows each). Packing order by popularity, ties by id:
    # e1 20, e5 18, e3 15, e4 12, e7 12, e0 10, e6 8, e2 5. e6 fits nowhere -> least-loaded device (1).
    counts = [10, 20, 5, 15, 12, 18, 8, 12]
    pl = plan_placement(counts, 4)
    assert pl.replicas == ((2,), (0,), (0,), (2,), (3,), (1,), (1,), (3,))
    assert pl.load_W == pytest.approx((0.25, 0.26, 0.25, 0.24))


def test_replicas_fit_the_devices():
    # n = [1.5, 1.5, 1.0] rounds up to 5 replicas on 4 devices; the tie on 1.5 / 1 drops one of expert 0.
    assert replica_counts([0.375, 0.375, 0.25], 4) == {0: 1, 1: 2, 2: 1}
    assert plan_placement([0.375, 0.375, 0.25], 4).replicas == ((0,), (1, 2), (3,))
    # round half up, and a hot expert's load proportional to its devices
    assert replica_counts([0.625, 0.125, 0.125, 0.125], 4) == {0: 3}
    assert plan_placement([1.0, 0.0, 0.0, 0.0], 4).replicas[0] == (0, 1, 2, 3)


def test_zero_popularity_experts_are_placed():
    pl = plan_placement([0, 7, 0, 0, 0, 0], 2)
    assert pl.replicas[1] == (0, 1)
    assert all(len(r) >= 1 for r in pl.replicas)
    assert plan_placement([0, 0, 0, 0], 2) == plan_placement([1, 1, 1, 1], 2)  # no information: uniform


@pytest.mark.parametrize("seed", range(20))
def test_planner_invariants_and_determinism(seed):
    g = generator(seed, "placement")
    E, N = [(4, 4), (8, 4), (8, 2), (16, 4), (6, 3)][seed % 5]
    p = torch.rand(E, generator=g) ** (6 if seed % 2 else 1)  # odd seeds: heavily skewed
    pl = plan_placement(p, N)
    assert pl == plan_placement(p.clone(), N)
    assert pl.replicas == plan_placement(p * 3.0, N).replicas
    assert pl.num_experts == E and pl.num_devices == N
    assert all(r and all(0 <= d < N for d in r) and list(r) == sorted(set(r)) for r in pl.replicas)
    reps = replica_counts(p, N)
    assert sum(reps.values()) <= N
    hot_devices = [d for e in reps for d in pl.replicas[e]]
    assert len(hot_devices) == len(set(hot_devices)), "hot experts get devices of their own"
    assert sum(pl.load_W) == pytest.approx(1.0)


def test_uniform_placement():
    pl = uniform_placement(8, 4)
    assert pl.replicas == ((0,), (0,), (1,), (1,), (2,), (2,), (3,), (3,))
    with pytest.raises(ValueError):
        uniform_placement(6, 4)


def test_even_split_over_replicas_and_device_loads():
    assert split_sizes(7, 3, align=1) == [3, 2, 2] and split_sizes(2, 3, align=1) == [1, 1, 0]
    assert split_sizes(0, 2) == [0, 0]
    # aligned cuts: whole 16-row units shared out, the leftover rows end the last piece
    assert split_sizes(50, 2) == [32, 18] and split_sizes(100, 3) == [32, 32, 36] and split_sizes(7, 3) == [0, 0, 7]
    assert split_sizes(64, 4) == [16] * 4 and split_sizes(80, 4) == [32, 16, 16, 16]
    pl = Placement(replicas=((0, 1, 2), (3,), (3,), (0,)), load_W=(0.25,) * 4)
    table = send_table(torch.tensor([7, 4, 0, 1]), pl, align=1)
    assert table.tolist() == [[3, 0, 0, 1], [2, 0, 0, 0], [2, 0, 0, 0], [0, 4, 0, 0]]
    counts_SE = torch.tensor([[7, 4, 0, 1], [2, 0, 0, 0]])
    assert device_loads(counts_SE, pl, align=1).tolist() == [4 + 1, 2 + 1, 2, 4]
    assert device_loads(counts_SE, uniform_placement(4, 4)).tolist() == [9, 4, 0, 1]
    assert device_loads(torch.tensor([40, 0, 0, 0]), pl).tolist() == [16, 16, 8, 0]


# ----------------------------------------------------------------------------------- path profiles

# 6 profiled tokens, 3 experts, 3 MoE layers (rows: layers, columns: tokens)
TOP1_LT = torch.tensor([[0, 0, 0, 1, 1, 2], [1, 1, 2, 0, 0, 0], [2, 2, 1, 0, 1, 1]])


def test_profile_tables():
    prof = build_profile(TOP1_LT, num_experts=3, path_len=3)
    assert [len(t) for t in prof.tables] == [1, 2, 3]  # layer i has paths of length 0..min(3, i)
    marginal = prof.tables[0][0]
    assert marginal.keys_P.tolist() == [0]
    assert torch.allclose(marginal.probs_PE, torch.tensor([[3 / 6, 2 / 6, 1 / 6]], dtype=torch.float64))
    t1 = prof.tables[1][1]  # layer 1 given layer 0's expert
    assert t1.keys_P.tolist() == [0, 1, 2] and t1.tokens_P.tolist() == [3, 2, 1]
    assert torch.allclose(t1.probs_PE, torch.tensor([[0, 2 / 3, 1 / 3], [1, 0, 0], [1, 0, 0]], dtype=torch.float64))
    t2 = prof.tables[2][2]  # layer 2 given (layer 0, layer 1): code = e0 + 3 * e1
    assert t2.keys_P.tolist() == [1, 2, 3, 6]  # (1,0) (2,0) (0,1) (0,2)
    assert torch.allclose(t2.probs_PE[2], torch.tensor([0, 0, 1], dtype=torch.float64))  # path (0,1): both -> 2


def test_popularity_estimate_with_top_k_truncation():
    prof = build_profile(TOP1_LT, num_experts=3)
    history = torch.tensor([[0], [1]])  # two tokens: layer-0 experts 0 and 1
    est = estimate_popularity(prof, 1, history, top_k=2)
    assert torch.allclose(est, torch.tensor([0.5, 1 / 3, 1 / 6], dtype=torch.float64))
    est1 = estimate_popularity(prof, 1, history, top_k=1)  # token 0 keeps only expert 1
    assert torch.allclose(est1, torch.tensor([0.5, 1 / 3, 0.0], dtype=torch.float64))
    assert torch.allclose(
        estimate_popularity(prof, 0, torch.zeros(5, 0, dtype=torch.int64), top_k=3),
        torch.tensor([0.5, 1 / 3, 1 / 6], dtype=torch.float64),
    )


def test_unseen_path_backs_off_to_its_suffix():
    prof = build_profile(TOP1_LT, num_experts=3)
    # (2, 2) never occurs before layer 2; its suffix (layer 1 = 2) did once, going to expert 1.
    dist = path_distribution(prof, 2, torch.tensor([[2, 2]]), top_k=3)
    assert torch.allclose(dist, torch.tensor([[0, 1, 0]], dtype=torch.float64))
    # (1, 1): layer 1 = 1 seen twice, going to expert 2 both times
    assert torch.allclose(
        path_distribution(prof, 2, torch.tensor([[1, 1]]), top_k=3), torch.tensor([[0, 0, 1]], dtype=torch.float64)
    )


def test_profile_of_routed_experts_weighs_each_route_one_over_k():
    top1_LT = torch.tensor([[0, 0, 1], [1, 1, 2]])
    routes_LTK = torch.tensor([[[0, 2], [0, 1], [1, 0]], [[1, 2], [1, 0], [2, 1]]])
    prof = build_profile(top1_LT, num_experts=3, routes_LTK=routes_LTK)
    t = prof.tables[1][1]  # layer 1 given layer 0's top-1: path 0 routes (1,2),(1,0); path 1 routes (2,1)
    assert t.keys_P.tolist() == [0, 1] and t.tokens_P.tolist() == [2, 1]
    assert torch.allclose(t.probs_PE, torch.tensor([[0.25, 0.5, 0.25], [0, 0.5, 0.5]], dtype=torch.float64))
    assert torch.allclose(prof.tables[0][0].probs_PE, torch.tensor([[0.5, 2 / 6, 1 / 6]], dtype=torch.float64))
    # the estimate is then the load share: each token's K routes weigh 1/K
    est = estimate_popularity(prof, 1, torch.tensor([[0], [0], [1]]), top_k=3)
    assert torch.allclose(est, torch.tensor([1 / 6, 0.5, 1 / 3], dtype=torch.float64))


def test_top_two_match_and_accuracy():
    est = torch.tensor([0.5, 1 / 3, 1 / 6], dtype=torch.float64)
    assert top_experts(est) == (0, 1)
    assert top_experts(torch.tensor([1, 3, 3, 0])) == (1, 2)  # ties: the lower id first
    assert top_match(est, torch.tensor([4, 5, 1]))  # same two experts
    assert not top_match(est, torch.tensor([4, 5, 1]), ordered=True)  # not in the same order
    assert not top_match(est, torch.tensor([4, 1, 5]))
    prof = build_profile(TOP1_LT, num_experts=3)
    # layer 0: marginal top-2 {0, 1} == actual; layers 1 and 2 are predicted from their own paths
    assert layer_accuracy(prof, TOP1_LT) == [True, True, True]
    shuffled = TOP1_LT.clone()
    shuffled[2] = torch.tensor([0, 0, 0, 2, 2, 2])
    assert layer_accuracy(prof, shuffled) == [True, True, False]


# ----------------------------------------------------------------------------------- two-phase scheduling


def test_phase_two_keeps_a_right_estimate_and_replans_a_wrong_one():
    # profile: layer 1 follows layer 0's expert (0 -> 0, 1 -> 1, 2 -> 2, 3 -> 3)
    prof = build_profile(torch.tensor([[0, 1, 2, 3] * 4, [0, 1, 2, 3] * 4]), num_experts=4)
    sched = TwoPhaseScheduler(Comm.local(), 4, 2, placement="popularity", profile=prof)
    sched.begin_batch(8)
    sched.routed(0, torch.tensor([[0], [0], [0], [0], [0], [0], [1], [2]]), 8, 0.0, 0.0)
    sched.start_estimate(1)  # estimate for layer 1: 6/8 on expert 0, 1/8 on 1 and 2
    est_plan = plan_placement(torch.tensor([6.0, 1.0, 1.0, 0.0]), 1)
    kept = sched.place(1, torch.tensor([5, 2, 1, 0]))  # actual top-2 {0, 1} == estimate's
    assert not sched.record(1).replanned and sched.record(1).matched and kept == est_plan
    sched.start_estimate(1)
    replanned = sched.place(1, torch.tensor([0, 1, 3, 4]))  # actual top-2 {3, 2}
    rec = sched.record(1)
    assert rec.replanned and not rec.matched and rec.estimate_top == (0, 1) and rec.actual_top == (3, 2)
    assert replanned == plan_placement(torch.tensor([0, 1, 3, 4]), 1)
    sched.set_mode("uniform")
    assert sched.place(1, torch.tensor([0, 1, 3, 4])) == uniform_placement(4, 1)


# ----------------------------------------------------------------------------------- replica dispatcher

# Expert 0 on ranks 0, 1, 2; expert 1 on 0; experts 2 and 3 on 1. Rank 3 serves nothing, expert 3 gets
# no rows, rank 2 has no tokens.
SKEWED = Placement(replicas=((0, 1, 2), (0,), (1,), (1,)), load_W=(0.25,) * 4)
DISPATCH_TOKENS = [9, 6, 0, 5]


def _dispatch_worker(comm):
    E, D = 4, 6
    g = generator(11, "x", comm.rank)
    T = DISPATCH_TOKENS[comm.rank]
    x_TD = torch.randn(T, D, generator=g, dtype=torch.float64)
    ids_TK = (torch.randperm(T, generator=g) % 3)[:, None]  # never expert 3
    perm_N, counts_E = sort_by_expert(ids_TK, E)
    rows_ND = x_TD.index_select(0, perm_N)
    experts = GroupedExperts(E, D, 5, "linear").double()
    experts.reset_parameters(3, 0, 0.5, 0.5)
    with torch.no_grad():
        ref_ND = experts(rows_ND, counts_E.tolist())
        disp = ReplicaDispatcher(comm, comm.group("world"), E, 0, SKEWED, align=1)
        meta = disp.plan(counts_E)
        local = disp.dispatch(rows_ND, meta)
        out_ND = disp.combine(experts(local, meta.local_counts), meta)
        # source-major form: rows stay [source][expert]; the experts run once per source
        sm = ReplicaDispatcher(comm, comm.group("world"), E, 1, SKEWED, align=1, source_major=True)
        meta2 = sm.plan(counts_E)
        parts = torch.split(sm.dispatch(rows_ND, meta2), meta2.out_splits)
        outs = [experts(p, c) for p, c in zip(parts, meta2.recv_WE.tolist(), strict=True)]
        out2_ND = sm.combine(torch.cat(outs), meta2)
    return {
        "err": (out_ND - ref_ND).abs().max().item() if T else 0.0,
        "local_counts": meta.local_counts,
        "shape": tuple(out_ND.shape),
        "rows": T,
        "exact_source_major": torch.equal(out2_ND, ref_ND),
        "recv": meta2.recv_WE,
    }


@pytest.mark.slow
def test_replica_dispatcher_idle_expert_and_idle_rank():
    res = run_ranks(_dispatch_worker, 4, timeout_s=30)
    for r, out in enumerate(res):
        assert out["err"] <= EXACT, (r, out["err"])
        assert out["shape"] == (out["rows"], 6)
        assert len(out["local_counts"]) == 4
        assert out["local_counts"][3] == 0  # expert 3: no rows anywhere
        assert out["exact_source_major"], r
        assert out["recv"].sum(0).tolist() == out["local_counts"]
    assert res[3]["local_counts"] == [0, 0, 0, 0]  # rank 3 serves no expert
    assert res[2]["local_counts"][1:] == [0, 0, 0]  # rank 2 serves only (a replica of) expert 0
    assert sum(sum(o["local_counts"]) for o in res) == sum(DISPATCH_TOKENS)
    assert res[0]["local_counts"][0] > 0 and res[1]["local_counts"][0] > 0 and res[2]["local_counts"][0] > 0


# ----------------------------------------------------------------------------------- the engine

VOCAB = 64


def _model_cfg(top_k: int = 2) -> Config:
    return Config(
        model=ModelConfig(d_model=16, n_layers=4, n_heads=2, seq_len=12, moe_every=1),
        moe=MoEConfig(num_experts=8, top_k=top_k, d_expert=32),
        train=TrainConfig(dtype="float64", seed=5),
    )


def _skew(model) -> None:
    """Make expert 0 every token's choice in MoE layers 0 and 2 (so Lina must replicate it): the norm
    in front of those routers gets a large bias along a direction expert 0's gate vector favours."""
    u = torch.zeros(model.mcfg.d_model, dtype=torch.float64)
    u[0] = 1.0
    with torch.no_grad():
        for unit in (model.blocks[0], model.blocks[2]):
            unit.norm2.bias.copy_(4.0 * u)
            unit.ffn.router.weight[0].add_(3.0 * u)


def _batch(rank: int, kind: str, i: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = generator(17, kind, rank, i)
    w = torch.randint(0, VOCAB, (3, 13), generator=g)
    return w[:, :-1], w[:, 1:]


def _engine_worker(comm, top_k):
    eng = InferenceEngine(_model_cfg(top_k), comm, VOCAB, InferConfig(placement="popularity"))
    _skew(eng.model)
    eng.profile([_batch(comm.rank, "train", i)[0] for i in range(3)])
    x, y = _batch(comm.rank, "val")
    out = {}
    for mode in ("uniform", "popularity", "uniform"):
        eng.set_placement(mode)
        o, m = eng.score(x, y)
        out[mode] = {"logits": o.logits_BSV, "loss": o.ce_loss, "metrics": m}
    return out


def _single_process_logits(rank: int, top_k: int = 2) -> torch.Tensor:
    """The same model as plain GPTMoE (standard MoELayer, one process) on the rank's batch."""
    cfg = _model_cfg(top_k)
    model = GPTMoE(cfg.model, cfg.moe, VOCAB, Comm.local(), seed=cfg.train.seed).double()
    model.reset_parameters(cfg.train.seed)
    model.eval()
    _skew(model)
    with torch.no_grad():
        return model(*_batch(rank, "val")).logits_BSV


@pytest.mark.slow
@pytest.mark.parametrize("world, top_k", [(2, 1), (4, 2)])  # expert 0 takes > 1.5 devices' share
def test_replicated_inference_is_exact(world, top_k):
    res = run_ranks(_engine_worker, world, top_k, timeout_s=60)
    replicated = False
    for r, out in enumerate(res):
        ref = _single_process_logits(r, top_k)
        assert torch.equal(out["uniform"]["logits"], ref), r
        assert torch.equal(out["popularity"]["logits"], ref), r
        assert torch.equal(out["popularity"]["loss"], out["uniform"]["loss"]), r
        m = out["popularity"]["metrics"]
        assert m.replicas_LE == res[0]["popularity"]["metrics"].replicas_LE, "every rank plans the same placement"
        assert all(isinstance(v, bool) for v in m.matched)
        replicated |= max(max(reps) for reps in m.replicas_LE) > 1
        u = out["uniform"]["metrics"]
        assert all(reps == [1] * 8 for reps in u.replicas_LE) and u.matched == [None] * 4
        assert [sum(rows) for rows in m.rows_LW] == [sum(rows) for rows in u.rows_LW] == [top_k * 3 * 12 * world] * 4
    assert replicated, "the skewed layers must replicate expert 0"
    if top_k == 1:  # every row of a skewed layer is expert 0's: its replicas take the load off one rank
        m, u = res[0]["popularity"]["metrics"], res[0]["uniform"]["metrics"]
        assert max(m.load_max_over_mean()[i] for i in (0, 2)) < max(u.load_max_over_mean()[i] for i in (0, 2))


def test_engine_single_process_matches_plain_model():
    eng = InferenceEngine(_model_cfg(), Comm.local(), VOCAB)
    _skew(eng.model)
    batches = [_batch(0, "train", i)[0] for i in range(2)]
    ids_LTK = eng.record_routes(batches)
    assert ids_LTK.shape == (4, 2 * 3 * 12, 2) and bool((ids_LTK[0, :, 0] == 0).all())  # layer 0 is skewed
    for routes in ("top1", "all"):
        prof = eng.profile(batches, routes)
        assert prof.tables[0][0].probs_PE[0, 0] == (1.0 if routes == "top1" else 0.5)
        for mode in ("popularity", "uniform"):
            eng.set_placement(mode)
            o, m = eng.score(*_batch(0, "val"))
            assert torch.equal(o.logits_BSV, _single_process_logits(0)), mode
            assert m.rows_LW == [[72]] * 4


def test_popularity_needs_a_profile():
    eng = InferenceEngine(_model_cfg(), Comm.local(), VOCAB)
    with pytest.raises(RuntimeError, match="profile"):
        eng.score(*_batch(0, "val"))
