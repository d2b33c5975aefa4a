"""A checkpoint written by 4 expert-parallel ranks loads into 2 (and the state is exactly the saved one)."""

from __future__ import annotations

import pytest
import torch
from cli_util import corpus

from lshmoe.config import Config, DataConfig, ModelConfig, MoEConfig, TrainConfig, from_dict
from lshmoe.testing import run_ranks
from lshmoe.train import checkpoint as ckpt
from lshmoe.train.gpt_task import GPTTask
from lshmoe.train.loop import Trainer


def _cfg(tmp, resume="none", ep=0, fsdp=False) -> dict:
    cfg = Config(
        model=ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16),
        moe=MoEConfig(num_experts=8, d_expert=16, ep_size=ep),
        data=DataConfig(path=str(corpus(tmp)), vocab_size=300, cache_dir=str(tmp / "cache")),
        train=TrainConfig(batch_size=2, out_dir=str(tmp / "run"), progress=False, resume=resume),
    )
    cfg.dist.fsdp = fsdp
    return cfg.to_dict()


def _entries(tr: Trainer) -> dict[str, torch.Tensor]:
    """Every model and optimizer entry as a whole tensor (FSDP's shards gathered)."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in ckpt.state_entries(tr.model, tr.opt, tr.comm.rank, {}).items()
        if k.startswith(("model/", "optim/"))
    }


def _save_worker(comm, cfg_dict):
    cfg = from_dict(cfg_dict)
    tr = Trainer(cfg, comm, GPTTask())
    for step in range(3):
        tr.train_step(step)
    path = tr.save_checkpoint(3)
    return {"path": str(path), "entries": _entries(tr)}


def _load_worker(comm, cfg_dict):
    cfg = from_dict(cfg_dict)
    tr = Trainer(cfg, comm, GPTTask())
    out = {"start": tr.start_step, "entries": _entries(tr)}
    tr.train_step(tr.start_step)  # and training continues on the new layout
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "save, load",
    [
        ((4, 0, False), (2, 0, False)),  # world 4 -> 2
        ((4, 2, True), (2, 2, False)),  # FSDP (experts sharded over 2 ranks each) -> unsharded
        ((2, 2, False), (4, 4, True)),  # unsharded EP 2 -> FSDP EP 4
    ],
    ids=["4-to-2", "fsdp-4-ep2-to-2", "2-to-fsdp-4-ep4"],
)
def test_reshard(tmp_path, save, load):
    (w0, ep0, fsdp0), (w1, ep1, fsdp1) = save, load
    saved = run_ranks(_save_worker, w0, _cfg(tmp_path, ep=ep0, fsdp=fsdp0), ep_size=ep0, timeout_s=60)
    path = saved[0]["path"]
    before = {k: v for res in saved for k, v in res["entries"].items()}
    loaded = run_ranks(_load_worker, w1, _cfg(tmp_path, resume=path, ep=ep1, fsdp=fsdp1), ep_size=ep1, timeout_s=60)
    after = {k: v for res in loaded for k, v in res["entries"].items()}
    assert all(res["start"] == 3 for res in loaded)
    assert set(after) == set(before), "2 ranks together must hold every expert and every optimizer entry"
    experts = sorted({k.split("/e")[-1] for k in after if "/e" in k and k.startswith("model/")}, key=int)
    assert experts == [str(e) for e in range(8)]
    for k, v in before.items():
        assert torch.equal(after[k], v), k
