"""Lina's gradient scheduler: same parameters as plain all-reduce after k steps (float64), its
invariants on real recorded timelines, and the invariant checker on hand-made timelines."""

from __future__ import annotations

import pytest
from cli_util import corpus

from lshmoe.config import Config, DataConfig, LinaConfig, ModelConfig, MoEConfig, TrainConfig, from_dict
from lshmoe.data import load_data
from lshmoe.moe.param_kinds import is_expert_param
from lshmoe.sched.timeline import (
    Event,
    a2a_delays,
    check_chunk_bytes,
    check_no_chunk_during_a2a,
    check_no_chunk_in_windows,
    timeline,
)
from lshmoe.testing import run_ranks
from lshmoe.train.gpt_task import GPTTask
from lshmoe.train.loop import Trainer

CHUNK_MB = 0.02  # ~20 KB: many chunks per gradient, so ordering and priority are exercised


def _cfg(tmp, policy, dtype="float64") -> dict:
    return Config(
        model=ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16, moe_every=1),
        moe=MoEConfig(num_experts=4, d_expert=16),
        lina=LinaConfig(grad_sync=policy, chunk_mb=CHUNK_MB),
        data=DataConfig(path=str(corpus(tmp)), vocab_size=300, cache_dir=str(tmp / "cache")),
        train=TrainConfig(
            batch_size=2,
            out_dir=str(tmp / "run"),
            progress=False,
            dtype=dtype,
            warmup_steps=0,
        ),
    ).to_dict()


def _train_worker(comm, cfg_dict, steps):
    cfg = from_dict(cfg_dict)
    tr = Trainer(cfg, comm, GPTTask())
    for s in range(steps):
        tr.train_step(s)
    params = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    recs = list(comm.ledger.timeline)
    numels = [p.numel() for n, p in tr.model.named_parameters() if not is_expert_param(p)]
    if tr.sched is not None:
        tr.sched.close()
    return {"params": params, "timeline": recs, "numels": numels}


@pytest.mark.slow
@pytest.mark.parametrize("world, ep", [(2, 2), (4, 2)])
def test_scheduled_all_reduce_equals_plain_after_k_steps(tmp_path, world, ep):
    load_data(from_dict(_cfg(tmp_path, "sync")).data)
    out = {}
    for policy in ("sync", "fair", "priority"):
        cfg = _cfg(tmp_path, policy)
        cfg["moe"]["ep_size"] = ep
        out[policy] = run_ranks(_train_worker, world, cfg, 3, ep_size=ep, timeout_s=60)
    for policy in ("fair", "priority"):
        for r in range(world):
            for name, p in out["sync"][r]["params"].items():
                err = (out[policy][r]["params"][name] - p).abs().max().item()
                assert err <= 1e-10, (policy, r, name, err)
    moved = (out["sync"][0]["params"]["tok_emb.weight"] - out["sync"][1]["params"]["tok_emb.weight"]).abs().max()
    assert moved == 0, "dense parameters must stay identical across ranks"


@pytest.mark.slow
def test_priority_invariants_hold_on_recorded_timelines(tmp_path):
    load_data(from_dict(_cfg(tmp_path, "sync")).data)
    steps = 3
    res = run_ranks(_train_worker, 2, _cfg(tmp_path, "priority", dtype="float32"), steps, timeout_s=60)
    for rank_res in res:
        events = timeline(rank_res["timeline"])
        chunks = [e for e in events if e.kind == "chunk"]
        assert len(chunks) > 20 and any(e.kind == "a2a" and e.phase == "backward" for e in events)
        assert check_no_chunk_during_a2a(events) == []
        assert check_no_chunk_in_windows(events) == []
        assert check_chunk_bytes(events, rank_res["numels"] * steps, 4, int(CHUNK_MB * 2**20)) == []
        chunk_max = max(c.end - c.start for c in chunks)
        assert max(a2a_delays(events)) <= chunk_max + 1e-6, "an all-to-all waits at most one chunk"


def test_checker_finds_violations():
    bwd = "backward"
    ev = [
        Event("a2a", "moe1.combine", bwd, 1.0, 2.0, 10),
        Event("chunk", "grad.chunk.0", bwd, 1.5, 3.0, 8),
        Event("a2a", "moe1.dispatch", bwd, 4.0, 5.0, 10),
        Event("chunk", "grad.chunk.1", bwd, 3.5, 3.6, 8),
        Event("chunk", "grad.chunk.2", bwd, 6.0, 6.5, 8),
    ]
    assert len(check_no_chunk_during_a2a(ev)) == 1  # chunk 0 starts inside the combine all-to-all
    assert len(check_no_chunk_in_windows(ev)) == 2  # chunks 0 and 1 start inside [1.0, 5.0]
    assert check_chunk_bytes(ev, [6], 4, 8) == []  # 24 bytes in chunks of 8: three chunks
    assert check_chunk_bytes(ev, [7], 4, 8) != []
    assert a2a_delays(ev) == [0.0, 0.0]
    late = [Event("chunk", "grad.chunk.0", bwd, 0.0, 1.5, 8), Event("a2a", "moe1.dispatch", "forward", 1.0, 2.0, 8)]
    assert a2a_delays(late) == [0.5]
