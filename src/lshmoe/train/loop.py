"""The training loop, one for every model: a `Task` (train/task.py) supplies what differs per model.

One step on every rank:
    batch(step, rank) -> per micro-batch: forward (phase forward) -> backward (phase backward)
    -> gradient sync + global-norm clip + AdamW (phase optimizer) -> ledger.end_step()

Scale (docs/design.md, "The parallel mesh"): `dist.fsdp` shards parameters, gradients and AdamW state
with FSDP2 (train/fsdp.py); `train.compute_dtype` computes in bf16 over fp32 master weights (FSDP's
mixed-precision policy, or autocast without FSDP); `train.ac` recomputes pure regions in backward
(train/recompute.py); `train.grad_accum` splits the step's batch into micro-batches, each with its
own dispatch, gradients reduced once per step (FSDP: reduce-scattered per micro-batch).
Every `log_every` steps the ranks reduce their interval metrics and rank 0 writes a JSONL line (and
TensorBoard events, and a console line when there is no progress bar); every `eval_every` steps (and
at the end) all ranks compute the validation loss together, with exact experts (`val_loss`, the model
a user deploys) and, when the model compresses its all-to-all lossily, also as trained
(`val_loss_compressed`); every `save_every` steps (and at the end) they write a checkpoint, from which
`--resume` continues exactly.

A non-finite loss or gradient is detected from the global gradient norm (identical on every rank,
so all ranks take the same path); the first offending parameter is named, and the step is skipped
or the run saves and stops (`fault.nan_policy`). SIGTERM stops the run after the current step, with a
checkpoint of it when the run saves checkpoints (train/stop.py).

What a checkpoint holds and how it is restored lives in `train/checkpoint.py`; injected faults (for
tests and `lshmoe bench chaos`) in `train/faults.py`: the loop only calls the injector's hooks at
named points.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lshmoe.config import DTYPES, Config
from lshmoe.distributed.comm import Comm
from lshmoe.distributed.launch import note_failure
from lshmoe.distributed.setup import init_comm, shutdown
from lshmoe.distributed.syncs import HostSyncCounter
from lshmoe.errors import DataError, NumericalError, Stopped, UserError
from lshmoe.moe.param_kinds import is_expert_param
from lshmoe.sched.grad_scheduler import GradScheduler
from lshmoe.train import checkpoint as ckpt
from lshmoe.train import fsdp, recompute
from lshmoe.train.allocator import HeapTrimmer
from lshmoe.train.evaluate import exact_experts, validation_loss
from lshmoe.train.faults import FaultInjector
from lshmoe.train.grad_sync import GradSync
from lshmoe.train.memory import PeakMemory, grad_bytes, state_bytes
from lshmoe.train.metrics import IntervalStats, MetricsWriter, Progress, merge_micro_batches
from lshmoe.train.optim import apply_gradients, build_optimizer, lr_at, set_lr
from lshmoe.train.run_dir import resolve_out_dir
from lshmoe.train.stop import StopSignal
from lshmoe.train.task import Batches, Task

NO_BAD_PARAM = 1 << 30


@dataclass(kw_only=True)
class TrainResult:
    final_val_loss: float  # exact experts
    final_val_loss_compressed: float | None = None  # as trained, when the model compresses lossily
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    median_step_time_s: float = 0.0
    median_tokens_per_s: float = 0.0
    skipped_steps: int = 0
    out_dir: str = ""
    records: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))


def say(rank: int, msg: str) -> None:
    """A console line from rank 0 (stderr, `[lshmoe] ...`)."""
    if rank == 0:
        print(f"[lshmoe] {msg}", file=sys.stderr, flush=True)


class Trainer:
    """The loop over a task's model; `run()` trains to `train.steps`, `train_step(step)` takes one step."""

    def __init__(self, cfg: Config, comm: Comm, task: Task):
        self.cfg, self.comm, self.task = cfg, comm, task
        tc = cfg.train
        self.log = lambda m: say(comm.rank, m)
        self.new_dir = resolve_out_dir(cfg, comm)
        self.data: Batches = task.setup(cfg, comm, self.log)
        self.lr_default, self.save_every = apply_task_defaults(cfg, task)
        self.data.check_seq_len(cfg.model.seq_len)
        agree_on_data(comm, self.data, cfg)
        self.out_dir = Path(tc.out_dir)
        resume = ckpt.resolve_resume(cfg, comm, self.log)
        torch.manual_seed(tc.seed * 1000 + comm.rank)  # dropout and router jitter differ per rank
        self.model: nn.Module = task.build(cfg, comm, fresh=resume is None)
        self.moe = list(task.moe_layers(self.model))
        self.moe_ids = [layer.layer_id for layer in self.moe]
        recompute.apply(self.model, tc.ac)
        compute = DTYPES[tc.compute_dtype] if tc.compute_dtype else None
        if cfg.dist.fsdp:
            meshes = fsdp.build_meshes(comm, comm.group("ep").size)
            reshard = cfg.lina.a2a_chunks == 1  # micro-op dispatch calls the experts several times a forward
            fsdp.shard(self.model, self.moe, task.blocks(self.model), meshes, compute, reshard)
        # NOTE: before anything holds the parameters: giving a deferred model storage replaces FSDP's
        task.init_weights(self.model, comm, fresh=resume is None)
        if cfg.dist.fsdp:
            self.sync = fsdp.ShardedGradSync(self.model, comm, fsdp.replicated_params(self.model))
        else:
            self.sync = GradSync(self.model, comm)
        # without FSDP, mixed precision is autocast over the fp32 master weights
        self.autocast = compute is not None and not cfg.dist.fsdp
        self.opt = build_optimizer(self.model, tc)
        self.peak = PeakMemory(comm.device)
        self.grads_bytes = 0
        self.heap = HeapTrimmer(cfg.dist.malloc_trim_every)
        self.syncs = HostSyncCounter(comm.device.type == "cuda")
        comm.timing = cfg.dist.comm_timing
        self.sched = None
        if cfg.lina.grad_sync != "sync":
            self.sched = GradScheduler(self.model, comm, cfg.lina.grad_sync, int(cfg.lina.chunk_mb * 2**20))
            comm.ledger.enable_timeline(50_000)
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        num_experts = getattr(self.moe[0], "num_experts", cfg.moe.num_experts) if self.moe else cfg.moe.num_experts
        self.stats = IntervalStats(self.moe_ids, num_experts)
        self.tokens_per_rank_step = tc.batch_size * cfg.model.seq_len
        self.faults = FaultInjector(cfg.fault.inject, comm.rank, self.out_dir)
        self.state = ckpt.RunState()
        if resume is not None:
            self.load_checkpoint(resume)
        self.start_step = self.state.step
        self.writer = MetricsWriter(
            self.out_dir / "metrics.jsonl" if comm.rank == 0 else None, append=resume is not None
        )
        self.tb = None
        if tc.tensorboard and comm.rank == 0:
            from lshmoe.train.tensorboard import TensorBoard

            self.tb = TensorBoard(self.out_dir / "tensorboard")
        self.progress: Progress | None = None

    # ------------------------------------------------------------------------------------ step

    def train_step(self, step: int) -> dict[str, float]:
        tc, ledger = self.cfg.train, self.comm.ledger
        self.faults.step_start(step)
        t0 = time.perf_counter()
        syncs, comm_syncs = self.syncs.start(), self.comm.host_syncs
        x, y = self.data.train_batch(
            step, self.comm.rank, tc.batch_size, self.cfg.model.seq_len, tc.seed, self.comm.device
        )
        set_lr(self.opt, lr_at(step, tc))
        for layer in self.moe:
            if hasattr(layer, "set_step"):  # a peer system's layer has none
                layer.set_step(step)
        outs = self._micro_batches(x, y)
        self.faults.after_backward(step, self._poison_a_gradient)
        loss = sum(o.loss.detach() for o in outs) / len(outs)
        bad = self._first_bad(loss)
        with ledger.in_phase("optimizer"):
            grad_norm = apply_gradients(self.opt, self.sync, self.model, self.comm, tc.grad_clip, self.sched is None)
            if not math.isfinite(grad_norm):
                self._non_finite(step, bad)
            self.grads_bytes = grad_bytes(self.model)  # the memory metrics' gradients, before they are freed
            self.opt.zero_grad(set_to_none=True)
        syncs.stop()
        if self.comm.device.type == "cuda":
            torch.cuda.synchronize()
        self.heap.step()  # inside the step time: its cost is the step's
        step_time = time.perf_counter() - t0
        values = {
            "loss": float(loss),
            "ce_loss": float(sum(o.ce.detach() for o in outs) / len(outs)),
            "aux_loss": float(sum(o.aux.detach() for o in outs) / len(outs)),
            "step_time_s": step_time,
            "grad_norm": grad_norm,
            "host_syncs": syncs.count,
            "host_syncs_comm": self.comm.host_syncs - comm_syncs,
        }
        self.last_comm = ledger.end_step()
        moe = merge_micro_batches([o.moe for o in outs])
        self.last_layer_stats = {i: o.stats for i, o in moe.items()}
        return self.stats.add_step(values, self.last_comm, moe)

    def _micro_batches(self, x: torch.Tensor, y: torch.Tensor) -> list:
        """Forward and backward of the step's batch in `train.grad_accum` micro-batches, each with its own
        dispatch; each backpropagates its loss / N, so the gradient is that of the whole batch. Lina's
        scheduler reduces only after the last (it would otherwise send partial gradients)."""
        ledger, n = self.comm.ledger, self.cfg.train.grad_accum
        outs = []
        for m, (xm, ym) in enumerate(zip(x.chunk(n), y.chunk(n), strict=True)):
            last = m == n - 1
            if self.sched is not None:
                self.sched.armed = last
            with ledger.in_phase("forward"), self._compute():
                out = self.task.forward(self.model, xm, ym)
            with ledger.in_phase("backward"):
                (out.loss / n if n > 1 else out.loss).backward()
                if last and self.sched is not None:
                    self.sched.finish()
            outs.append(out)
        return outs

    def _compute(self) -> contextlib.AbstractContextManager:
        """Mixed precision without FSDP: autocast to the compute dtype (FSDP casts the parameters itself)."""
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.comm.device.type, dtype=DTYPES[self.cfg.train.compute_dtype])

    def _poison_a_gradient(self) -> None:
        """The `nan` fault: one expert gradient of the last MoE layer becomes NaN."""
        grad = next(p.grad for p in self.moe[-1].parameters() if is_expert_param(p) and p.grad is not None)
        grad.fill_(float("nan"))

    def _first_bad(self, loss: torch.Tensor) -> int:
        """-1 for a non-finite loss, else the index of the first parameter with a non-finite gradient."""
        if not bool(torch.isfinite(loss.detach())):
            return -1
        grads = [fsdp.local(p.grad) if p.grad is not None else None for p in self.model.parameters() if p.requires_grad]
        norms = torch.stack([g.norm() if g is not None else torch.zeros((), device=self.comm.device) for g in grads])
        bad = torch.nonzero(~torch.isfinite(norms))
        return int(bad[0]) if bad.numel() else NO_BAD_PARAM

    def _non_finite(self, step: int, bad: int) -> None:
        """Every rank gets here together (the norm is global); agree on the culprit, then skip or stop."""
        idx = torch.tensor([bad], dtype=torch.int64, device=self.comm.device)
        self.comm.all_reduce(idx, self.comm.group("world"), "nan.culprit", op="min")
        i = int(idx)
        what = (
            "the loss"
            if i == -1
            else (f"the gradient of {self.param_names[i]}" if i < NO_BAD_PARAM else "the synchronised gradients")
        )
        self.state.skipped_steps += 1
        if self.cfg.fault.nan_policy == "stop":
            self.opt.zero_grad(set_to_none=True)
            path = self.save_checkpoint(step) if self.save_every else None
            saved = f"; saved {path}" if path else " (no checkpoint: train.save_every=0)"
            raise NumericalError(f"non-finite value in {what} at step {step}; stopping (fault.nan_policy=stop){saved}")
        n = self.state.skipped_steps
        self.log(f"step {step}: non-finite value in {what}; step skipped ({n} so far)")

    # ------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, step: int) -> Path:
        self.state.step = step
        t0 = time.perf_counter()
        extra = {**self.task.meta(), "data": ckpt.data_identity(self.data)}
        meta = ckpt.run_meta(self.cfg, self.comm, self.task.signature(), extra)
        path = ckpt.save_run(
            self.model,
            self.opt,
            self.comm,
            self.cfg,
            self.state,
            layers=self.moe,
            meta=meta,
            side_files=self.task.write_side_files,
            inside_save=self.faults.inside_save,
        )
        self._say(f"saved checkpoint {path} ({time.perf_counter() - t0:.1f} s)")
        return path

    def load_checkpoint(self, path: Path) -> None:
        meta, data = ckpt.read_meta(path), ckpt.data_identity(self.data)
        auto = ckpt.resume_spec(self.cfg) == "auto"
        nodes = ckpt.num_nodes(self.comm)
        ckpt.check_compatible(path, meta, self.task.signature(), self.cfg, nodes=nodes, data=data, auto=auto)
        ckpt.check_not_finished(path, int(meta.get("step", 0)), self.cfg)
        self.state = ckpt.restore_run(path, self.model, self.opt, self.comm, self.moe)
        self.log(
            f"resumed from {path} at step {self.state.step} "
            f"(saved by {meta['world_size']} ranks, now {self.comm.world_size})"
        )
        changes = ckpt.config_changes(meta, self.cfg, data)
        if changes:
            self.log(f"changed since the checkpoint: {', '.join(changes)}")

    # ------------------------------------------------------------------------------------ eval

    def evaluate(self) -> dict[str, float]:
        """Mean validation cross-entropy over `eval_batches` batches per rank, agreed by all ranks:
        `val_loss` with exact experts (no compression: the model a user deploys) and, when some MoE
        layer compresses its rows lossily, `val_loss_compressed` as the model computes in training."""

        def ce(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with self._compute():
                return self.task.forward(self.model, x, y).ce

        with exact_experts(self.moe):
            out = {"val_loss": validation_loss(self.model, ce, self.data, self.cfg, self.comm)}
        if any(_lossy(layer) for layer in self.moe):
            out["val_loss_compressed"] = validation_loss(self.model, ce, self.data, self.cfg, self.comm)
        return out

    # ------------------------------------------------------------------------------------ loop

    def run(self, on_step: Callable[[int], None] | None = None) -> TrainResult:
        """Train to `train.steps`; `on_step(step)` (optional) is called after every step (benchmarks hook here)."""
        tc = self.cfg.train
        self._announce()
        result = TrainResult(final_val_loss=float("nan"), out_dir=str(self.out_dir))
        step_times: collections.deque[float] = collections.deque(maxlen=10_000)
        self.progress = Progress(tc.steps, enabled=self.comm.rank == 0 and tc.progress, initial=self.state.step)
        stop = StopSignal()
        self.peak.reset()
        try:
            for step in range(self.state.step, tc.steps):
                values = self.train_step(step)
                step_times.append(values["step_time_s"])
                self.state.step = step + 1
                self.state.train_time_s += values["step_time_s"]
                postfix = self._log_if_due(step, result)
                postfix.update(self._evaluate_if_due(step, result))
                self._save_if_due(step)
                self.progress.update(1, **postfix)
                if on_step is not None:
                    on_step(step + 1)
                if step + 1 < tc.steps and stop.agreed(self.comm):
                    self._stop(step + 1)
        finally:
            stop.close()
            self.progress.close()
            if self.sched is not None:
                self.sched.close()
            if self.tb is not None:
                self.tb.close()
        self.task.after_training(self)
        return self._finish(result, step_times)

    def _stop(self, step: int) -> None:
        """SIGTERM: save this step (unless it was just saved, or the run saves nothing) and stop."""
        every = self.save_every
        saved = ""
        if every:
            path = ckpt.checkpoint_root(self.cfg) / f"step_{step:08d}"
            if not self._is_due(step - 1, every):
                path = self.save_checkpoint(step)
            saved = f"; resume from {path}"
        self.writer.write({"kind": "stopped", "step": step, "wall_time": time.time()})
        self.writer.close()
        raise Stopped(f"stopped by SIGTERM after step {step}{saved or ' (no checkpoint: train.save_every=0)'}")

    def _is_due(self, step: int, every: int) -> bool:
        """Interval work happens after every `every`-th step and after the last one (every=0: only the last)."""
        return step == self.cfg.train.steps - 1 or (every > 0 and (step + 1) % every == 0)

    def _say(self, msg: str) -> None:
        """A console line from rank 0 that does not tear the progress bar."""
        if self.comm.rank != 0:
            return
        if self.progress is not None and self.progress.bar is not None:
            self.progress.write(f"[lshmoe] {msg}")
        else:
            say(0, msg)

    def _announce(self) -> None:
        comm, tc = self.comm, self.cfg.train
        self.log(
            f"{self.task.describe(self.model)}; {comm.world_size} rank(s) on {comm.device}, "
            f"{comm.world_size * self.tokens_per_rank_step} tokens/step"
        )
        lr = f"lr {tc.lr:g}" + (f" ({self.lr_default}; --lr to change)" if self.lr_default else "")
        every = self.save_every
        saves = (
            "no checkpoints"
            if not every
            else ("a checkpoint at the end" if every >= tc.steps else f"a checkpoint every {every} steps")
        )
        where = " (a new directory for this job; --out-dir names one)" if self.new_dir else ""
        self.log(f"{tc.steps} steps, {lr}, {saves}; writing to {self.out_dir}{where}")
        self.writer.write(
            {
                "kind": "config" if self.start_step == 0 else "resume",
                "step": self.start_step,
                "world_size": comm.world_size,
                "restart": ckpt.restart_count(),
                "wall_time": time.time(),
                "config": self.cfg.to_dict(),
                "params_per_rank": sum(p.numel() for p in self.model.parameters()),
                "data": self.data.source,
                "task": self.task.name,
            }
        )

    def _log_if_due(self, step: int, result: TrainResult) -> dict[str, Any]:
        tc = self.cfg.train
        if not self._is_due(step, tc.log_every):
            return {}
        rec = self.stats.reduce(self.comm, self.tokens_per_rank_step)
        rec.update(
            kind="train",
            step=step + 1,
            lr=lr_at(step, tc),
            train_time_s=self.state.train_time_s,
            skipped_steps=self.state.skipped_steps,
            wall_time=time.time(),
        )
        self._name_choices(rec)
        rec.update(self._memory())
        self.writer.write(rec)
        if self.tb is not None:
            self.tb.write(rec)
        result.records.append(rec)
        if not tc.progress:
            self._say(_console_line(rec, tc.steps))
        return {
            "loss": f"{rec['loss']:.3f}",
            "tok/s": f"{rec['tokens_per_s']:.0f}",
            "comm": f"{100 * rec['comm_share']:.0f}%",
        }

    def _memory(self) -> dict[str, int]:
        """Per-rank memory (train/memory.py), the largest over the ranks; the peak is the interval's."""
        mine = {**state_bytes(self.model, self.opt, self.grads_bytes), "peak_rss_bytes": self.peak.read()}
        t = torch.tensor(list(mine.values()), dtype=torch.int64, device=self.comm.device)
        self.comm.all_reduce(t, self.comm.group("world"), "metrics.memory", op="max", phase="metrics")
        self.peak.reset()
        return dict(zip(mine, t.tolist(), strict=True))

    def _name_choices(self, rec: dict[str, Any]) -> None:
        """Per-layer compressor choices (`auto_choice`, an index) also by name."""
        for layer in self.moe:
            names = getattr(getattr(layer, "compressor", None), "names", None)
            stats = rec.get("layers", {}).get(f"moe{layer.layer_id}", {})
            if names and "auto_choice" in stats:
                stats["auto_choice_name"] = names[int(round(stats["auto_choice"]))]

    def _evaluate_if_due(self, step: int, result: TrainResult) -> dict[str, Any]:
        if not self._is_due(step, self.cfg.train.eval_every):
            return {}
        vals = self.evaluate()
        result.final_val_loss = vals["val_loss"]
        result.final_val_loss_compressed = vals.get("val_loss_compressed")
        result.val_losses.append((step + 1, vals["val_loss"]))
        rec = {"kind": "eval", "step": step + 1, **vals, "train_time_s": self.state.train_time_s}
        self.writer.write(rec)
        if self.tb is not None:
            self.tb.write(rec)
        if not self.cfg.train.progress:
            self._say(f"step {step + 1}: {_val_text(vals)}")
        return {"val": f"{vals['val_loss']:.3f}"}

    def _save_if_due(self, step: int) -> None:
        save_every = self.save_every
        if save_every and self._is_due(step, save_every):
            self.save_checkpoint(step + 1)

    def _finish(self, result: TrainResult, step_times: collections.deque[float]) -> TrainResult:
        tc, comm = self.cfg.train, self.comm
        if self.start_step >= tc.steps:
            vals = self.evaluate()
            result.final_val_loss = vals["val_loss"]
            result.final_val_loss_compressed = vals.get("val_loss_compressed")
            self.log(f"the checkpoint is already at step {self.start_step} >= train.steps={tc.steps} (a restart)")
        result.skipped_steps = self.state.skipped_steps
        if step_times:
            warm = list(step_times)[min(len(step_times) - 1, 2) :]  # the first steps include one-off warm-up
            result.median_step_time_s = statistics.median(warm)
            result.median_tokens_per_s = comm.world_size * self.tokens_per_rank_step / result.median_step_time_s
        summary = {
            "kind": "summary",
            "final_val_loss": result.final_val_loss,
            "val_losses": result.val_losses,
            "median_step_time_s": result.median_step_time_s,
            "median_tokens_per_s": result.median_tokens_per_s,
            "steps": tc.steps,
            "world_size": comm.world_size,
            "skipped_steps": self.state.skipped_steps,
            "task": self.task.name,
        }
        if result.final_val_loss_compressed is not None:
            summary["final_val_loss_compressed"] = result.final_val_loss_compressed
        self.writer.write(summary)
        self.writer.close()
        if comm.rank == 0:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        vals = {"val_loss": result.final_val_loss}
        if result.final_val_loss_compressed is not None:
            vals["val_loss_compressed"] = result.final_val_loss_compressed
        self.log(
            f"done: {_val_text(vals)}, {result.median_tokens_per_s:.0f} tokens/s "
            f"(median step {1000 * result.median_step_time_s:.0f} ms); metrics in {self.out_dir}"
        )
        return result


def _lossy(layer: nn.Module) -> bool:
    """Whether the layer's compressor may change its outputs (identity and peers' layers do not)."""
    comp = getattr(layer, "compressor", None)
    return comp is not None and comp.name != "identity"


def _val_text(vals: dict[str, float]) -> str:
    text = f"val loss {vals['val_loss']:.4f} (exact experts)"
    if "val_loss_compressed" in vals:
        text += f", {vals['val_loss_compressed']:.4f} as trained (compressed)"
    return text


def _console_line(rec: dict[str, Any], steps: int) -> str:
    """One line per log interval when there is no progress bar."""
    line = (
        f"step {rec['step']}/{steps}: loss {rec['loss']:.4f}, {rec['tokens_per_s']:,.0f} tok/s, "
        f"a2a {100 * rec['a2a_share']:.0f}% of the step"
    )
    if rec["rows_sent"] != rec["rows_routed"]:
        line += f", {100 * rec['compression_rate']:.1f}% of routed rows sent"
    return line


def apply_task_defaults(cfg: Config, task: Task) -> tuple[str, int]:
    """The settings left to the model (none): `train.lr` becomes the task's rate (recorded in the run's
    config, so a resume compares real rates), and the save interval is resolved here only (an end-only
    save is an interval of `train.steps`). Returns (what chose the LR, or "" when the run set it; the
    save interval, 0 = never)."""
    tc = cfg.train
    chosen = ""
    if tc.lr is None:
        tc.lr, chosen = task.default_lr, f"the {task.name} default"
    every = tc.save_every
    if every is None:
        every = tc.steps if task.save_at_end else 0
    return chosen, every


def agree_on_data(comm: Comm, data: Batches, cfg: Config) -> None:
    """Every rank must train on the same token data: a data file edited while the ranks start would
    give them different caches (and vocabularies) without this check."""
    if comm.world_size == 1:
        return
    key = int(str(data.key)[:15], 16)  # 60 bits of the data key
    t = torch.tensor([key, -key], dtype=torch.int64, device=comm.device)
    comm.all_reduce(t, comm.group("world"), "data.agree", op="max", phase="setup")
    if int(t[0]) != -int(t[1]):
        raise DataError(
            f"--data {cfg.data.path or cfg.data.corpus}: the ranks read different contents (it changed while "
            "the job started); rerun when the data is not being written"
        )


def run_job(cfg: Config, task: Task) -> TrainResult:
    """Run a training job of `task` in this process (one rank of it under torchrun or the local launcher)."""
    comm = init_comm(cfg.dist, cfg.moe.ep_size)
    try:
        return Trainer(cfg, comm, task).run()
    except BaseException as e:
        note_failure(e)  # for the launcher: which rank failed first
        # user errors, numerical stops, SIGTERM and Ctrl-C are every rank's own verdict
        if not isinstance(e, UserError | NumericalError | Stopped | KeyboardInterrupt):
            comm.report_failure(e)
        raise
    finally:
        # NOTE: tear the process group down explicitly: left to interpreter exit, gloo's threads can
        # be destroyed while joinable and abort the process ("terminate called without an active exception").
        shutdown()


__all__ = ["TrainResult", "Trainer", "agree_on_data", "apply_task_defaults", "run_job", "say"]
