"""The training loop: GPT-MoE on token data, expert-parallel MoE, data-parallel dense weights.

One step on every rank:
    batch(step, rank) -> forward (phase forward) -> backward (phase backward)
    -> gradient sync + global-norm clip + AdamW (phase optimizer) -> ledger.end_step()
Every `log_every` steps the ranks reduce their interval metrics and rank 0 writes a JSONL line;
every `eval_every` steps (and at the end) all ranks compute the validation loss together.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lshmoe.config import Config, validate
from lshmoe.dist.comm import Comm
from lshmoe.dist.setup import init_comm
from lshmoe.models.gpt import GPTMoE, MoEFactory
from lshmoe.moe.layer import MoELayer
from lshmoe.train.data import TokenData, load_data
from lshmoe.train.grad_sync import GradSync
from lshmoe.train.metrics import IntervalStats, MetricsWriter, Progress
from lshmoe.train.optim import build_optimizer, lr_at, set_lr

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(kw_only=True)
class TrainResult:
    final_val_loss: float
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    median_step_time_s: float = 0.0
    median_tokens_per_s: float = 0.0
    out_dir: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[lshmoe] {msg}", file=sys.stderr, flush=True)


class Trainer:
    def __init__(self, cfg: Config, comm: Comm, data: TokenData, moe_factory: MoEFactory = MoELayer):
        self.cfg, self.comm, self.data = cfg, comm, data
        tc = cfg.train
        torch.manual_seed(tc.seed * 1000 + comm.rank)  # dropout and router jitter differ per rank
        self.model = GPTMoE(cfg.model, cfg.moe, data.vocab_size, comm, moe_factory, lsh=cfg.lsh, seed=tc.seed)
        self.model.to(device=comm.device, dtype=DTYPES[tc.dtype])
        self.model.reset_parameters(tc.seed)
        self.opt = build_optimizer(self.model, tc)
        self.sync = GradSync(self.model, comm)
        self.moe_ids = [i for i, b in enumerate(self.model.blocks) if b.is_moe]
        self.stats = IntervalStats(self.moe_ids, cfg.moe.num_experts)
        self.tokens_per_rank_step = tc.batch_size * cfg.model.seq_len
        self.out_dir = Path(tc.out_dir)
        self.writer = MetricsWriter(self.out_dir / "metrics.jsonl" if comm.rank == 0 else None)

    # ------------------------------------------------------------------------------------ step

    def train_step(self, step: int) -> dict[str, float]:
        tc, ledger = self.cfg.train, self.comm.ledger
        t0 = time.perf_counter()
        x, y = self.data.train_batch(step, self.comm.rank, tc.batch_size, self.cfg.model.seq_len, tc.seed,
                                     self.comm.device)
        set_lr(self.opt, lr_at(step, tc))
        self.model.set_step(step)
        with ledger.in_phase("forward"):
            out = self.model(x, y)
        with ledger.in_phase("backward"):
            out.loss.backward()
        with ledger.in_phase("optimizer"):
            self.sync.sync()
            grad_norm = self.sync.clip(tc.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if self.comm.device.type == "cuda":
            torch.cuda.synchronize()
        step_time = time.perf_counter() - t0
        load = torch.stack([out.moe[i].tokens_per_expert_E.cpu() for i in self.moe_ids])
        values = {
            "loss": float(out.loss.detach()), "ce_loss": float(out.ce_loss.detach()),
            "aux_loss": float(out.aux_loss.detach()),
            "step_time_s": step_time, "grad_norm": grad_norm,
            "rows_routed": sum(o.rows_routed for o in out.moe.values()),
            "rows_sent": sum(o.rows_sent for o in out.moe.values()),
            "dropped_tokens": sum(int(o.dropped) for o in out.moe.values()),
        }
        self.last_comm = ledger.end_step()
        self.last_layer_stats = {i: out.moe[i].stats for i in self.moe_ids}
        self.stats.add(values, self.last_comm, load, self.last_layer_stats)
        return values

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation cross-entropy over `eval_batches` batches per rank, agreed by all ranks."""
        tc, comm = self.cfg.train, self.comm
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=comm.device)
        with comm.ledger.in_phase("eval"):
            for i in range(tc.eval_batches):
                x, y = self.data.val_batch(i, comm.rank, comm.world_size, tc.batch_size, self.cfg.model.seq_len,
                                           comm.device, tc.eval_batches)
                total += self.model(x, y).ce_loss.double()
            comm.all_reduce(total, comm.group("world"), "eval.loss")
        self.model.train()
        return float(total) / (tc.eval_batches * comm.world_size)

    # ------------------------------------------------------------------------------------ loop

    def run(self) -> TrainResult:
        tc, comm = self.cfg.train, self.comm
        n_params = sum(p.numel() for p in self.model.parameters())
        moe = self.cfg.moe
        _log(comm.rank, f"{comm.world_size} rank(s) on {comm.device}, model {n_params / 1e6:.2f} M params/rank, "
                        f"{len(self.moe_ids)} MoE layers x {moe.num_experts} experts (top-{moe.top_k}), "
                        f"{comm.world_size * self.tokens_per_rank_step} tokens/step")
        self.writer.write({"kind": "config", "world_size": comm.world_size, "config": self.cfg.to_dict(),
                           "params_per_rank": n_params, "data": self.data.source})
        progress = Progress(tc.steps, enabled=comm.rank == 0 and tc.progress)
        result = TrainResult(final_val_loss=float("nan"), out_dir=str(self.out_dir))
        step_times: list[float] = []
        train_time = 0.0  # cumulative step time: wall time of training, validation excluded
        val = float("nan")
        try:
            for step in range(tc.steps):
                values = self.train_step(step)
                step_times.append(values["step_time_s"])
                train_time += values["step_time_s"]
                last = step == tc.steps - 1
                postfix: dict[str, Any] = {}
                if (step + 1) % tc.log_every == 0 or last:
                    rec = self.stats.reduce(comm, self.tokens_per_rank_step)
                    rec.update(kind="train", step=step + 1, lr=lr_at(step, tc), train_time_s=train_time)
                    self.writer.write(rec)
                    result.records.append(rec)
                    postfix = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{rec['tokens_per_s']:.0f}",
                               "comm": f"{100 * rec['comm_share']:.0f}%"}
                if (tc.eval_every and (step + 1) % tc.eval_every == 0) or last:
                    val = self.evaluate()
                    result.val_losses.append((step + 1, val))
                    self.writer.write({"kind": "eval", "step": step + 1, "val_loss": val, "train_time_s": train_time})
                    postfix["val"] = f"{val:.3f}"
                progress.update(1, **postfix)
        finally:
            progress.close()
        result.final_val_loss = val
        warm = step_times[min(len(step_times) - 1, 2):]  # the first steps include one-off warm-up
        result.median_step_time_s = statistics.median(warm)
        result.median_tokens_per_s = comm.world_size * self.tokens_per_rank_step / result.median_step_time_s
        summary = {"kind": "summary", "final_val_loss": val, "val_losses": result.val_losses,
                   "median_step_time_s": result.median_step_time_s,
                   "median_tokens_per_s": result.median_tokens_per_s, "steps": tc.steps,
                   "world_size": comm.world_size}
        self.writer.write(summary)
        self.writer.close()
        if comm.rank == 0:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        _log(comm.rank, f"done: val loss {val:.4f}, {result.median_tokens_per_s:.0f} tokens/s "
                        f"(median step {1000 * result.median_step_time_s:.0f} ms); metrics in {self.out_dir}")
        return result


def train(cfg: Config) -> TrainResult:
    """Run a training job in this process (one rank of it under torchrun or the local launcher)."""
    comm = init_comm(cfg.dist, cfg.moe.ep_size)
    validate(cfg, comm.world_size)
    data = load_data(cfg.data, lambda m: _log(comm.rank, m))
    data.check_seq_len(cfg.model.seq_len)
    return Trainer(cfg, comm, data).run()
