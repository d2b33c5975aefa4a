"""The one training loop (train/loop.py) driven by a small task written here: a byte-level language
model around one real expert-parallel MoE layer (with the LSH compressor), on real English text.

Every loop feature works for any task, so this task is not one of lshmoe's: the loop trains it,
logs it, evaluates it exactly and as trained, checkpoints it with the task's side file inside the
manifest, resumes it bitwise, skips a poisoned step naming the parameter, and stops on SIGTERM after
saving the step it was on.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from lshmoe.config import Config
from lshmoe.distributed.comm import Comm
from lshmoe.errors import Stopped
from lshmoe.moe.layer import MoELayer
from lshmoe.seeding import generator
from lshmoe.train import checkpoint as ckpt
from lshmoe.train.loop import Trainer
from lshmoe.train.task import StepOutput, TaskBase


class ByteData:
    """The bytes of the `textwrap` and `inspect` docstrings: training windows random by (seed, step,
    rank), validation windows fixed, from the last tenth."""

    vocab_size, source, key = 256, "docstrings as bytes", "b17e5"

    def __init__(self) -> None:
        text = "\n\n".join(inspect.getdoc(o) or "" for m in (textwrap, inspect) for o in vars(m).values())
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)
        cut = int(0.9 * ids.numel())
        self.train, self.val = ids[:cut], ids[cut:]

    def check_seq_len(self, seq_len: int) -> None:
        assert self.val.numel() > seq_len + 1

    def _windows(self, ids, starts, seq_len, device):
        w = ids[starts[:, None] + torch.arange(seq_len + 1)[None, :]]
        return w[:, :-1].to(device), w[:, 1:].to(device)

    def train_batch(self, step, rank, batch, seq_len, seed, device):
        g = generator(seed, "bytes", step, rank)
        return self._windows(
            self.train, torch.randint(0, self.train.numel() - seq_len - 1, (batch,), generator=g), seq_len, device
        )

    def val_batch(self, index, rank, world, batch, seq_len, device, num_batches):
        starts = torch.arange(batch) * 97 + (index * world + rank) * 1009
        return self._windows(self.val, starts % (self.val.numel() - seq_len - 1), seq_len, device)


class ByteLM(nn.Module):
    def __init__(self, cfg: Config, comm: Comm):
        super().__init__()
        D = 32
        self.emb = nn.Embedding(256, D)
        self.moe = MoELayer(cfg.moe, D, comm, layer_id=0, settings=cfg)
        self.head = nn.Linear(D, 256)

    def forward(self, x):
        h = self.emb(x)
        h = h + torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)  # the previous byte as context
        out = self.moe(h)
        return self.head(h + out.y_TD), out


class ByteTask(TaskBase):
    name = "bytes"

    def setup(self, cfg, comm, log):
        self.cfg = cfg
        return ByteData()

    def build(self, cfg, comm, fresh):
        torch.manual_seed(1)
        model = ByteLM(cfg, comm)
        model.moe.reset_parameters(seed=1, std=0.3)
        return model

    def forward(self, model, x, y):
        logits, out = model(x)
        ce = nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        aux = out.aux["load_balance"]
        return StepOutput(loss=ce + 0.01 * aux, ce=ce, aux=aux, moe={0: out})

    def moe_layers(self, model):
        return [model.moe]

    def signature(self):
        return {"bytes.d_model": 32}

    def write_side_files(self, directory: Path) -> None:
        (directory / "task").mkdir()
        (directory / "task" / "note.txt").write_text("a side file of the byte task\n")


def _cfg(out: Path, **train) -> Config:
    cfg = Config()
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.d_expert, cfg.moe.compress = 4, 2, 32, "lsh"
    cfg.model.seq_len, cfg.lsh.num_hashes = 32, 2  # 16 buckets: rows of different bytes merge
    t = cfg.train
    t.steps, t.batch_size, t.lr, t.warmup_steps, t.log_every, t.eval_every, t.eval_batches = 6, 4, 3e-3, 1, 1, 3, 2
    t.save_every, t.progress, t.out_dir = 3, False, str(out)
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


def _records(out: Path, kind: str) -> list[dict]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == kind]


def test_the_loop_trains_checkpoints_and_resumes_any_task_bitwise(tmp_path, capsys):
    full = Trainer(_cfg(tmp_path / "full"), Comm.local(), ByteTask()).run()
    train = _records(tmp_path / "full", "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(0 < r["compression_rate"] <= 1 for r in train)
    # per-rank memory: every parameter trains, in fp32, with two AdamW moments and a 4-byte step counter
    # per tensor (embedding, router, two expert banks, head weight and bias)
    mem = train[-1]
    assert mem["mem_grads_bytes"] == mem["mem_params_bytes"] > 0
    assert mem["mem_optim_bytes"] == 2 * mem["mem_params_bytes"] + 4 * 6
    assert mem["peak_rss_bytes"] > mem["mem_params_bytes"]
    evals = _records(tmp_path / "full", "eval")
    # evaluated with exact experts and, since the layer compresses with LSH, as trained
    assert [r["step"] for r in evals] == [3, 6] and all("val_loss_compressed" in r for r in evals)
    assert full.final_val_loss == evals[-1]["val_loss"] != full.final_val_loss_compressed
    step3 = tmp_path / "full" / "checkpoints" / "step_00000003"
    manifest = json.loads((step3 / "manifest.json").read_text())["files"]
    assert "task/note.txt" in manifest and "meta.json" in manifest  # the side file is verified too
    assert json.loads((step3 / "meta.json").read_text())["model"] == {"bytes.d_model": 32}
    assert "saved checkpoint" in capsys.readouterr().err

    half = Trainer(_cfg(tmp_path / "half", resume=str(step3)), Comm.local(), ByteTask()).run()
    resumed = _records(tmp_path / "half", "train")
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in train[3:]]
    assert half.final_val_loss == full.final_val_loss

    (step3 / "task" / "note.txt").write_text("a side file of the BYTE task\n")
    with pytest.raises(ckpt.CheckpointError, match=r"task/note.txt fails its checksum"):
        Trainer(_cfg(tmp_path / "again", resume=str(step3)), Comm.local(), ByteTask())


def test_the_loop_skips_a_poisoned_step_naming_the_parameter(tmp_path, capsys):
    cfg = _cfg(tmp_path / "nan", save_every=0, steps=4)
    cfg.fault.inject = "nan:0:1"
    result = Trainer(cfg, Comm.local(), ByteTask()).run()
    assert result.skipped_steps == 1
    assert "step 1: non-finite value in the gradient of moe.experts.w1_GDF; step skipped" in capsys.readouterr().err


def test_sigterm_stops_after_the_step_with_a_checkpoint_of_it(tmp_path):
    cfg = _cfg(tmp_path / "stop", save_every=4, steps=6)
    trainer = Trainer(cfg, Comm.local(), ByteTask())

    def preempt(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Stopped, match="stopped by SIGTERM after step 2; resume from .*step_00000002"):
        trainer.run(on_step=preempt)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the loop
    assert ckpt.latest(tmp_path / "stop" / "checkpoints").name == "step_00000002"
    resumed = Trainer(_cfg(tmp_path / "stop", save_every=4, steps=6), Comm.local(), ByteTask())
    assert resumed.start_step == 2
