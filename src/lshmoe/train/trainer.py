"""The training loop: GPT-MoE on token data, expert-parallel MoE, data-parallel dense weights.

One step on every rank:
    batch(step, rank) -> forward (phase forward) -> backward (phase backward)
    -> gradient sync + global-norm clip + AdamW (phase optimizer) -> ledger.end_step()
Every `log_every` steps the ranks reduce their interval metrics and rank 0 writes a JSONL line;
every `eval_every` steps (and at the end) all ranks compute the validation loss together; every
`save_every` steps (and at the end) they write a checkpoint, from which `--resume` continues exactly.

A non-finite loss or gradient is detected from the global gradient norm (identical on every rank,
so all ranks take the same path); the first offending parameter is named, and the step is skipped
or the run saves and stops (`fault.nan_policy`).

What a checkpoint holds and how it is restored lives in `train/checkpoint.py` (`save_run`,
`restore_run`); injected faults (for tests and `lshmoe bench chaos`) in `train/faults.py`: the loop
only calls the injector's hooks at named points.
"""

from __future__ import annotations

import collections
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

from lshmoe.config import DTYPES, Config, validate
from lshmoe.distributed.comm import Comm
from lshmoe.distributed.setup import init_comm, shutdown
from lshmoe.distributed.syncs import HostSyncCounter
from lshmoe.errors import DataError, NumericalError, UserError
from lshmoe.models.gpt import GPTMoE, MoEFactory
from lshmoe.moe.layer import MoELayer
from lshmoe.sched.grad_scheduler import GradScheduler
from lshmoe.train import checkpoint as ckpt
from lshmoe.train.allocator import HeapTrimmer
from lshmoe.train.data import TokenData, load_data
from lshmoe.train.evaluate import validation_loss
from lshmoe.train.faults import FaultInjector
from lshmoe.train.grad_sync import GradSync
from lshmoe.train.metrics import IntervalStats, MetricsWriter, Progress
from lshmoe.train.optim import apply_gradients, build_optimizer, lr_at, set_lr

NO_BAD_PARAM = 1 << 30


@dataclass(kw_only=True)
class TrainResult:
    final_val_loss: float
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    median_step_time_s: float = 0.0
    median_tokens_per_s: float = 0.0
    skipped_steps: int = 0
    out_dir: str = ""
    records: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[lshmoe] {msg}", file=sys.stderr, flush=True)


class Trainer:
    def __init__(self, cfg: Config, comm: Comm, data: TokenData, moe_factory: MoEFactory = MoELayer):
        self.cfg, self.comm, self.data = cfg, comm, data
        tc = cfg.train
        torch.manual_seed(tc.seed * 1000 + comm.rank)  # dropout and router jitter differ per rank
        self.model = GPTMoE(cfg.model, cfg.moe, data.vocab_size, comm, moe_factory, settings=cfg, seed=tc.seed)
        self.model.to(device=comm.device, dtype=DTYPES[tc.dtype])
        self.model.reset_parameters(tc.seed)
        self.opt = build_optimizer(self.model, tc)
        self.sync = GradSync(self.model, comm)
        self.heap = HeapTrimmer(cfg.dist.malloc_trim_every)
        self.syncs = HostSyncCounter(comm.device.type == "cuda")
        comm.timing = cfg.dist.comm_timing
        self.sched = None
        if cfg.lina.grad_sync != "sync":
            self.sched = GradScheduler(self.model, comm, cfg.lina.grad_sync, int(cfg.lina.chunk_mb * 2**20))
            comm.ledger.enable_timeline(50_000)
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.moe_ids = self.model.moe_ids
        self.stats = IntervalStats(self.moe_ids, cfg.moe.num_experts)
        self.tokens_per_rank_step = tc.batch_size * cfg.model.seq_len
        self.out_dir = Path(tc.out_dir)
        self.faults = FaultInjector(cfg.fault.inject, comm.rank, self.out_dir)
        self.state = ckpt.RunState()
        resume = ckpt.resolve_resume(cfg, comm, lambda m: _log(comm.rank, m))
        if resume is not None:
            self.load_checkpoint(resume)
        self.start_step = self.state.step
        path = self.out_dir / "metrics.jsonl" if comm.rank == 0 else None
        self.writer = MetricsWriter(path, append=resume is not None)

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
        self.model.set_step(step)
        with ledger.in_phase("forward"):
            out = self.model(x, y)
        with ledger.in_phase("backward"):
            out.loss.backward()
            if self.sched is not None:
                self.sched.finish()
        self.faults.after_backward(step, self._poison_a_gradient)
        bad = self._first_bad(out.loss)
        with ledger.in_phase("optimizer"):
            grad_norm = apply_gradients(self.opt, self.sync, self.model, self.comm, tc.grad_clip, self.sched is None)
            if not math.isfinite(grad_norm):
                self._non_finite(step, bad)
            self.opt.zero_grad(set_to_none=True)
        syncs.stop()
        if self.comm.device.type == "cuda":
            torch.cuda.synchronize()
        self.heap.step()  # inside the step time: its cost is the step's
        step_time = time.perf_counter() - t0
        values = {
            "loss": float(out.loss.detach()),
            "ce_loss": float(out.ce_loss.detach()),
            "aux_loss": float(out.aux_loss.detach()),
            "step_time_s": step_time,
            "grad_norm": grad_norm,
            "host_syncs": syncs.count,
            "host_syncs_comm": self.comm.host_syncs - comm_syncs,
        }
        self.last_comm = ledger.end_step()
        self.last_layer_stats = {i: out.moe[i].stats for i in self.moe_ids}
        return self.stats.add_step(values, self.last_comm, {i: out.moe[i] for i in self.moe_ids})

    def _poison_a_gradient(self) -> None:
        self.model.moe_layers[-1].experts.w1_GDF.grad.fill_(float("nan"))

    def _first_bad(self, loss: torch.Tensor) -> int:
        """-1 for a non-finite loss, else the index of the first parameter with a non-finite gradient."""
        if not bool(torch.isfinite(loss.detach())):
            return -1
        grads = [p.grad for p in self.model.parameters() if p.requires_grad]
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
            path = self.save_checkpoint(step) if self.cfg.train.save_every else None
            saved = f"; saved {path}" if path else " (no checkpoint: train.save_every=0)"
            raise NumericalError(f"non-finite value in {what} at step {step}; stopping (fault.nan_policy=stop){saved}")
        n = self.state.skipped_steps
        _log(self.comm.rank, f"step {step}: non-finite value in {what}; step skipped ({n} so far)")

    # ------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, step: int) -> Path:
        self.state.step = step
        return ckpt.save_run(
            self.model, self.opt, self.comm, self.cfg, self.data.vocab_size, self.state, self.faults.inside_save
        )

    def load_checkpoint(self, path: Path) -> None:
        self.state, meta = ckpt.restore_run(path, self.model, self.opt, self.comm, self.cfg, self.data.vocab_size)
        _log(
            self.comm.rank,
            f"resumed from {path} at step {self.state.step} "
            f"(saved by {meta['world_size']} ranks, now {self.comm.world_size})",
        )

    # ------------------------------------------------------------------------------------ eval

    def evaluate(self) -> float:
        """Mean validation cross-entropy over `eval_batches` batches per rank, agreed by all ranks."""
        return validation_loss(self.model, lambda x, y: self.model(x, y).ce_loss, self.data, self.cfg, self.comm)

    # ------------------------------------------------------------------------------------ loop

    def run(self, on_step: Callable[[int], None] | None = None) -> TrainResult:
        """Train to `train.steps`; `on_step(step)` (optional) is called after every step (benchmarks hook here)."""
        tc = self.cfg.train
        self._announce()
        result = TrainResult(final_val_loss=float("nan"), out_dir=str(self.out_dir))
        step_times: collections.deque[float] = collections.deque(maxlen=10_000)
        progress = Progress(tc.steps, enabled=self.comm.rank == 0 and tc.progress, initial=self.state.step)
        try:
            for step in range(self.state.step, tc.steps):
                values = self.train_step(step)
                step_times.append(values["step_time_s"])
                self.state.step = step + 1
                self.state.train_time_s += values["step_time_s"]
                postfix = self._log_if_due(step, result)
                postfix.update(self._evaluate_if_due(step, result))
                self._save_if_due(step)
                progress.update(1, **postfix)
                if on_step is not None:
                    on_step(step + 1)
        finally:
            progress.close()
            if self.sched is not None:
                self.sched.close()
        return self._finish(result, step_times)

    def _is_due(self, step: int, every: int) -> bool:
        """Interval work happens after every `every`-th step and after the last one (every=0: only the last)."""
        return step == self.cfg.train.steps - 1 or (every > 0 and (step + 1) % every == 0)

    def _announce(self) -> None:
        comm, moe = self.comm, self.cfg.moe
        n_params = sum(p.numel() for p in self.model.parameters())
        _log(
            comm.rank,
            f"{comm.world_size} rank(s) on {comm.device}, model {n_params / 1e6:.2f} M params/rank, "
            f"{len(self.moe_ids)} MoE layers x {moe.num_experts} experts (top-{moe.top_k}), "
            f"{comm.world_size * self.tokens_per_rank_step} tokens/step",
        )
        self.writer.write(
            {
                "kind": "config" if self.start_step == 0 else "resume",
                "step": self.start_step,
                "world_size": comm.world_size,
                "restart": ckpt.restart_count(),
                "wall_time": time.time(),
                "config": self.cfg.to_dict(),
                "params_per_rank": n_params,
                "data": self.data.source,
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
        self.writer.write(rec)
        result.records.append(rec)
        return {
            "loss": f"{rec['loss']:.3f}",
            "tok/s": f"{rec['tokens_per_s']:.0f}",
            "comm": f"{100 * rec['comm_share']:.0f}%",
        }

    def _evaluate_if_due(self, step: int, result: TrainResult) -> dict[str, Any]:
        if not self._is_due(step, self.cfg.train.eval_every):
            return {}
        val = result.final_val_loss = self.evaluate()
        result.val_losses.append((step + 1, val))
        self.writer.write({"kind": "eval", "step": step + 1, "val_loss": val, "train_time_s": self.state.train_time_s})
        return {"val": f"{val:.3f}"}

    def _save_if_due(self, step: int) -> None:
        save_every = self.cfg.train.save_every
        if save_every and self._is_due(step, save_every):
            self.save_checkpoint(step + 1)

    def _finish(self, result: TrainResult, step_times: collections.deque[float]) -> TrainResult:
        tc, comm = self.cfg.train, self.comm
        if self.start_step >= tc.steps:
            result.final_val_loss = self.evaluate()
            _log(comm.rank, f"the checkpoint is already at step {self.start_step} >= train.steps={tc.steps}")
        val = result.final_val_loss
        result.skipped_steps = self.state.skipped_steps
        if step_times:
            warm = list(step_times)[min(len(step_times) - 1, 2) :]  # the first steps include one-off warm-up
            result.median_step_time_s = statistics.median(warm)
            result.median_tokens_per_s = comm.world_size * self.tokens_per_rank_step / result.median_step_time_s
        summary = {
            "kind": "summary",
            "final_val_loss": val,
            "val_losses": result.val_losses,
            "median_step_time_s": result.median_step_time_s,
            "median_tokens_per_s": result.median_tokens_per_s,
            "steps": tc.steps,
            "world_size": comm.world_size,
            "skipped_steps": self.state.skipped_steps,
        }
        self.writer.write(summary)
        self.writer.close()
        if comm.rank == 0:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        _log(
            comm.rank,
            f"done: val loss {val:.4f}, {result.median_tokens_per_s:.0f} tokens/s "
            f"(median step {1000 * result.median_step_time_s:.0f} ms); metrics in {self.out_dir}",
        )
        return result


def _agree_on_data(comm: Comm, data: TokenData, cfg: Config) -> None:
    """Every rank must train on the same token data: a data file edited while the ranks start would
    give them different caches (and vocabularies) without this check."""
    if comm.world_size == 1:
        return
    key = int(data.key[:15], 16)  # 60 bits of the cache key
    t = torch.tensor([key, -key], dtype=torch.int64, device=comm.device)
    comm.all_reduce(t, comm.group("world"), "data.agree", op="max", phase="setup")
    if int(t[0]) != -int(t[1]):
        raise DataError(
            f"--data {cfg.data.path or cfg.data.corpus}: the ranks read different contents (it changed while "
            "the job started); "
            "rerun when the data is not being written"
        )


def train(cfg: Config) -> TrainResult:
    """Run a training job in this process (one rank of it under torchrun or the local launcher)."""
    comm = init_comm(cfg.dist, cfg.moe.ep_size)
    try:
        ep_nodes = len({comm.node_of.get(r, 0) for r in comm.group("ep").ranks})
        validate(cfg, comm.world_size, nodes=ep_nodes)
        data = load_data(cfg.data, lambda m: _log(comm.rank, m))
        data.check_seq_len(cfg.model.seq_len)
        _agree_on_data(comm, data, cfg)
        return Trainer(cfg, comm, data).run()
    except BaseException as e:
        if not isinstance(e, UserError | NumericalError | KeyboardInterrupt):  # those are every rank's own verdict
            comm.report_failure(e)
        raise
    finally:
        # NOTE: tear the process group down explicitly: left to interpreter exit, gloo's threads can
        # be destroyed while joinable and abort the process ("terminate called without an active exception").
        shutdown()
