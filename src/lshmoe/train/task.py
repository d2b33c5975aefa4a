"""The Task seam: what one training loop (train/loop.py) needs from a model family.

The loop owns everything that is the same for every model: steps, learning-rate schedule, the
non-finite policy, faults, heap trim, host-sync counts, metrics, TensorBoard, progress, validation,
checkpoints (with the task's side files inside the manifest), resume and the summary. A task supplies
what differs:

    setup(cfg, comm, log) -> Batches     read the model's configs, validate the run for this world,
                                         open the token data (every rank calls it, in the same order)
    build(cfg, comm, fresh) -> model     the model on `comm.device`; `fresh` = give it its starting
                                         weights (False when a checkpoint will supply them); under
                                         FSDP it may leave parameters on the meta device ...
    init_weights(model, comm, fresh)     ... and give them storage and weights here, once the loop
                                         has sharded the model (so a rank reads only its shards)
    forward(model, x, y) -> StepOutput   loss to backpropagate, the cross-entropy alone, the unweighted
                                         router loss and every MoE layer's output (for the metrics)
    moe_layers(model)                    the MoE layers, in layer order (set_step, compressor state)
    blocks(model)                        the transformer blocks, in order (one FSDP unit each)
    signature()                          what must match between a checkpoint and the run resuming it
    meta()                               extra meta.json fields (e.g. the source of an HF checkpoint)
    write_side_files(directory)          rank 0: files a checkpoint carries besides the tensors (an HF
                                         checkpoint's config and tokenizer); hashed into the manifest
    describe(model)                      the start-up line
    after_training(trainer)              work after the last step (the upcycled model's FFN capture)
    default_lr, save_at_end              what a run that leaves train.lr / train.save_every unset gets:
                                         a from-scratch model and a pretrained one want different rates,
                                         and a fine-tune is worth keeping

Three tasks exist: GPT-MoE (train/gpt_task.py), HF fine-tuning and HF upcycling (hf/task.py). A new
model is a new task, never a new loop. `TaskBase` holds the defaults a task rarely changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lshmoe.config import SCRATCH_LR, Config
from lshmoe.distributed.comm import Comm

Log = Callable[[str], None]


@dataclass(kw_only=True, slots=True)
class StepOutput:
    """One forward pass of a task's model on a batch."""

    loss: torch.Tensor  # what to backpropagate: cross-entropy + weighted router losses
    ce: torch.Tensor  # the language-model loss alone
    aux: torch.Tensor  # the router losses (as the task reports them)
    moe: dict[int, Any] = field(default_factory=dict)  # MoEOutput by layer id, in layer order


class Batches(Protocol):
    """Token batches: training batches are a function of (seed, step, rank), so a resumed run sees the
    batches it would have seen; validation batches are fixed. Targets of -100 carry no loss."""

    vocab_size: int
    source: str
    key: str  # identifies the data; every rank must hold the same

    def train_batch(
        self, step: int, rank: int, batch: int, seq_len: int, seed: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def val_batch(
        self, index: int, rank: int, world: int, batch: int, seq_len: int, device: torch.device, num_batches: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def check_seq_len(self, seq_len: int) -> None: ...


class Task(Protocol):
    """See the module docstring."""

    name: str

    def setup(self, cfg: Config, comm: Comm, log: Log) -> Batches: ...

    def build(self, cfg: Config, comm: Comm, fresh: bool) -> nn.Module: ...

    def init_weights(self, model: nn.Module, comm: Comm, fresh: bool) -> None: ...

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput: ...

    def moe_layers(self, model: nn.Module) -> list[nn.Module]: ...

    def blocks(self, model: nn.Module) -> list[nn.Module]: ...

    def signature(self) -> dict[str, Any]: ...

    def meta(self) -> dict[str, Any]: ...

    def write_side_files(self, directory: Path) -> None: ...

    def describe(self, model: nn.Module) -> str: ...

    def after_training(self, trainer: Any) -> None: ...

    default_lr: float
    save_at_end: bool


class TaskBase:
    """Defaults: no extra meta, no side files, a plain start-up line, nothing after training."""

    name = "task"

    def init_weights(self, model: nn.Module, comm: Comm, fresh: bool) -> None:
        return None  # built complete

    def meta(self) -> dict[str, Any]:
        return {}

    def write_side_files(self, directory: Path) -> None:
        return None

    def describe(self, model: nn.Module) -> str:
        n = sum(p.numel() for p in model.parameters())
        return f"{self.name} model, {n / 1e6:.2f} M params/rank"

    def after_training(self, trainer: Any) -> None:
        return None

    default_lr = SCRATCH_LR  # train.lr when the run leaves it unset
    save_at_end = False  # train.save_every unset: a checkpoint after the last step


def params_line(model: nn.Module) -> str:
    """`X M params/rank` and, when some are frozen, how many train."""
    n = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trained = "" if n_train == n else f" ({n_train / 1e6:.2f} M trained)"
    return f"{n / 1e6:.2f} M params/rank{trained}"


__all__ = ["Batches", "Log", "StepOutput", "Task", "TaskBase", "params_line"]
