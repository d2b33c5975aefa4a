"""A checkpoint written by 4 expert-parallel ranks loads into 2 (and the state is exactly the saved one)."""

from __future__ import annotations

import pytest
import torch
from cli_util import corpus

from lshmoe.config import Config, DataConfig, ModelConfig, MoEConfig, TrainConfig, from_dict
from lshmoe.data import load_data
from lshmoe.testing import run_ranks
from lshmoe.train import checkpoint as ckpt
from lshmoe.train.trainer import Trainer


def _cfg(tmp, resume="none") -> dict:
    cfg = Config(
        model=ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16),
        moe=MoEConfig(num_experts=8, d_expert=16),
        data=DataConfig(path=str(corpus(tmp)), vocab_size=300, cache_dir=str(tmp / "cache")),
        train=TrainConfig(batch_size=2, out_dir=str(tmp / "run"), progress=False, resume=resume),
    )
    return cfg.to_dict()


def _entries(tr: Trainer) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in ckpt.state_entries(tr.model, tr.opt, tr.comm.rank, {}).items()
        if k.startswith(("model/", "optim/"))
    }


def _save_worker(comm, cfg_dict):
    cfg = from_dict(cfg_dict)
    tr = Trainer(cfg, comm, load_data(cfg.data))
    for step in range(3):
        tr.train_step(step)
    path = tr.save_checkpoint(3)
    return {"path": str(path), "entries": _entries(tr)}


def _load_worker(comm, cfg_dict):
    cfg = from_dict(cfg_dict)
    tr = Trainer(cfg, comm, load_data(cfg.data))
    out = {"start": tr.start_step, "entries": _entries(tr)}
    tr.train_step(tr.start_step)  # and training continues on the new layout
    return out


@pytest.mark.slow
def test_reshard_4_to_2(tmp_path):
    saved = run_ranks(_save_worker, 4, _cfg(tmp_path), timeout_s=60)
    path = saved[0]["path"]
    before = {k: v for res in saved for k, v in res["entries"].items()}
    loaded = run_ranks(_load_worker, 2, _cfg(tmp_path, resume=path), timeout_s=60)
    after = {k: v for res in loaded for k, v in res["entries"].items()}
    assert all(res["start"] == 3 for res in loaded)
    assert set(after) == set(before), "2 ranks together must hold every expert and every optimizer entry"
    experts = sorted({k.split("/e")[-1] for k in after if "/e" in k and k.startswith("model/")}, key=int)
    assert experts == [str(e) for e in range(8)]
    for k, v in before.items():
        assert torch.equal(after[k], v), k
