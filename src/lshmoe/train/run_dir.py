"""Where a run writes: `train.out_dir`, or a new directory for every job.

A job without `--out-dir` writes to `runs/<model>-<YYYYmmdd-HHMMSS>` (`-2`, `-3`, ... when that name is
taken), so a new job never lands in an older run's directory and `--resume auto` only ever finds the
job's own checkpoints. The name must be the same on every rank and for every restart of the job, since a
restarted job resumes from its own checkpoints:

- lshmoe's launcher (`--nproc`, `--max-restarts`) names it once, before any rank starts, and hands it to
  every rank of every attempt as `--out-dir` (commands/train.py);
- under torchrun, rank 0 of the first attempt stores the name in the elastic agent's store
  (TORCHELASTIC_USE_AGENT_STORE), which outlives the workers: every rank of every attempt reads it there;
- otherwise (one process, or ranks started by a launcher without such a store) rank 0 names it and the
  ranks agree through one broadcast; restarts by such a launcher need an explicit `--out-dir`.
"""

from __future__ import annotations

import os
import re
import time
from datetime import timedelta
from pathlib import Path

import torch

from lshmoe.config import Config
from lshmoe.distributed.comm import Comm

ROOT = Path("runs")
STORE_KEY = "lshmoe/run_dir"  # in the agent's store: one per job, outside the per-attempt prefix
NAME_BYTES = 1024


def model_name(cfg: Config) -> str:
    """What the directory is named after: the --hf checkpoint's directory name, else the architecture."""
    name = Path(str(cfg.model.hf)).expanduser().name if cfg.model.hf else cfg.model.arch
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def new_run_dir(cfg: Config, now: float | None = None, root: Path = ROOT) -> str:
    """A directory name no run has used yet (not created: the run creates it when it writes)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    base = root / f"{model_name(cfg)}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return str(path)


def _agent_store(timeout_s: float):
    """A client of torchrun's agent store, which lives as long as the job (None when there is none)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    import torch.distributed as dist

    return dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=timeout_s)
    )


def agree_run_dir(cfg: Config, comm: Comm) -> str:
    """This job's default directory, the same on every rank and (under torchrun) every restart."""
    store = _agent_store(cfg.dist.timeout_s) if comm.world_size > 1 else None
    if store is not None:
        if comm.rank == 0 and not store.check([STORE_KEY]):
            store.set(STORE_KEY, new_run_dir(cfg))
        return store.get(STORE_KEY).decode()
    if comm.world_size == 1:
        return new_run_dir(cfg)
    buf = torch.zeros(NAME_BYTES, dtype=torch.uint8, device=comm.device)
    if comm.rank == 0:
        raw = new_run_dir(cfg).encode()[:NAME_BYTES]
        buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    comm.broadcast(buf, 0, comm.group("world"), "run_dir", phase="setup")
    return bytes(buf.cpu().tolist()).rstrip(b"\0").decode()


def resolve_out_dir(cfg: Config, comm: Comm) -> bool:
    """Fill `train.out_dir` when it is none; True when this run named a new directory."""
    if cfg.train.out_dir is not None:
        return False
    cfg.train.out_dir = agree_run_dir(cfg, comm)
    return True


__all__ = ["agree_run_dir", "model_name", "new_run_dir", "resolve_out_dir"]
