"""LSH-MoE: exact invariants of the compressed path, bytes on the wire, determinism, target mode.

Single-process invariants (identity expert, linear expert, bucket means) use the compressor and the
layer directly; the multi-process checks run two real gloo ranks in float64.
"""

from __future__ import annotations

import pytest
import torch
from conftest import EXACT
from moe_cases import D, init_layer, rank_input

from lshmoe.compress.hashing import combine_codes, draw_projections, hash_codes
from lshmoe.compress.lsh import LSHCompressor
from lshmoe.config import Config, ConfigError, LSHConfig, MoEConfig, validate
from lshmoe.distributed.comm import Comm
from lshmoe.moe.layer import MoELayer
from lshmoe.seeding import generator
from lshmoe.testing import run_ranks

FINE = LSHConfig(family="cross_polytope", num_hashes=8, buckets_per_hash=2 * D)  # every row its own bucket
COARSE = LSHConfig(
    family="cross_polytope", num_hashes=2, buckets_per_hash=2, compensation="identity"
)  # many rows per bucket, the paper's residual compensation


def _layer(comm, lsh: LSHConfig | None, activation="gelu", E=4, K=2, layer_id=0):
    cfg = MoEConfig(num_experts=E, top_k=K, d_expert=5, activation=activation, compress="lsh" if lsh else "identity")
    layer = MoELayer(cfg, D, comm, layer_id=layer_id, settings=Config(lsh=lsh or LSHConfig()), seed=3).double()
    init_layer(layer, cfg)
    return layer


def _grouped_rows(n_per_expert=(7, 0, 5, 9), seed=0):
    g = generator(seed, "rows")
    counts = torch.tensor(n_per_expert)
    return torch.randn(int(counts.sum()), D, generator=g, dtype=torch.float64), counts


# ----------------------------------------------------------------------------------- hash families


@pytest.mark.parametrize(
    "family, b", [("cross_polytope", 2), ("cross_polytope", 6), ("hyperplane", 2), ("hyperplane", 8)]
)
def test_hash_codes_range_and_scale_invariance(family, b):
    x, _ = _grouped_rows()
    R = draw_projections(family, D, 5, b, generator(1))
    codes = hash_codes(x, R, family)
    assert codes.shape == (x.shape[0], 5) and int(codes.min()) >= 0 and int(codes.max()) < b
    assert torch.equal(codes, hash_codes(3.7 * x, R, family))
    ids = combine_codes(codes, b)
    assert int(ids.max()) < b**5


def test_cross_polytope_projections_are_orthonormal():
    R = draw_projections("cross_polytope", 16, 3, 8, generator(2))  # [D, L, P]
    for ell in range(3):
        Q = R[:, ell, :]
        assert torch.allclose(Q.t() @ Q, torch.eye(4), atol=1e-5)


# ----------------------------------------------------------------------------------- compressor invariants


@pytest.mark.parametrize(
    "lsh",
    [
        COARSE,
        LSHConfig(num_hashes=3, buckets_per_hash=4, center=True),
        LSHConfig(family="hyperplane", num_hashes=2, buckets_per_hash=2),
    ],
)
def test_centroids_are_bucket_means_and_residuals_sum_to_zero(lsh):
    x, counts = _grouped_rows()
    comp = LSHCompressor(lsh, 4, D, layer_id=0, seed=5)
    payload, sent, meta = comp.compress(x, counts)
    assert payload.shape[0] < x.shape[0], "coarse hashing must merge rows"
    assert int(sent.sum()) == payload.shape[0] and int(sent[1]) == 0, "an empty group sends nothing"
    for m in range(payload.shape[0]):
        members = meta.inverse_N == m
        assert torch.allclose(payload[m], x[members].mean(0), atol=EXACT, rtol=0)
        assert (x[members] - payload[m]).sum(0).abs().max() <= EXACT
        assert meta.expert_N[members].unique().numel() == 1, "a bucket never mixes experts"


def test_linear_expert_error_is_W_minus_I_times_residual():
    x, counts = _grouped_rows()
    comp = LSHCompressor(COARSE, 4, D, layer_id=0, seed=5)
    payload, sent, meta = comp.compress(x, counts)
    g = generator(9, "linear")
    W = torch.randn(4, D, D, generator=g, dtype=torch.float64)
    b = torch.randn(4, D, generator=g, dtype=torch.float64)
    e_payload = torch.repeat_interleave(torch.arange(4), sent)
    out = torch.einsum("md,mdk->mk", payload, W[e_payload]) + b[e_payload]
    restored = comp.restore(out, meta)
    exact = torch.einsum("nd,ndk->nk", x, W[meta.expert_N]) + b[meta.expert_N]
    c = payload[meta.inverse_N]
    expected_err = torch.einsum("nd,ndk->nk", x - c, W[meta.expert_N]) - (x - c)  # (W - I)(x - c), row form
    assert (exact - restored - expected_err).abs().max() <= EXACT


@pytest.mark.parametrize(
    "lsh", [COARSE, LSHConfig(num_hashes=1, buckets_per_hash=2, center=True, compensation="identity")]
)
def test_identity_expert_compensation_is_exact_for_any_bucketing(lsh):
    comm = Comm.local()
    lsh_layer = _layer(comm, lsh, activation="identity")
    plain = _layer(comm, None, activation="identity")
    x, _ = rank_input(0, 23, starve=False)
    out = lsh_layer(x)
    assert out.rows_sent < out.rows_routed
    assert (out.y_TD - plain(x).y_TD).abs().max() <= EXACT


def test_same_seed_and_step_give_same_buckets():
    x, counts = _grouped_rows()

    def buckets(step, redraw=1, seed=5):
        comp = LSHCompressor(LSHConfig(num_hashes=4, buckets_per_hash=2, redraw_every=redraw), 4, D, 0, seed)
        comp.set_step(step)
        return comp.compress(x, counts)[2].inverse_N

    assert torch.equal(buckets(3), buckets(3))
    assert any(not torch.equal(buckets(3), buckets(s)) for s in (4, 5, 6)), "projections must be redrawn per step"
    assert torch.equal(buckets(3, redraw=0), buckets(40, redraw=0)), "redraw_every=0 keeps one projection"
    assert torch.equal(buckets(8, redraw=10), buckets(9, redraw=10))


def test_rate_target_holds_the_target():
    g = generator(4, "cl")
    centers = torch.randn(12, D, generator=g, dtype=torch.float64)
    x = centers[torch.randint(0, 12, (400,), generator=g)] + 0.3 * torch.randn(400, D, generator=g, dtype=torch.float64)
    counts = torch.tensor([100, 100, 100, 100])
    lsh = LSHConfig(num_hashes=12, buckets_per_hash=2, target="rate", target_value=0.2, ema=0.0)
    comp = LSHCompressor(lsh, 4, D, 0, seed=1)
    _, sent, _ = comp.compress(x, counts)
    L = comp.num_hashes
    rate = float(sent.sum()) / 400
    assert 1 <= L < 12 and rate <= 0.2
    rates = comp.controller.rate
    assert rates[L] > 0.2, "the next L would exceed the target, so L is the largest admissible"


def test_lsh_config_validation():
    for bad, needle in (
        (dict(buckets_per_hash=3), "even"),
        (dict(family="hyperplane", buckets_per_hash=6), "power of two"),
        (dict(num_hashes=40, buckets_per_hash=4), "62 bits"),
        (dict(layers="1,x"), "lsh.layers"),
    ):
        with pytest.raises(ConfigError, match=needle):  # the section alone on construction, the rest in validate
            validate(Config(moe=MoEConfig(compress="lsh"), lsh=LSHConfig(**bad)))


# ----------------------------------------------------------------------------------- two real ranks


def _two_rank_worker(comm):
    out = {}
    # 1) every row its own bucket: output and every gradient equal the uncompressed layer
    res = {}
    for name, lsh in (("lsh", FINE), ("plain", None)):
        layer = _layer(comm, lsh)
        x, cot = rank_input(comm.rank, 9 + 4 * comm.rank, starve=False)
        x.requires_grad_(True)
        o = layer(x)
        ((o.y_TD * cot).sum() + 0.1 * o.aux["load_balance"]).backward()
        res[name] = dict(
            y=o.y_TD.detach(),
            gx=x.grad,
            sent=o.rows_sent,
            routed=o.rows_routed,
            g={n: p.grad for n, p in layer.named_parameters()},
        )
    out["singletons"] = res

    # 2) gradcheck through compress, all-to-all, experts and restore (same shapes on both ranks)
    layer = _layer(comm, COARSE, E=4, K=2)
    x, _ = rank_input(comm.rank, 6, starve=False)
    x = x[:, :D].clone().requires_grad_(True)
    o = layer(x)
    out["gradcheck_merged"] = o.rows_sent < o.rows_routed
    out["gradcheck"] = torch.autograd.gradcheck(lambda t: layer(t).y_TD, (x,), eps=1e-6, atol=1e-6)

    # 3) ledger bytes on clustered inputs: 3 well-separated clusters, top-1
    g = generator(77, "clusters")
    centers = 4 * torch.randn(3, D, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2, 1, 0, 2, 1][: 10 + comm.rank])
    xc = centers[labels] + 1e-7 * torch.randn(labels.numel(), D, generator=g, dtype=torch.float64)
    results = {}
    for name, lsh in (("lsh", LSHConfig(num_hashes=6, buckets_per_hash=4)), ("plain", None)):
        layer = _layer(comm, lsh, E=4, K=1)
        comm.ledger.end_step()
        xx = xc.clone().requires_grad_(True)
        o = layer(xx)
        o.y_TD.sum().backward()
        step = comm.ledger.end_step()
        ids = layer.router(xc).topk_ids_TK.view(-1)
        results[name] = dict(
            fwd=step.a2a_bytes_fwd,
            bwd=step.a2a_bytes_bwd,
            meta=step.a2a_meta_bytes,
            ids=ids.tolist(),
            labels=labels.tolist(),
            sent=o.rows_sent,
        )
    out["bytes"] = results
    return out


def _peer_rows(per_rank, r, q, distinct):
    """Rows rank r sends to rank q (experts 2q, 2q+1): tokens, or distinct clusters per expert."""
    ids, labels = per_rank[r]["ids"], per_rank[r]["labels"]
    pairs = [(e, lab) for e, lab in zip(ids, labels, strict=True) if e // 2 == q]
    return len(set(pairs)) if distinct else len(pairs)


@pytest.mark.slow
def test_lsh_two_ranks_exactness_gradcheck_and_bytes():
    results = run_ranks(_two_rank_worker, 2, timeout_s=60)
    for res in results:
        s = res["singletons"]
        assert s["lsh"]["sent"] == s["lsh"]["routed"], "FINE hashing must give one row per bucket"
        assert (s["lsh"]["y"] - s["plain"]["y"]).abs().max() <= EXACT
        assert (s["lsh"]["gx"] - s["plain"]["gx"]).abs().max() <= EXACT
        for n, g in s["plain"]["g"].items():
            assert (s["lsh"]["g"][n] - g).abs().max() <= EXACT, n
        assert res["gradcheck_merged"] and res["gradcheck"]
    row = D * 8
    per = {r: results[r]["bytes"]["lsh"] for r in range(2)}
    per_plain = {r: results[r]["bytes"]["plain"] for r in range(2)}
    for r in range(2):
        q = 1 - r
        lsh_rows = _peer_rows(per, r, q, distinct=True) + _peer_rows(per, q, r, distinct=True)
        plain_rows = _peer_rows(per_plain, r, q, distinct=False) + _peer_rows(per_plain, q, r, distinct=False)
        b = per[r]
        assert b["fwd"] == lsh_rows * row and b["bwd"] == lsh_rows * row, (b, lsh_rows)
        assert b["meta"] == 16
        assert per_plain[r]["fwd"] == plain_rows * row
        assert b["fwd"] < per_plain[r]["fwd"], "clustered inputs must cut the bytes"


# ----------------------------------------------------------------------------------- compensation modes


def test_restore_ops_gradients_match_autograd():
    from lshmoe.compress.ops import restore_compensated, segment_mean

    g = generator(11, "ops")
    x = torch.randn(9, D, generator=g, dtype=torch.float64, requires_grad=True)
    inv = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0, 2])
    size = torch.bincount(inv)
    out = torch.randn(4, D, generator=g, dtype=torch.float64, requires_grad=True)
    for alpha in (1.0, 0.35):

        def f(a, b, alpha=alpha):
            return restore_compensated(b, segment_mean(a, inv, size), a, inv, alpha)

        assert torch.autograd.gradcheck(f, (x, out))
        means = torch.zeros(4, D, dtype=torch.float64).index_add(0, inv, x) / size[:, None]
        ref = out[inv] + alpha * (x - means[inv])
        got = restore_compensated(out, segment_mean(x, inv, size), x, inv, alpha)
        assert (got - ref).abs().max() <= EXACT


def test_calibrated_compensation_fits_a_scaled_identity_expert():
    """E(x) = 0.7 x + b: the fitted scale is 0.7 and the restore becomes exact."""
    comm = Comm.local()
    lsh = LSHConfig(num_hashes=2, buckets_per_hash=2, compensation="calibrated", probe_every=1, probe_rows=64)
    layer = _layer(comm, lsh, activation="linear", K=1)
    with torch.no_grad():
        layer.experts.w_GDD.copy_(0.7 * torch.eye(D, dtype=torch.float64).expand(4, D, D))
    x, _ = rank_input(0, 40, starve=False)
    layer.set_step(0)
    first = layer(x)
    assert first.stats["lsh_alpha"] == 0.0 and first.stats["lsh_alpha_fit"] == pytest.approx(0.7)
    layer.set_step(1)
    second = layer(x)
    assert second.stats["lsh_alpha"] == pytest.approx(0.7)
    # (the error is the root of a difference of sums: its floor is ~sqrt(machine epsilon))
    assert second.stats["lsh_restore_err"] < 1e-6 < second.stats["lsh_restore_err_nocomp"]
    exact = _layer(comm, None, activation="linear", K=1)
    exact.load_state_dict(layer.state_dict())
    assert (second.y_TD - exact(x).y_TD).abs().max() <= 1e-9


def test_probe_error_equals_direct_computation():
    comm = Comm.local()
    lsh = LSHConfig(num_hashes=2, buckets_per_hash=2, compensation="identity", probe_every=1, probe_rows=10_000)
    layer = _layer(comm, lsh, activation="gelu", K=1)
    x, _ = rank_input(0, 30, starve=False)
    out = layer(x)
    route = layer.router(x)
    from lshmoe.moe.permute import permute_rows, sort_by_expert

    perm, counts = sort_by_expert(route.topk_ids_TK, 4)
    rows = permute_rows(x, perm, 1)
    comp = LSHCompressor(lsh, 4, D, 0, seed=3)
    payload, sent, meta = comp.compress(rows, counts)
    exact = layer.experts(rows, counts.tolist())
    e_c = layer.experts(payload, sent.tolist())[meta.inverse_N]
    c = payload[meta.inverse_N]
    norm = exact.norm()
    exact, e_c, rows, c, norm = exact.detach(), e_c.detach(), rows.detach(), c.detach(), norm.detach()
    assert out.stats["lsh_restore_err"] == pytest.approx(float((exact - e_c - (rows - c)).norm() / norm), rel=1e-9)
    assert out.stats["lsh_restore_err_nocomp"] == pytest.approx(float((exact - e_c).norm() / norm), rel=1e-9)


def test_calibrated_mode_probes_by_default():
    """compensation=calibrated with probe_every left at 0 probes every 10 steps (and fits a)."""
    comm = Comm.local()
    layer = _layer(comm, LSHConfig(num_hashes=2, buckets_per_hash=2, compensation="calibrated"), K=1)
    x, _ = rank_input(0, 30, starve=False)
    for step, probed in ((0, True), (3, False), (10, True)):
        layer.set_step(step)
        stats = layer(x).stats
        assert stats["lsh_probe_n"] == (1.0 if probed else 0.0), step
    assert layer.compressor._fitted and 0.0 <= layer.compressor.alpha <= 1.5
