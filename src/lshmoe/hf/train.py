"""`lshmoe train --hf PATH`: fine-tune or continue pre-training a Hugging Face MoE checkpoint, or
upcycle a dense BERT checkpoint into an MoE masked LM and train it.

The model is the checkpoint's own (hf/model.py), or the upcycled BERT (hf/upcycle.py); hf/task.py
picks by the checkpoint's model type. It is expert-parallel over the EP group, fed with `--data`
text (or the embedded corpus) tokenised by the checkpoint's tokenizer.json (as masked-LM batches,
hf/mlm.py, for BERT). The step is the one of
train/trainer.py: forward + transformers' loss (hf/loss.py), backward, gradient sync (or Lina's
priority scheduler), global-norm clip, AdamW, the auxiliary-loss-free bias update; metrics every
`log_every` steps (JSONL, TensorBoard with --tensorboard), validation every `eval_every`, and
checkpoints every `save_every` steps from which `--resume` continues exactly (same batches, same
optimizer state, same router biases). A checkpoint also holds the transformers config and tokenizer
files (in `hf/`), so `lshmoe export` needs nothing else (MoE families only). The metrics lines are
the GPT-MoE trainer's (train/metrics.py): communication bytes, times and shares from the comm ledger,
rows routed and sent, expert load, and each MoE layer's compressor stats (for example `auto_choice`);
`upcycle.capture` saves the MoE layers' FFN inputs after the last step (hf/capture.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lshmoe.config import DTYPES, Config, ConfigError, MoEConfig, validate
from lshmoe.distributed.comm import Comm
from lshmoe.distributed.setup import init_comm, shutdown
from lshmoe.errors import DataError, NumericalError, UserError
from lshmoe.hf import read_config
from lshmoe.hf.capture import capture_ffn_inputs
from lshmoe.hf.export import SIDE_FILES
from lshmoe.hf.family import HFError
from lshmoe.hf.loss import lm_loss
from lshmoe.hf.model import build_model, moe_blocks
from lshmoe.hf.packaged import checkpoint_dir
from lshmoe.hf.task import moe_overrides, task_for
from lshmoe.sched.grad_scheduler import GradScheduler
from lshmoe.train import checkpoint as ckpt
from lshmoe.train.corpus import embedded_corpus, user_corpus
from lshmoe.train.data import TokenData, _is_val
from lshmoe.train.evaluate import validation_loss
from lshmoe.train.grad_sync import GradSync
from lshmoe.train.metrics import IntervalStats, MetricsWriter, Progress
from lshmoe.train.optim import apply_gradients, build_optimizer, lr_at, set_lr


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[lshmoe] {msg}", file=sys.stderr, flush=True)


def hf_token_data(path: Path, cfg: Config, vocab_size: int, log) -> TokenData:
    """The run's text tokenised by the checkpoint's tokenizer.json, split like train/data.py."""
    from tokenizers import Tokenizer

    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise HFError(f"{path}: no tokenizer.json; train --hf tokenises --data with the checkpoint's own tokenizer")
    tok = Tokenizer.from_file(str(tok_file))
    tok.no_padding()  # NOTE: a sentence-embedding tokenizer pads / truncates every text to 128 tokens
    tok.no_truncation()
    dc = cfg.data
    docs = user_corpus(dc.path) if dc.path else embedded_corpus(dc.corpus)
    train_docs = [d for d in docs if not _is_val(d, dc.val_fraction)]
    val_docs = [d for d in docs if _is_val(d, dc.val_fraction)]
    if not val_docs or not train_docs:
        cut = max(1, int(len(docs) * (1 - dc.val_fraction)))
        train_docs, val_docs = docs[:cut], docs[cut:] or docs[-1:]
    eos = _eos_id(path, tok)

    def encode(batch: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for enc in tok.encode_batch(batch):
            ids.extend(enc.ids)
            if eos is not None:
                ids.append(eos)
        return torch.tensor(ids, dtype=torch.int32)

    train_ids, val_ids = encode(train_docs), encode(val_docs)
    top = int(max(train_ids.max(), val_ids.max()))
    if top >= vocab_size:
        raise HFError(f"{tok_file}: token id {top} is outside the model's vocab_size={vocab_size}")
    source = dc.path or f"embedded:{dc.corpus}"
    log(f"tokenised {source} with {tok_file}: {train_ids.numel()} training, {val_ids.numel()} validation tokens")
    return TokenData(
        train_ids=train_ids, val_ids=val_ids, vocab_size=vocab_size, tokenizer_path=tok_file, source=source
    )


def _eos_id(path: Path, tok) -> int | None:
    conf = path / "tokenizer_config.json"
    name = json.loads(conf.read_text()).get("eos_token") if conf.is_file() else None
    if isinstance(name, dict):
        name = name.get("content")
    return tok.token_to_id(name) if name else None


def config_digest(config: Any) -> str:
    d = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in ("transformers_version",)}
    return hashlib.blake2b(json.dumps(d, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


class HFTrainer:
    def __init__(self, cfg: Config, comm: Comm):
        self.cfg, self.comm = cfg, comm
        tc = cfg.train
        self.src = checkpoint_dir(cfg.model.hf)
        self.task = task_for(self.src)
        self.hf_config = self.task.read_config(self.src)
        max_pos = getattr(self.hf_config, "max_position_embeddings", None)
        if max_pos is not None and cfg.model.seq_len > max_pos:
            raise ConfigError(f"model.seq_len={cfg.model.seq_len} is out of range; the checkpoint allows <= {max_pos}")
        torch.manual_seed(tc.seed * 1000 + comm.rank)
        resume = ckpt.resolve_resume(cfg)
        self.model, self.mcfg = self.task.build(self.hf_config, self.src, cfg, comm, resume is None)
        vocab = self.hf_config.vocab_size
        tokens = hf_token_data(self.src, cfg, vocab, lambda m: _log(comm.rank, m))
        self.data = self.task.batches(tokens, self.src, cfg, vocab)
        self.data.check_seq_len(cfg.model.seq_len)
        self.opt = build_optimizer(self.model, tc)
        self.sync = GradSync(self.model, comm)
        self.stats = IntervalStats([i for i, _ in moe_blocks(self.model)], cfg.moe.num_experts)
        self.tokens_per_rank_step = tc.batch_size * cfg.model.seq_len
        self.sched = None
        if cfg.lina.grad_sync != "sync":
            self.sched = GradScheduler(self.model, comm, cfg.lina.grad_sync, int(cfg.lina.chunk_mb * 2**20))
            comm.ledger.enable_timeline(50_000)
        self.out_dir = Path(tc.out_dir)
        self.start_step, self.train_time, self.skipped = 0, 0.0, 0
        if resume is not None:
            self.load_checkpoint(resume)
        self.writer = MetricsWriter(
            self.out_dir / "metrics.jsonl" if comm.rank == 0 else None, append=resume is not None
        )
        self.tb = _tensorboard(self.out_dir / "tensorboard") if tc.tensorboard and comm.rank == 0 else None

    # ------------------------------------------------------------------------------------ step

    def _batch(self, step: int):
        tc = self.cfg.train
        x, y = self.data.train_batch(
            step, self.comm.rank, tc.batch_size, self.cfg.model.seq_len, tc.seed, self.comm.device
        )
        return x, y

    def train_step(self, step: int) -> dict[str, float]:
        tc, ledger = self.cfg.train, self.comm.ledger
        t0 = time.perf_counter()
        x, y = self._batch(step)
        set_lr(self.opt, lr_at(step, tc))
        for _, b in moe_blocks(self.model):
            b.moe.set_step(step)
        with ledger.in_phase("forward"):
            out = lm_loss(self.model, x, y)
        with ledger.in_phase("backward"):
            out["loss"].backward()
            if self.sched is not None:
                self.sched.finish()
        with ledger.in_phase("optimizer"):
            grad_norm = apply_gradients(self.opt, self.sync, self.model, self.comm, tc.grad_clip, self.sched is None)
            if not math.isfinite(grad_norm):
                self.skipped += 1
                if self.cfg.fault.nan_policy == "stop":
                    self.save_checkpoint(step)
                    raise NumericalError(f"non-finite gradient norm at step {step}; saved and stopped")
            self.opt.zero_grad(set_to_none=True)
        if self.comm.device.type == "cuda":
            torch.cuda.synchronize()
        values = {
            "loss": float(out["loss"].detach()),
            "ce_loss": float(out["ce"].detach()),
            "aux_loss": float(out["aux"].detach()),
            "grad_norm": grad_norm,
            "step_time_s": time.perf_counter() - t0,
        }
        return self.stats.add_step(values, ledger.end_step(), {i: b.last_out for i, b in moe_blocks(self.model)})

    # ------------------------------------------------------------------------------------ checkpoints

    def _meta(self) -> dict[str, Any]:
        return {
            "model": {"hf.model_type": self.hf_config.model_type, "hf.config": config_digest(self.hf_config)},
            "world_size": self.comm.world_size,
            "ep_size": self.comm.group("ep").size,
            "nodes": 1,
            "config": self.cfg.to_dict(),
            "hf": {"source": str(self.src), "dtype": self.cfg.train.dtype},
        }

    def _extra(self, step: int) -> dict[str, torch.Tensor]:
        return {
            "trainer/step": torch.tensor(step),
            "trainer/train_time_s": torch.tensor(self.train_time),
            "trainer/skipped_steps": torch.tensor(self.skipped),
        }

    def save_checkpoint(self, step: int) -> Path:
        entries = ckpt.state_entries(self.model, self.opt, self.comm.rank, self._extra(step))
        path = ckpt.save(
            ckpt.checkpoint_root(self.cfg), step, entries, self._meta(), self.comm, self.cfg.train.keep_last
        )
        if self.comm.rank == 0:  # what export needs besides the weights
            (path / "hf").mkdir(exist_ok=True)
            self.hf_config.save_pretrained(str(path / "hf"))
            for f in SIDE_FILES:
                if (self.src / f).is_file():
                    shutil.copy2(self.src / f, path / "hf" / f)
        return path

    def load_checkpoint(self, path: Path) -> None:
        meta = ckpt.read_meta(path)
        want = self._meta()["model"]
        if meta.get("model") != want:
            raise ckpt.CheckpointError(
                f"checkpoint {path} was saved from model {meta.get('model')}, this run has {want}; "
                "resume with the same --hf checkpoint"
            )
        entries = ckpt.state_entries(self.model, self.opt, self.comm.rank, self._extra(0))
        missing = ckpt.load(path, entries)
        rng = f"rng/rank{self.comm.rank}"
        if rng not in missing:
            torch.set_rng_state(entries[rng])
        self.start_step = int(entries["trainer/step"])
        self.train_time = float(entries["trainer/train_time_s"])
        self.skipped = int(entries["trainer/skipped_steps"])
        _log(self.comm.rank, f"resumed from {path} at step {self.start_step}")

    # ------------------------------------------------------------------------------------ eval / loop

    @torch.no_grad()
    def evaluate(self) -> float:
        ce = lambda x, y: lm_loss(self.model, x, y)["ce"]  # noqa: E731
        return validation_loss(self.model, ce, self.data, self.cfg, self.comm)

    def run(self) -> dict[str, Any]:
        tc, comm = self.cfg.train, self.comm
        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        trained = "" if n_train == n_params else f" ({n_train / 1e6:.2f} M trained)"
        _log(
            comm.rank,
            f"{self.hf_config.model_type} from {self.src}: {comm.world_size} rank(s) on {comm.device}, "
            f"{n_params / 1e6:.2f} M params/rank{trained}, {len(moe_blocks(self.model))} MoE layers x "
            f"{self.mcfg.num_experts} experts (top-{self.mcfg.top_k})",
        )
        self.writer.write(
            {
                "kind": "config" if self.start_step == 0 else "resume",
                "step": self.start_step,
                "world_size": comm.world_size,
                "config": self.cfg.to_dict(),
                "hf": str(self.src),
            }
        )
        progress = Progress(tc.steps, enabled=comm.rank == 0 and tc.progress, initial=self.start_step)
        val, vals = float("nan"), []
        try:
            for step in range(self.start_step, tc.steps):
                v = self.train_step(step)
                self.train_time += v["step_time_s"]
                last = step == tc.steps - 1
                if (step + 1) % tc.log_every == 0 or last:
                    rec = self.stats.reduce(comm, self.tokens_per_rank_step)
                    rec.update(kind="train", step=step + 1, lr=lr_at(step, tc), train_time_s=self.train_time)
                    self.writer.write(rec)
                    self._tb(rec)
                    progress.update(0, loss=f"{rec['loss']:.3f}", comm=f"{100 * rec['comm_share']:.0f}%")
                if (tc.eval_every and (step + 1) % tc.eval_every == 0) or last:
                    val = self.evaluate()
                    vals.append((step + 1, val))
                    self.writer.write({"kind": "eval", "step": step + 1, "val_loss": val})
                    self._tb({"step": step + 1, "val_loss": val})
                if tc.save_every and ((step + 1) % tc.save_every == 0 or last):
                    self.save_checkpoint(step + 1)
                progress.update(1)
        finally:
            progress.close()
            if self.sched is not None:
                self.sched.close()
        if self.cfg.upcycle.capture:
            self.capture(Path(self.cfg.upcycle.capture))
        summary = {
            "kind": "summary",
            "final_val_loss": val,
            "val_losses": vals,
            "steps": tc.steps,
            "world_size": comm.world_size,
            "skipped_steps": self.skipped,
        }
        self.writer.write(summary)
        self.writer.close()
        if self.tb is not None:
            self.tb.close()
        if comm.rank == 0:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        _log(comm.rank, f"done: val loss {val:.4f}; metrics in {self.out_dir}")
        return summary

    def capture(self, path: Path) -> None:
        """The MoE layers' FFN inputs on the batch the next step would train on (hf/capture.py)."""
        x, _ = self._batch(self.cfg.train.steps)
        meta = {
            "hf": str(self.src),
            "task": self.task.name,
            "steps": self.cfg.train.steps,
            "config": self.cfg.to_dict(),
        }
        capture_ffn_inputs(self.model, self.comm, x, path, meta)
        _log(self.comm.rank, f"captured the FFN inputs of {len(moe_blocks(self.model))} MoE layers in {path}")

    def _tb(self, rec: dict[str, Any]) -> None:
        if self.tb is None:
            return
        for k, v in rec.items():
            if k not in ("kind", "step") and isinstance(v, int | float):
                self.tb.add_scalar(k, v, rec["step"])


def _tensorboard(path: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path))


def train_hf(cfg: Config) -> dict[str, Any]:
    """One rank of a `train --hf` job."""
    comm = init_comm(cfg.dist, cfg.moe.ep_size)
    try:
        validate(
            cfg, comm.world_size if cfg.moe.num_experts % max(1, cfg.moe.ep_size or comm.world_size) == 0 else None
        )
        if cfg.model.arch != "gpt":
            raise ConfigError(f"model.arch={cfg.model.arch}: with --hf the model is the checkpoint's own (arch gpt)")
        return HFTrainer(cfg, comm).run()
    except BaseException as e:
        if not isinstance(e, UserError | NumericalError | DataError | KeyboardInterrupt):
            comm.report_failure(e)
        raise
    finally:
        shutdown()


def export_checkpoint(checkpoint: str, out: str) -> Path:
    """`lshmoe export`: a training checkpoint (any EP size) as a transformers checkpoint, in one process."""
    from lshmoe.config import TrainConfig
    from lshmoe.hf.export import export

    path = ckpt.find_checkpoint(checkpoint, "--checkpoint")
    meta = ckpt.read_meta(path)
    if "hf" not in meta or not (path / "hf" / "config.json").is_file():
        raise ckpt.CheckpointError(f"--checkpoint {path}: not a train --hf checkpoint (no hf/config.json)")
    run = meta["config"]
    config = read_config(path / "hf")
    moe = MoEConfig(**{k: v for k, v in run["moe"].items() if k in {f.name for f in dataclasses.fields(MoEConfig)}})
    model, _ = build_model(config, Comm.local(), dtype=DTYPES[meta["hf"]["dtype"]], overrides=moe_overrides(moe))
    entries = ckpt.state_entries(model, build_optimizer(model, TrainConfig()), 0, {})
    ckpt.load(path, {k: v for k, v in entries.items() if k.startswith("model/")})
    return export(model, Comm.local(), out, source=path / "hf")
