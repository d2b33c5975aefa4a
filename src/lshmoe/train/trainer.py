"""The training loop: GPT-MoE on token data, expert-parallel MoE, data-parallel dense weights.

One step on every rank:
    batch(step, rank) -> forward (phase forward) -> backward (phase backward)
    -> gradient sync + global-norm clip + AdamW (phase optimizer) -> ledger.end_step()
Every `log_every` steps the ranks reduce their interval metrics and rank 0 writes a JSONL line;
every `eval_every` steps (and at the end) all ranks compute the validation loss together; every
`save_every` steps (and at the end) they write a checkpoint, from which `--resume` continues exactly.

A non-finite loss or gradient is detected from the global gradient norm (identical on every rank,
so all ranks take the same path); the first offending parameter is named, and the step is skipped
or the run saves and stops (`train.nan_policy`).
"""

from __future__ import annotations

import collections
import json
import math
import os
import signal
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
from lshmoe.errors import NumericalError, UserError
from lshmoe.models.gpt import GPTMoE, MoEFactory
from lshmoe.moe.layer import MoELayer
from lshmoe.moe.router import update_correction_biases
from lshmoe.sched.grad_scheduler import GradScheduler
from lshmoe.train import checkpoint as ckpt
from lshmoe.train.allocator import HeapTrimmer
from lshmoe.train.data import TokenData, load_data
from lshmoe.train.grad_sync import GradSync
from lshmoe.train.metrics import IntervalStats, MetricsWriter, Progress
from lshmoe.train.optim import build_optimizer, lr_at, set_lr

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
        self.sched = None
        if cfg.lina.grad_sync != "sync":
            self.sched = GradScheduler(self.model, comm, cfg.lina.grad_sync, int(cfg.lina.chunk_mb * 2**20))
            comm.ledger.enable_timeline(50_000)
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.moe_ids = self.model.moe_ids
        self.stats = IntervalStats(self.moe_ids, cfg.moe.num_experts)
        self.tokens_per_rank_step = tc.batch_size * cfg.model.seq_len
        self.out_dir = Path(tc.out_dir)
        self.start_step, self.train_time, self.skipped = 0, 0.0, 0
        self.fault = _parse_fault(cfg.fault.inject)
        resume = ckpt.resolve_resume(cfg)
        if resume is not None:
            self.load_checkpoint(resume)
        path = self.out_dir / "metrics.jsonl" if comm.rank == 0 else None
        self.writer = MetricsWriter(path, append=resume is not None)

    # ------------------------------------------------------------------------------------ step

    def train_step(self, step: int) -> dict[str, float]:
        tc, ledger = self.cfg.train, self.comm.ledger
        self._maybe_fault("kill", step)
        self._maybe_fault("stall", step)
        t0 = time.perf_counter()
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
        if self._fault_now("nan", step):
            self.model.moe_layers[-1].experts.w1_GDF.grad.fill_(float("nan"))
        bad = self._first_bad(out.loss)
        with ledger.in_phase("optimizer"):
            self.sync.sync(dense=self.sched is None)
            grad_norm = self.sync.clip(tc.grad_clip)
            if math.isfinite(grad_norm):
                self.opt.step()
                update_correction_biases(self.model, self.comm)
            else:
                self._non_finite(step, bad)
            self.opt.zero_grad(set_to_none=True)
        if self.comm.device.type == "cuda":
            torch.cuda.synchronize()
        self.heap.step()  # inside the step time: its cost is the step's
        step_time = time.perf_counter() - t0
        load = torch.stack([out.moe[i].tokens_per_expert_E.cpu() for i in self.moe_ids])
        values = {
            "loss": float(out.loss.detach()),
            "ce_loss": float(out.ce_loss.detach()),
            "aux_loss": float(out.aux_loss.detach()),
            "step_time_s": step_time,
            "grad_norm": grad_norm,
            "rows_routed": sum(o.rows_routed for o in out.moe.values()),
            "rows_sent": sum(o.rows_sent for o in out.moe.values()),
            "dropped_tokens": sum(int(o.dropped) for o in out.moe.values()),
        }
        self.last_comm = ledger.end_step()
        self.last_layer_stats = {i: out.moe[i].stats for i in self.moe_ids}
        self.stats.add(
            values, self.last_comm, load, self.last_layer_stats, {i: out.moe[i].reduce for i in self.moe_ids}
        )
        return values

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
        self.skipped += 1
        if self.cfg.fault.nan_policy == "stop":
            self.opt.zero_grad(set_to_none=True)
            path = self.save_checkpoint(step) if self.cfg.train.save_every else None
            saved = f"; saved {path}" if path else " (no checkpoint: train.save_every=0)"
            raise NumericalError(f"non-finite value in {what} at step {step}; stopping (fault.nan_policy=stop){saved}")
        _log(self.comm.rank, f"step {step}: non-finite value in {what}; step skipped ({self.skipped} so far)")

    # ------------------------------------------------------------------------------------ faults (testing)

    def _fault_now(self, kind: str, step: int) -> bool:
        f = self.fault
        return f is not None and f[0] == kind and f[1] == self.comm.rank and f[2] == step

    def _maybe_fault(self, kind: str, step: int) -> None:
        if not self._fault_now(kind, step):
            return
        print(f"[lshmoe] rank {self.comm.rank}: injected fault '{kind}' at step {step}", file=sys.stderr, flush=True)
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while kind == "stall":
            time.sleep(3600)

    # ------------------------------------------------------------------------------------ checkpoints

    def _extra_entries(self, step: int) -> dict[str, torch.Tensor]:
        out = {
            "trainer/step": torch.tensor(step),
            "trainer/train_time_s": torch.tensor(self.train_time),
            "trainer/skipped_steps": torch.tensor(self.skipped),
        }
        for layer in self.model.moe_layers:
            comp = getattr(layer, "compressor", None)  # a peer system's layer has none
            for name, t in (comp.state_dict() if comp is not None else {}).items():
                out[f"compressor/rank{self.comm.rank}/moe{layer.layer_id}/{name}"] = t
        return out

    def _nodes(self) -> int:
        return max(self.comm.node_of.values(), default=0) + 1

    def save_checkpoint(self, step: int) -> Path:
        entries = ckpt.state_entries(self.model, self.opt, self.comm.rank, self._extra_entries(step))
        meta = {
            "model": ckpt.model_signature(self.cfg, self.data.vocab_size),
            "world_size": self.comm.world_size,
            "ep_size": self.comm.group("ep").size,
            "nodes": self._nodes(),
            "config": self.cfg.to_dict(),
        }
        kill = (lambda: self._maybe_fault("kill", step)) if self._fault_now("killsave", step) else None
        if kill is not None:
            self.fault = ("kill", self.comm.rank, step)
        return ckpt.save(
            ckpt.checkpoint_root(self.cfg), step, entries, meta, self.comm, self.cfg.train.keep_last, before_commit=kill
        )

    def load_checkpoint(self, path: Path) -> None:
        meta = ckpt.read_meta(path)
        ckpt.check_compatible(path, meta, self.cfg, self.data.vocab_size)
        if self.cfg.locmoe.node_bias and meta.get("nodes") != self._nodes():
            raise ckpt.CheckpointError(
                f"checkpoint {path} holds per-node router biases (locmoe.node_bias) for "
                f"{meta.get('nodes')} nodes; this run has {self._nodes()} nodes"
            )
        extra = self._extra_entries(0)
        entries = ckpt.state_entries(self.model, self.opt, self.comm.rank, extra)
        missing = ckpt.load(path, entries)
        rng = f"rng/rank{self.comm.rank}"
        if rng not in missing:
            torch.set_rng_state(entries[rng])
        self.start_step = int(entries["trainer/step"])
        self.train_time = float(entries["trainer/train_time_s"])
        self.skipped = int(entries["trainer/skipped_steps"])
        for layer in self.model.moe_layers:
            comp = getattr(layer, "compressor", None)
            if comp is None:
                continue
            prefix = f"compressor/rank{self.comm.rank}/moe{layer.layer_id}/"
            comp.load_state_dict(
                {k[len(prefix) :]: v for k, v in entries.items() if k.startswith(prefix) and k not in missing}
            )
        _log(
            self.comm.rank,
            f"resumed from {path} at step {self.start_step} "
            f"(saved by {meta['world_size']} ranks, now {self.comm.world_size})",
        )

    # ------------------------------------------------------------------------------------ eval

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation cross-entropy over `eval_batches` batches per rank, agreed by all ranks."""
        tc, comm = self.cfg.train, self.comm
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=comm.device)
        with comm.ledger.in_phase("eval"):
            for i in range(tc.eval_batches):
                x, y = self.data.val_batch(
                    i, comm.rank, comm.world_size, tc.batch_size, self.cfg.model.seq_len, comm.device, tc.eval_batches
                )
                total += self.model(x, y).ce_loss.double()
            comm.all_reduce(total, comm.group("world"), "eval.loss")
        self.model.train()
        return float(total) / (tc.eval_batches * comm.world_size)

    # ------------------------------------------------------------------------------------ loop

    def run(self, on_step: Callable[[int], None] | None = None) -> TrainResult:
        """Train to `train.steps`; `on_step(step)` (optional) is called after every step (benchmarks hook here)."""
        tc, comm = self.cfg.train, self.comm
        n_params = sum(p.numel() for p in self.model.parameters())
        moe = self.cfg.moe
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
                "config": self.cfg.to_dict(),
                "params_per_rank": n_params,
                "data": self.data.source,
            }
        )
        progress = Progress(tc.steps, enabled=comm.rank == 0 and tc.progress, initial=self.start_step)
        result = TrainResult(final_val_loss=float("nan"), out_dir=str(self.out_dir))
        step_times: collections.deque[float] = collections.deque(maxlen=10_000)
        val = float("nan")
        try:
            for step in range(self.start_step, tc.steps):
                values = self.train_step(step)
                step_times.append(values["step_time_s"])
                self.train_time += values["step_time_s"]
                last = step == tc.steps - 1
                postfix: dict[str, Any] = {}
                if (step + 1) % tc.log_every == 0 or last:
                    rec = self.stats.reduce(comm, self.tokens_per_rank_step)
                    rec.update(
                        kind="train",
                        step=step + 1,
                        lr=lr_at(step, tc),
                        train_time_s=self.train_time,
                        skipped_steps=self.skipped,
                    )
                    self.writer.write(rec)
                    result.records.append(rec)
                    postfix = {
                        "loss": f"{rec['loss']:.3f}",
                        "tok/s": f"{rec['tokens_per_s']:.0f}",
                        "comm": f"{100 * rec['comm_share']:.0f}%",
                    }
                if (tc.eval_every and (step + 1) % tc.eval_every == 0) or last:
                    val = self.evaluate()
                    result.val_losses.append((step + 1, val))
                    self.writer.write(
                        {"kind": "eval", "step": step + 1, "val_loss": val, "train_time_s": self.train_time}
                    )
                    postfix["val"] = f"{val:.3f}"
                if tc.save_every and ((step + 1) % tc.save_every == 0 or last):
                    self.save_checkpoint(step + 1)
                progress.update(1, **postfix)
                if on_step is not None:
                    on_step(step + 1)
        finally:
            progress.close()
            if self.sched is not None:
                self.sched.close()
        if self.start_step >= tc.steps:
            val = self.evaluate()
            _log(comm.rank, f"the checkpoint is already at step {self.start_step} >= train.steps={tc.steps}")
        result.final_val_loss, result.skipped_steps = val, self.skipped
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
            "skipped_steps": self.skipped,
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


def _parse_fault(spec: str) -> tuple[str, int, int] | None:
    if not spec:
        return None
    kind, rank, step = spec.split(":")
    return kind, int(rank), int(step)


def train(cfg: Config) -> TrainResult:
    """Run a training job in this process (one rank of it under torchrun or the local launcher)."""
    comm = init_comm(cfg.dist, cfg.moe.ep_size)
    try:
        ep_nodes = len({comm.node_of.get(r, 0) for r in comm.group("ep").ranks})
        validate(cfg, comm.world_size, nodes=ep_nodes)
        data = load_data(cfg.data, lambda m: _log(comm.rank, m))
        data.check_seq_len(cfg.model.seq_len)
        return Trainer(cfg, comm, data).run()
    except BaseException as e:
        if not isinstance(e, UserError | NumericalError | KeyboardInterrupt):  # those are every rank's own verdict
            comm.report_failure(e)
        raise
    finally:
        # NOTE: tear the process group down explicitly: left to interpreter exit, gloo's threads can
        # be destroyed while joinable and abort the process ("terminate called without an active exception").
        shutdown()
