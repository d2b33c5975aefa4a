"""Checkpoints with torch.distributed.checkpoint: exact resume, resharding, atomic saves.

Layout of `<ckpt_dir>/`:
    step_00000100/        one checkpoint: DCP shards (*.distcp, .metadata) and meta.json
    step_00000200.tmp/    a save in progress (or interrupted: never loaded, removed by the next save)
    latest                the name of the newest complete checkpoint (replaced atomically)

What is saved, under layout-independent keys so that a checkpoint written by W ranks loads on W':
- `model/<name>`: dense parameters (replicated; DCP writes them once);
- `model/<bank>/e<global expert>`: one entry per expert of each expert bank, so a rank loads exactly
  the experts it owns under the new expert-parallel layout;
- `optim/<same key>/{exp_avg,exp_avg_sq,step}`: the AdamW state, split the same way;
- `rng/rank<r>`: each rank's torch generator state;
- `compressor/rank<r>/moe<i>/<name>`: each compressor's `state_dict()` (e.g. LSH's L controller);
- `trainer/{step,train_time_s,skipped_steps}`.
Learning-rate schedule, data position and LSH projections are functions of the step, so restoring
the step restores them. `meta.json` holds the model config; loading into an incompatible model is a
one-line error, as is a missing or corrupted checkpoint.

Saving: every rank writes into `step_N.tmp`, then rank 0 adds meta.json, renames the directory to
`step_N`, points `latest` at it and deletes checkpoints beyond `keep_last`. A crash before the rename
leaves the previous checkpoint and `latest` untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from lshmoe.config import Config
from lshmoe.distributed.comm import Comm
from lshmoe.errors import UserError
from lshmoe.moe.param_kinds import is_expert_param, is_node_param

FORMAT = 1
# Model config fields that change parameter shapes or their meaning; a checkpoint only loads into the same.
SHAPE_FIELDS = {
    "model": ("d_model", "n_layers", "n_heads", "seq_len", "moe_every", "mlp_ratio", "norm"),
    "moe": ("num_experts", "d_expert", "activation"),
    "locmoe": ("node_bias",),
}


class CheckpointError(UserError):
    """A checkpoint is missing, corrupted, or from an incompatible model."""


def _expert_layout(model: nn.Module) -> dict[str, int]:
    """Expert bank parameter name -> global id of this rank's first expert in it."""
    out = {}
    for name, p in model.named_parameters():
        if is_expert_param(p):
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            out[name] = owner.first_expert
    return out


def _adam_state(opt: torch.optim.Optimizer, p: nn.Parameter) -> dict[str, torch.Tensor]:
    st = opt.state[p]
    if not st:  # AdamW creates its state lazily: make it now so it can be loaded into
        st["step"] = torch.zeros((), dtype=torch.float32)
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return st


def state_entries(
    model: nn.Module, opt: torch.optim.Optimizer, rank: int, extra: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Flat key -> tensor view of everything a checkpoint holds for this rank."""
    firsts = _expert_layout(model)
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        st = _adam_state(opt, p)
        if is_node_param(p):  # one entry per node; the ranks of a node hold identical copies
            key = f"{name}/node{getattr(model, 'my_node', 0)}"
            out[f"model/{key}"] = p.data
            for k in ("exp_avg", "exp_avg_sq", "step"):
                out[f"optim/{key}/{k}"] = st[k]
        elif name in firsts:
            for g in range(p.shape[0]):
                key = f"{name}/e{firsts[name] + g}"
                out[f"model/{key}"] = p.data[g]
                out[f"optim/{key}/exp_avg"] = st["exp_avg"][g]
                out[f"optim/{key}/exp_avg_sq"] = st["exp_avg_sq"][g]
                out[f"optim/{key}/step"] = st["step"]
        else:
            out[f"model/{name}"] = p.data
            for k in ("exp_avg", "exp_avg_sq", "step"):
                out[f"optim/{name}/{k}"] = st[k]
    out[f"rng/rank{rank}"] = torch.get_rng_state()
    out.update(extra)
    return out


def model_signature(cfg: Config, vocab_size: int) -> dict[str, Any]:
    sig = {f"{sec}.{k}": getattr(getattr(cfg, sec), k) for sec, keys in SHAPE_FIELDS.items() for k in keys}
    sig["data.vocab_size(actual)"] = vocab_size
    return sig


# ------------------------------------------------------------------------------------------ locating


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.train.ckpt_dir) if cfg.train.ckpt_dir else Path(cfg.train.out_dir) / "checkpoints"


def latest(root: Path) -> Path | None:
    ptr = root / "latest"
    if not ptr.is_file():
        return None
    path = root / ptr.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def resolve_resume(cfg: Config) -> Path | None:
    """`train.resume`: none, auto (the latest checkpoint if there is one), or a checkpoint path."""
    spec = cfg.train.resume
    if spec == "none":
        return None
    if spec == "auto":
        return latest(checkpoint_root(cfg))
    return find_checkpoint(spec, "--resume")


def find_checkpoint(spec: str, flag: str) -> Path:
    """A checkpoint directory, or a checkpoints root whose `latest` names one; one-line errors naming `flag`."""
    path = Path(spec)
    if path.is_dir() and (path / "latest").is_file():
        found = latest(path)
        if found is None:
            raise CheckpointError(f"{flag} {spec}: 'latest' points to a missing or incomplete checkpoint")
        return found
    if not path.exists():
        raise CheckpointError(f"{flag} {spec}: no such checkpoint directory")
    if not (path / "meta.json").is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(f"{flag} {spec}: not a complete lshmoe checkpoint (meta.json or .metadata missing)")
    return path


def preflight(cfg: Config) -> None:
    """Check `--resume` before any process starts or data is built (the vocabulary is checked later)."""
    path = resolve_resume(cfg)
    if path is not None:
        check_compatible(path, read_meta(path), cfg, vocab_size=None)
        verify_files(path)


def verify_files(path: Path) -> None:
    """Every shard file holds the byte ranges the metadata says it does (catches truncated copies)."""
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} is corrupted: .metadata unreadable ({_first_cause(e)})") from None
    ends: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in ends.items():
        f = path / rel
        size = f.stat().st_size if f.is_file() else -1
        if size < end:
            what = "is missing" if size < 0 else f"is truncated ({size} of {end} bytes)"
            raise CheckpointError(f"checkpoint {path} is corrupted: shard {rel} {what}")


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupted: meta.json unreadable ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, this version reads {FORMAT}")
    return meta


def check_compatible(path: Path, meta: dict[str, Any], cfg: Config, vocab_size: int | None) -> None:
    """One-line error unless the checkpoint's model matches (vocab_size None: not known yet, not checked)."""
    want = model_signature(cfg, vocab_size)
    for k, v in meta["model"].items():
        if vocab_size is None and k.startswith("data."):
            continue
        if want.get(k) != v:
            raise CheckpointError(
                f"checkpoint {path} was saved with {k}={v}, this run has {k}={want.get(k)}; "
                "use the checkpoint's model config"
            )


# ------------------------------------------------------------------------------------------ save/load


def _barrier(comm: Comm) -> None:
    comm.all_reduce(torch.zeros(1, device=comm.device), comm.group("world"), "ckpt.barrier", phase="setup")


def save(
    root: Path,
    step: int,
    entries: dict[str, torch.Tensor],
    meta: dict[str, Any],
    comm: Comm,
    keep_last: int,
    before_commit: Callable[[], None] | None = None,
) -> Path:
    """Write a checkpoint atomically (see the module docstring); return its directory."""
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if comm.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier(comm)
    dcp.save(entries, checkpoint_id=str(tmp))
    if before_commit is not None:
        before_commit()
    _barrier(comm)
    if comm.rank == 0:
        (tmp / "meta.json").write_text(
            json.dumps({**meta, "format": FORMAT, "step": step, "time": time.time()}, indent=1)
        )
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        ptr = root / "latest.tmp"
        ptr.write_text(final.name)
        os.replace(ptr, root / "latest")
        done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(comm)
    return final


def _first_cause(e: BaseException) -> str:
    """The root message of a (possibly rank-wrapped) DCP failure, on one line."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def load(path: Path, entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill `entries` from the checkpoint (keys it lacks are left alone and returned as missing)."""
    try:
        reader = dcp.FileSystemReader(str(path))
        have = set(reader.read_metadata().state_dict_metadata)
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is a corrupted checkpoint
        raise CheckpointError(f"checkpoint {path} is corrupted: {str(e).splitlines()[0][:200]}") from None
    wanted = {k: v for k, v in entries.items() if k in have}
    missing = {k: v for k, v in entries.items() if k not in have}
    model_missing = [k for k in missing if k.startswith("model/")]
    if model_missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {len(model_missing)} model tensors (e.g. {model_missing[0]}); "
            "it is from a different model"
        )
    try:
        dcp.load(wanted, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - truncated or damaged shard files
        raise CheckpointError(f"checkpoint {path} is corrupted: {_first_cause(e)}") from None
    for k, v in wanted.items():
        if entries[k] is not v:
            entries[k].copy_(v)
    return missing
