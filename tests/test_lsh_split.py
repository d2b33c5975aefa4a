"""`moe.split` (the analysis that pins a quality gap on one direction), across real gloo ranks in
float64: split=forward gives the compressed layer's values with the exact layer's gradients, and
split=backward the exact values with the compressed gradients, each equal to the plain layers'."""

from __future__ import annotations

import pytest
import torch
from moe_cases import D, init_layer, rank_input

from lshmoe.config import Config, MoEConfig
from lshmoe.moe.layer import MoELayer
from lshmoe.testing import run_ranks

TOKENS = [11, 7]


def _run(comm, compress: str, split: str) -> dict:
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=5, activation="gelu", compress=compress, split=split)
    layer = MoELayer(cfg, D, comm, layer_id=0, settings=Config(moe=cfg)).double()
    init_layer(layer, cfg)
    layer.set_step(3)
    x, cot = rank_input(comm.rank, TOKENS[comm.rank], False)
    x = (x[torch.arange(x.shape[0]) % 4] + 0.05 * x).requires_grad_(True)  # rows LSH merges, inexactly
    out = layer(x)
    (out.y_TD * cot).sum().backward()
    return dict(
        y=out.y_TD.detach(),
        gx=x.grad,
        gw=layer.experts.w1_GDF.grad,
        grouter=layer.router.weight.grad,
        sent=out.rows_sent,
    )


def _worker(comm):
    return {
        (c, s): _run(comm, c, s)
        for c, s in [("identity", "none"), ("lsh", "none"), ("lsh", "forward"), ("lsh", "backward")]
    }


@pytest.mark.slow
def test_split_takes_values_from_one_path_and_gradients_from_the_other():
    for r in run_ranks(_worker, 2):
        exact, lossy = r[("identity", "none")], r[("lsh", "none")]
        assert lossy["sent"] < exact["sent"]  # the compressed path really merged rows
        assert not torch.allclose(lossy["y"], exact["y"])
        fwd, bwd = r[("lsh", "forward")], r[("lsh", "backward")]
        grads = ("gx", "gw", "grouter")
        torch.testing.assert_close(fwd["y"], lossy["y"], rtol=0, atol=1e-12)
        torch.testing.assert_close(bwd["y"], exact["y"], rtol=0, atol=1e-12)
        for k in grads:
            torch.testing.assert_close(fwd[k], exact[k], rtol=0, atol=1e-12)
            torch.testing.assert_close(bwd[k], lossy[k], rtol=0, atol=1e-12)


def test_the_old_lsh_split_key_and_flags_still_set_it(tmp_path):
    """`split` moved from the LSH section to the layer's (`moe.split`); YAML, --set and the old flags still work."""
    from lshmoe import config as C
    from lshmoe.commands.train import config_from_args, parser

    f = tmp_path / "c.yaml"
    f.write_text("lsh:\n  split: forward\n")
    assert C.load_yaml(f).moe.split == "forward"
    assert C.apply_sets(C.Config(), ["lsh.split=backward"]).moe.split == "backward"
    for flag in ("--moe.split", "--split", "--lsh.split", "--lsh-split"):
        assert config_from_args(parser().parse_args([flag, "forward"])).moe.split == "forward", flag
    with pytest.raises(C.ConfigError, match="moe.split='sideways' is not valid"):
        C.validate(config_from_args(parser().parse_args(["--lsh-split", "sideways"])))
