"""`--compress auto` across real gloo ranks (W = 2, float64): the choice follows the link and the error
guard, every rank takes the same one, and a layer that chose X computes exactly what `--compress X`
computes at the same step."""

from __future__ import annotations

import pytest
import torch
from moe_cases import D, init_layer, rank_input

from lshmoe.compress.auto import AutoCompressor, build, parse_candidates
from lshmoe.compress.registry import CompressorContext
from lshmoe.config import AutoConfig, Config, ConfigError, MoEConfig
from lshmoe.moe.layer import MoELayer
from lshmoe.testing import run_ranks

TOKENS = [9, 13]
STEPS = 4  # decisions at steps 1, 2, 3 (start = 1, every = 1)
CASES = {  # name: (auto options, the compressor it must end on)
    "fast link": (dict(link_gbit=1e6), "identity"),
    "slow link": (dict(link_gbit=1e-3, max_error=2.0, candidates="identity,lsh"), "lsh"),
    "slow, strict error": (dict(link_gbit=1e-3, max_error=1e-9, candidates="identity,fp8,lsh"), "fp8"),
    "measured link": (dict(link_gbit=0.0), None),
}


def _layer(comm, compress: str, auto: dict) -> MoELayer:
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=5, activation="gelu", compress=compress)
    settings = Config(moe=cfg, auto=AutoConfig(**{"start": 1, "every": 1, **auto}))
    layer = MoELayer(cfg, D, comm, layer_id=0, settings=settings).double()
    init_layer(layer, cfg)
    return layer


def _input(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens near 3 distinct ones (1e-3 apart), so LSH has rows to merge, at a small error."""
    x, cot = rank_input(rank, TOKENS[rank], False, seed=step)
    return (x[torch.arange(x.shape[0]) % 3] + 1e-3 * x).requires_grad_(True), cot


def _step(layer: MoELayer, comm, step: int) -> dict:
    layer.set_step(step)
    x, cot = _input(comm.rank, step)
    layer.zero_grad()
    y = layer(x).y_TD
    (y * cot).sum().backward()
    comm.ledger.end_step()
    return dict(y=y.detach(), gx=x.grad, gw=layer.experts.w1_GDF.grad.clone())


def _worker(comm):
    out = {}
    for name, (auto, _) in CASES.items():
        layer = _layer(comm, "auto", auto)
        choices, last = [], None
        for step in range(STEPS):
            last = _step(layer, comm, step)
            choices.append(layer.compressor.choice)
        final = choices[-2]  # the choice the last step ran with (decided after step STEPS - 2)
        same = _step(_layer(comm, final, {}), comm, STEPS - 1)
        out[name] = dict(choices=choices, last=last, same=same, link=layer.compressor.link_bytes_per_s)
    return out


@pytest.mark.slow
def test_auto_follows_the_link_and_the_error_guard_and_matches_the_chosen_compressor():
    r0, r1 = run_ranks(_worker, 2)
    for name, (_, expect) in CASES.items():
        a, b = r0[name], r1[name]
        assert a["choices"] == b["choices"], (name, a["choices"], b["choices"])  # one decision for all ranks
        assert a["choices"][0] == "identity", name  # uncompressed until the first decision
        if expect is not None:
            assert a["choices"][1:] == [expect] * (STEPS - 1), (name, a["choices"])
        for r in (a, b):  # the step that ran with choice X is `--compress X` at that step, exactly
            for k in ("y", "gx", "gw"):
                assert torch.equal(r["last"][k], r["same"][k]), (name, k)
    link = r0["measured link"]["link"]
    assert link > 0 and link == r1["measured link"]["link"]  # measured, and agreed over the ranks


def test_candidates_are_checked_in_one_line():
    assert parse_candidates("lsh, fp8") == ("identity", "lsh", "fp8")
    with pytest.raises(ConfigError, match=r"auto.candidates: 'zstd' is not a candidate; choose from identity"):
        parse_candidates("fp8,zstd")
    from lshmoe.config import validate

    with pytest.raises(ConfigError, match="auto.candidates"):
        validate(Config(moe=MoEConfig(compress="auto"), auto=AutoConfig(candidates="nope")))
    with pytest.raises(ConfigError, match=r"auto.max_error=0.0 is out of range"):
        validate(Config(moe=MoEConfig(compress="auto"), auto=AutoConfig(max_error=0.0)))


def test_the_choice_and_the_link_survive_a_checkpoint():
    ctx = CompressorContext(num_experts=4, d_model=D, layer_id=0, settings=Config())
    a = build(ctx)
    assert isinstance(a, AutoCompressor) and a.names == ("identity", "fp8", "lsh", "lsh+fp8")
    a.choice, a.sec_per_byte = "lsh+fp8", 8e-9
    b = build(ctx)
    b.load_state_dict(a.state_dict())
    assert (b.choice, b.sec_per_byte) == ("lsh+fp8", 8e-9)
    assert b.wires() == a.wires() and not b.rows_are_tokens


def test_the_link_estimate_takes_one_latency_off_each_exchange():
    a = build(CompressorContext(num_experts=4, d_model=D, layer_id=0, settings=Config()))
    assert a.link_estimate() != a.link_estimate()  # NaN: nothing measured yet
    # (bytes, seconds of 2 exchanges, exchanges, count exchange): the fastest count exchange (1 ms) is
    # the latency; the slower ones waited for a late rank
    a._samples.extend([(1e6, 0.012, 2, 0.001), (1e6, 0.020, 2, 0.005), (1e6, 0.014, 2, 0.002)])
    assert a.link_estimate() == pytest.approx(0.012 / 1e6)


def test_the_measured_check_keeps_a_faster_choice_and_undoes_a_slower_one():
    ctx = CompressorContext(num_experts=4, d_model=D, layer_id=0, settings=Config(auto=AutoConfig(every=0)))
    told: list[str] = []
    for new, expect in (([0.004, 0.005, 0.006], "lsh"), ([0.02, 0.03, 0.025], "identity")):
        a = build(ctx)
        a._log = told.append
        a.choice, a.step, a._verify_at = "lsh", 7, 7
        a._spans_identity.extend([0.010, 0.011, 0.012])
        a._spans_new = list(new)
        assert a.probe_due(True) and not a.probe_due(False)
        a._verify(lambda t: t)  # one rank: the all-reduce is the identity
        assert a.choice == expect and a._verify_at is None and not a.probe_due(True)
        assert a.stats["auto_measured_speedup"].value == pytest.approx(0.011 / sorted(new)[1])  # medians
    assert len(told) == 1 and "auto measured lsh at 25.00 ms per forward against 11.00 ms uncompressed" in told[0]


def _checked_worker(comm):
    """A link so slow that the model picks LSH at step 4; steps 5..9 time it, step 9 compares."""
    layer = _layer(comm, "auto", dict(link_gbit=1e-3, max_error=2.0, candidates="identity,lsh", start=4, every=0))
    choices, spans = [], []
    for step in range(11):
        _step(layer, comm, step)
        choices.append(layer.compressor.choice)
        spans.append((len(layer.compressor._spans_identity), len(layer.compressor._spans_new)))
    return dict(choices=choices, spans=spans, stats={k: v.value for k, v in layer.compressor.stats.items()})


@pytest.mark.slow
def test_the_measured_check_runs_on_every_rank_and_agrees():
    r0, r1 = run_ranks(_checked_worker, 2)
    agreed = ("auto_choice", "auto_pred_speedup", "auto_measured_speedup")  # the rest are this rank's timings
    assert r0["choices"] == r1["choices"] and all(r0["stats"][k] == r1["stats"][k] for k in agreed)
    c = r0["choices"]
    assert c[:4] == ["identity"] * 4 and c[4:9] == ["lsh"] * 5  # decided at step 4, checked at step 9
    speedup = r0["stats"]["auto_measured_speedup"]
    assert c[9:] == (["lsh"] * 2 if speedup > 1 else ["identity"] * 2), (speedup, c)
    assert r0["spans"][3] == (4, 0)  # steps 0..3 timed uncompressed (step 4 runs the trial: not timed)
    assert r0["spans"][8] == (4, 4) and r0["spans"][9][1] == 0  # 5 steps under LSH, compared, cleared
