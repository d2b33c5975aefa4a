"""Causal-safe LSH (`lsh.causal`): in a causal LM a token's output never depends on a later token of
its own sequence.

The compressor's invariants are checked on realistically ordered rows (PyTorch path; the fused path
against it in tests/test_kernels.py); the property itself in float64 on two real gloo ranks (every
MoE output at positions <= t bitwise unchanged when token t + j changes, and changed with causal
off, so the test can fail) and on a whole GPT-MoE with two compressing layers (the logits at
positions <= t; `causal_mode=earliest`, the strict one: `split` leaves a second-order path there).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from moe_cases import D, init_layer

from lshmoe.compress.lsh import LSHCompressor
from lshmoe.compress.protocol import Positions
from lshmoe.compress.registry import CompressorContext, build_compressor
from lshmoe.config import Config, ConfigError, LSHConfig, ModelConfig, MoEConfig
from lshmoe.distributed.comm import Comm
from lshmoe.errors import UserError
from lshmoe.models.gpt import GPTMoE
from lshmoe.moe.layer import MoELayer
from lshmoe.moe.permute import permute_rows, sort_by_expert
from lshmoe.seeding import generator
from lshmoe.testing import run_ranks

E, K, B, S = 4, 2, 3, 16
COARSE = LSHConfig(num_hashes=1, buckets_per_hash=2)  # two buckets per expert: rows of one sequence collide
SPLIT = replace(COARSE, causal_mode="split")


def _routed_rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Positions]:
    """Rows of B sequences of S tokens routed top-K by a random linear router, permuted as the layer
    does: (rows_ND, counts_E, positions)."""
    g = generator(seed, "causal-rows")
    x_TD = torch.randn(B * S, D, generator=g, dtype=torch.float64)
    ids_TK = (x_TD @ torch.randn(D, E, generator=g, dtype=torch.float64)).topk(K, dim=1).indices
    perm_N, counts_E = sort_by_expert(ids_TK, E)
    token_N = perm_N // K
    return permute_rows(x_TD, perm_N, K), counts_E, Positions(token_N // S, token_N % S)


def _compress(lsh: LSHConfig, causal: bool):
    rows, counts, at = _routed_rows()
    comp = LSHCompressor(lsh, E, D, layer_id=0, seed=2, causal=causal)
    comp.set_step(0)
    payload, sent, meta = comp.compress(rows, counts, at)
    return rows, at, payload, meta


@pytest.mark.parametrize(
    "lsh",
    [
        SPLIT,
        replace(SPLIT, num_hashes=2, buckets_per_hash=4),
        replace(SPLIT, exact_spread=1.2),
        replace(SPLIT, num_hashes=3, target="rate", target_value=0.6),
    ],
    ids=["coarse", "b4", "exact-spread", "rate-target"],
)
def test_split_no_bucket_holds_two_rows_of_one_sequence(lsh):
    rows, at, payload, meta = _compress(lsh, causal=True)
    assert (meta.inverse_N * B + at.seq_N).unique().numel() == rows.shape[0], "two rows of a sequence share a bucket"
    assert payload.shape[0] < rows.shape[0], "rows of different sequences still merge"
    _, _, _, plain = _compress(lsh, causal=False)
    assert (plain.inverse_N * B + at.seq_N).unique().numel() < rows.shape[0], "the check can fail: causal off merges"
    for m in range(payload.shape[0]):  # the payload rows are still the means of their buckets
        torch.testing.assert_close(payload[m], rows[meta.inverse_N == m].mean(0), rtol=0, atol=1e-12)


def test_split_sends_the_fewest_rows_a_split_can():
    """A bucket where some sequence has c rows needs c sub-buckets; the occurrence split uses exactly that."""
    _, at, payload, _ = _compress(SPLIT, causal=True)
    _, _, _, plain = _compress(SPLIT, causal=False)
    buckets = range(int(plain.inverse_N.max()) + 1)
    needed = sum(int(torch.bincount(at.seq_N[plain.inverse_N == m]).max()) for m in buckets)
    assert payload.shape[0] == needed


@pytest.mark.parametrize("lsh", [COARSE, replace(COARSE, num_hashes=2, buckets_per_hash=4, compensation="identity")])
def test_earliest_keeps_the_buckets_and_sends_their_earliest_rows(lsh):
    rows, at, payload, meta = _compress(lsh, causal=True)
    _, _, plain_payload, plain = _compress(lsh, causal=False)
    assert torch.equal(meta.inverse_N, plain.inverse_N), "the same buckets, so the same rows sent"
    assert payload.shape[0] < rows.shape[0]
    for m in range(payload.shape[0]):
        members = meta.inverse_N == m
        first = members & (at.pos_N == at.pos_N[members].min())
        torch.testing.assert_close(payload[m], rows[first].mean(0), rtol=0, atol=1e-12)
    assert not torch.allclose(payload, plain_payload), "the check can fail: some bucket spans positions"


def test_options_that_mix_later_rows_need_causal_off():
    for lsh, name in (
        (LSHConfig(center=True), r"center=True"),
        (LSHConfig(projection="pca"), r"projection=pca"),
        (LSHConfig(exact_spread=0.5), r"exact_spread=0.5 \(with causal_mode=earliest"),
    ):
        with pytest.raises(ConfigError, match=rf"lsh.causal \(on by default in a causal LM\) with lsh.{name}"):
            build_compressor("lsh", CompressorContext(E, D, 0, settings=Config(lsh=lsh), causal=True))
        off = Config(lsh=replace(lsh, causal=False))
        assert build_compressor("lsh", CompressorContext(E, D, 0, settings=off, causal=True)).name == "lsh"
    split = Config(lsh=LSHConfig(exact_spread=0.5, causal_mode="split"))
    assert build_compressor("lsh", CompressorContext(E, D, 0, settings=split, causal=True)).split
    assert build_compressor("lsh", CompressorContext(E, D, 0, causal=True)).causal, "none follows the model"
    assert not build_compressor("lsh", CompressorContext(E, D, 0)).causal
    forced = Config(lsh=LSHConfig(causal=True))
    assert build_compressor("lsh", CompressorContext(E, D, 0, settings=forced)).needs_positions


def test_a_causal_compressor_without_positions_says_so():
    rows, counts, _ = _routed_rows()
    with pytest.raises(UserError, match=r"lsh.causal needs each routed row's sequence and position"):
        LSHCompressor(COARSE, E, D, layer_id=0, causal=True).compress(rows, counts)


# ----------------------------------------------------------------------------------- two ranks, the layer

PERTURB = ((2, 1), (6, 3), (9, 6))  # (t, j): token t + j of sequence 1 changes


@torch.no_grad()  # forward values only
def _layer_worker(comm, causal: bool, lsh: LSHConfig) -> dict:
    cfg = MoEConfig(num_experts=E, top_k=K, d_expert=5, compress="lsh")
    layer = MoELayer(cfg, D, comm, 0, settings=Config(lsh=lsh), seed=3, causal=causal).double()
    init_layer(layer, cfg)
    g = generator(11, "causal-x", comm.rank)
    x = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    y0 = layer(x).y_TD
    same, merged = [], []
    for t, j in PERTURB:
        x1 = x.clone()
        x1[1, t + j] += torch.randn(D, generator=g, dtype=torch.float64)
        out = layer(x1)
        same.append(torch.equal(out.y_TD[1, : t + 1], y0[1, : t + 1]))
        merged.append(out.rows_sent < out.rows_routed)
    return {"same": same, "merged": merged}


@pytest.mark.parametrize(
    "lsh", [COARSE, SPLIT, replace(COARSE, num_hashes=2, compensation="identity")], ids=["earliest", "split", "comp"]
)
def test_two_ranks_a_later_token_never_changes_an_earlier_output(lsh):
    on = run_ranks(_layer_worker, 2, True, lsh, timeout_s=60)
    off = run_ranks(_layer_worker, 2, False, lsh, timeout_s=60)
    for r in range(2):
        assert all(on[r]["merged"]) and all(off[r]["merged"])
        assert all(on[r]["same"]), f"rank {r}: an output at a position <= t changed with lsh.causal on"
    assert not all(s for r in range(2) for s in off[r]["same"]), "with causal off the later token must leak"


# ----------------------------------------------------------------------------------- the whole model


def _logits(causal: bool | None, idx: torch.Tensor) -> torch.Tensor:
    m = ModelConfig(d_model=8, n_layers=2, n_heads=2, seq_len=S, moe_every=1)  # two compressing layers
    moe = MoEConfig(num_experts=E, top_k=K, d_expert=6, compress="lsh")
    settings = Config(model=m, moe=moe, lsh=LSHConfig(num_hashes=1, buckets_per_hash=2, causal=causal))
    model = GPTMoE(m, moe, 40, Comm.local(), settings=settings, seed=1).double()
    model.reset_parameters(1)
    return model(idx).logits_BSV


def test_gpt_moe_logits_at_earlier_positions_ignore_later_tokens():
    idx = torch.randint(0, 40, (B, S), generator=torch.Generator().manual_seed(4))
    t = 5
    later = idx.clone()
    later[0, t + 2] = (later[0, t + 2] + 7) % 40
    on = _logits(None, idx), _logits(None, later)  # none = on: GPT-MoE is a causal LM
    assert torch.equal(on[0][0, : t + 1], on[1][0, : t + 1])
    off = _logits(False, idx), _logits(False, later)
    assert not torch.equal(off[0][0, : t + 1], off[1][0, : t + 1]), "with causal off the later token must leak"


def test_hf_causal_lm_logits_at_earlier_positions_ignore_later_tokens(tmp_path):
    """A Hugging Face causal family (tiny Qwen3-MoE, both layers sparse) is built with causal layers."""
    pytest.importorskip("transformers")
    from hf_cases import V, save_checkpoint

    from lshmoe.hf import read_config
    from lshmoe.hf.load import load_weights
    from lshmoe.hf.model import build_model

    path = str(save_checkpoint(tmp_path / "qwen3", "qwen3_moe"))
    idx = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(5))
    later = idx.clone()
    later[1, 9] = (later[1, 9] + 11) % V
    out = {}
    for causal in (None, False):
        settings = Config(lsh=LSHConfig(num_hashes=1, buckets_per_hash=2, causal=causal))
        model, _ = build_model(
            read_config(path), Comm.local(), dtype=torch.float64, overrides={"compress": "lsh"}, settings=settings
        )
        load_weights(model, path)
        with torch.no_grad():
            out[causal] = [model(input_ids=i).logits[1, :8] for i in (idx, later)]
    assert torch.equal(*out[None]), "none = on in a causal LM"
    assert not torch.equal(*out[False]), "with causal off the later token must leak"
