"""Checkpoints with torch.distributed.checkpoint: the schema, exact resume, resharding, atomic and
verified saves.

Layout of `<ckpt_dir>/`:
    step_00000100/        one checkpoint: DCP shards (*.distcp, .metadata), meta.json, manifest.json
    step_00000200.tmp/    a save in progress (or interrupted: never loaded, removed by the next save)
    latest                the name of the newest complete checkpoint (replaced atomically)

What is saved (the schema), under layout-independent keys so that a checkpoint written by W ranks
loads on W':
- `model/<name>`: dense parameters (replicated; DCP writes them once);
- `model/<bank>/e<global expert>`: one entry per expert of each expert bank, so a rank loads exactly
  the experts it owns under the new expert-parallel layout;
- `optim/<same key>/{exp_avg,exp_avg_sq,step}`: the AdamW state, split the same way;
- `rng/rank<r>`: each rank's torch generator state;
- `compressor/rank<r>/moe<i>/<name>`: each compressor's `state_dict()` (e.g. LSH's L controller);
- `trainer/{step,train_time_s,skipped_steps}`: the `RunState`;
- the task's side files (an HF checkpoint's config and tokenizer under `hf/`), written by rank 0
  before the manifest, so they are verified with the shards.
Learning-rate schedule, data position and LSH projections are functions of the step, so restoring
the step restores them. `meta.json` holds the run's config and the task's model signature; loading
into an incompatible model is a one-line error, as is a missing or corrupted checkpoint.

Saving: every rank writes its shards into `step_N.tmp` and records their SHA-256; then rank 0 adds
meta.json, writes `manifest.json` last (`train/integrity.py`), renames the directory to `step_N`,
points `latest` at it and deletes checkpoints beyond `keep_last`. A crash or a full disk before the
rename leaves the previous checkpoint and `latest` untouched; a failed save is one line on every rank.

Resuming: `train.resume=auto` (the default) takes `latest` when the directory holds a checkpoint,
verifies every file against the manifest (the ranks share the hashing) and, when a file is missing,
truncated or altered, says so and falls back to the previous complete checkpoint. An explicit path
that fails verification is an error. A restarted job (torchrun's or lshmoe's `--max-restarts`, seen
as TORCHELASTIC_RESTART_COUNT > 0) resumes from the latest checkpoint whatever `train.resume` says.

Identity: meta.json records the model signature and the token data (`data.key`, the digest of the token
store's manifest: the text, the tokenizer and the split). `--resume auto` continues only a run of the same
model and data; a checkpoint of another is one line naming what differs and the fix (`--resume none`,
another `--out-dir`). An explicit `--resume DIR` may continue on other data (continued pre-training, a
fine-tune of a fine-tune), which is printed with the other settings that changed (`config_changes`). A
checkpoint already at `train.steps` or beyond has nothing to train: one line, unless the job is a restart
(its last save was the final step), which then ends as the run did.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from lshmoe import integrity
from lshmoe.config import Config
from lshmoe.distributed.comm import Comm
from lshmoe.errors import UserError
from lshmoe.moe.param_kinds import is_expert_param, is_node_param

FORMAT = 2  # 2: with manifest.json
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


@dataclass(kw_only=True)
class RunState:
    """The trainer's own counters, saved as `trainer/*`."""

    step: int = 0  # steps done = the next step to run
    train_time_s: float = 0.0
    skipped_steps: int = 0


def _compressor_prefix(rank: int, layer: nn.Module) -> str:
    return f"compressor/rank{rank}/moe{layer.layer_id}/"


def run_entries(layers: list[nn.Module], rank: int, state: RunState) -> dict[str, torch.Tensor]:
    """The checkpoint entries besides parameters, optimizer and RNG: trainer counters, the state of
    each MoE layer's compressor (`layers`: the task's MoE layers)."""
    out = {
        "trainer/step": torch.tensor(state.step),
        "trainer/train_time_s": torch.tensor(state.train_time_s),
        "trainer/skipped_steps": torch.tensor(state.skipped_steps),
    }
    for layer in layers:
        comp = getattr(layer, "compressor", None)  # a peer system's layer has none
        for name, t in (comp.state_dict() if comp is not None else {}).items():
            out[_compressor_prefix(rank, layer) + name] = t
    return out


def data_identity(data: Any) -> dict[str, str]:
    """What meta.json records of the token data (a `Batches`): its key (content) and where it came from."""
    return {"key": str(data.key), "source": str(data.source)}


def _data_text(d: dict[str, str]) -> str:
    return f"{d.get('source')}, token data {str(d.get('key'))[:12]}"


# Fields whose change on resume is not worth a word: where the run writes, how it is watched and launched.
QUIET_FIELDS = {
    "train.out_dir",
    "train.ckpt_dir",
    "train.resume",
    "train.progress",
    "train.tensorboard",
    "data.cache_dir",
    "dist.nproc",
    "dist.threads",
    "dist.heartbeat_s",
    "dist.timeout_s",
    "fault.inject",
    "fault.max_restarts",
}


def config_changes(meta: dict[str, Any], cfg: Config, data: dict[str, str] | None = None) -> list[str]:
    """`section.key old -> new` for every setting of this run that differs from the checkpoint's run (LR,
    batch, compressor, steps, ...), and the token data when it is another."""
    saved, now = meta.get("config", {}), cfg.to_dict()
    out = []
    for section, values in now.items():
        for key, value in values.items():
            dotted = f"{section}.{key}"
            old = saved.get(section, {}).get(key, value)
            if dotted not in QUIET_FIELDS and old != value:
                out.append(f"{dotted} {old} -> {value}")
    if data is not None and meta.get("data") and meta["data"].get("key") != data["key"]:
        out.append(f"data {_data_text(meta['data'])} -> {_data_text(data)}")
    return out


def check_not_finished(path: Path, step: int, cfg: Config) -> None:
    """A checkpoint at or beyond `train.steps` leaves nothing to train: one line (not for a restarted job,
    whose last save may be its final step)."""
    steps = cfg.train.steps
    if step >= steps and restart_count() == 0:
        raise CheckpointError(
            f"checkpoint {path} is already at step {step} and train.steps={steps}: nothing to train; give --steps "
            f"above {step} to continue it, or --resume none (or another --out-dir) to start afresh"
        )


def run_meta(cfg: Config, comm: Comm, signature: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """meta.json: what a later run checks before it loads the tensors (`signature`: the task's model)."""
    return {
        "model": signature,
        "world_size": comm.world_size,
        "ep_size": comm.group("ep").size,
        "nodes": num_nodes(comm),
        "config": cfg.to_dict(),
        **extra,
    }


def num_nodes(comm: Comm) -> int:
    return max(comm.node_of.values(), default=0) + 1


def save_run(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    comm: Comm,
    cfg: Config,
    state: RunState,
    *,
    layers: list[nn.Module],
    meta: dict[str, Any],
    side_files: Callable[[Path], None] | None = None,
    inside_save: Callable[[int], None] | None = None,
) -> Path:
    """Save everything a run needs to continue at `state.step` exactly; return the checkpoint directory.
    `side_files(dir)` (rank 0) writes the task's extra files into it before the manifest is made."""
    entries = state_entries(model, opt, comm.rank, run_entries(layers, comm.rank, state))
    hook = (lambda: inside_save(state.step)) if inside_save is not None else None
    return save(
        checkpoint_root(cfg), state.step, entries, meta, comm, cfg.train.keep_last, inside=hook, side_files=side_files
    )


def restore_run(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, comm: Comm, layers: list[nn.Module]
) -> RunState:
    """Load a checkpoint into `model`/`opt`, this rank's RNG and the compressors of `layers`; return its
    RunState (the caller has checked the checkpoint is of this model: `check_compatible`)."""
    entries = state_entries(model, opt, comm.rank, run_entries(layers, comm.rank, RunState()))
    if comm.rank != 0:  # rank 0's compressor state, for a rank the saving job did not have
        entries.update({k: v.clone() for k, v in run_entries(layers, 0, RunState()).items() if k.startswith("compr")})
    missing = load(path, entries)
    rng = f"rng/rank{comm.rank}"
    if rng not in missing:
        torch.set_rng_state(entries[rng])
    for layer in layers:
        comp = getattr(layer, "compressor", None)
        if comp is None:
            continue
        # NOTE: a compressor's state is agreed by the ranks (auto's choice, the L controller's averages),
        # so a rank new to a resharded job takes rank 0's
        prefix = _compressor_prefix(comm.rank, layer)
        if not any(k.startswith(prefix) and k not in missing for k in entries):
            prefix = _compressor_prefix(0, layer)
        comp.load_state_dict(
            {k[len(prefix) :]: v for k, v in entries.items() if k.startswith(prefix) and k not in missing}
        )
    return RunState(
        step=int(entries["trainer/step"]),
        train_time_s=float(entries["trainer/train_time_s"]),
        skipped_steps=int(entries["trainer/skipped_steps"]),
    )


def model_signature(cfg: Config, vocab_size: int | None) -> dict[str, Any]:
    """The GPT-MoE's signature: the shape fields and the data's vocabulary (None: not known yet, left out)."""
    sig = {f"{sec}.{k}": getattr(getattr(cfg, sec), k) for sec, keys in SHAPE_FIELDS.items() for k in keys}
    if vocab_size is not None:
        sig["data.vocab_size(actual)"] = vocab_size
    return sig


# ------------------------------------------------------------------------------------------ locating


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.train.ckpt_dir) if cfg.train.ckpt_dir else Path(cfg.train.out_dir) / "checkpoints"


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete(root: Path) -> list[Path]:
    """Committed checkpoints (renamed, with a manifest), newest first."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.glob("step_*")
        if p.is_dir() and not p.name.endswith(".tmp") and (p / integrity.MANIFEST).is_file() and _step_of(p) >= 0
    ]
    return sorted(found, key=_step_of, reverse=True)


def latest(root: Path) -> Path | None:
    """The checkpoint `latest` names, if it is complete."""
    ptr = root / "latest"
    if not ptr.is_file():
        return None
    path = root / ptr.read_text().strip()
    return path if (path / integrity.MANIFEST).is_file() and (path / "meta.json").is_file() else None


def candidates(root: Path) -> list[Path]:
    """What `--resume auto` tries, in order: `latest`, then the older complete checkpoints. Without a
    usable `latest` (a crash while a checkpoint of the same step was being replaced), every complete one."""
    done = complete(root)
    head = latest(root)
    if head is None:
        return done
    return [head] + [p for p in done if _step_of(p) < _step_of(head)]


def restart_count() -> int:
    """How many times torchrun's agent (or `lshmoe train --max-restarts`) has restarted this job."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def resume_spec(cfg: Config) -> str:
    """`train.resume`, except that a restarted job always continues from its checkpoints when it has some."""
    spec = cfg.train.resume
    if spec != "auto" and restart_count() > 0 and candidates(checkpoint_root(cfg)):
        return "auto"
    return spec


def _check(path: Path, comm: Comm | None) -> str | None:
    """Verify a checkpoint against its manifest (shared over the ranks of `comm`); None when intact."""
    files = integrity.read_manifest(path)
    if isinstance(files, str):
        return f"checkpoint {path} is incomplete: {files}"
    if comm is None or comm.world_size == 1:
        code = integrity.first_problem(path, files)
    else:
        mine = integrity.first_problem(path, files, comm.rank, comm.world_size)
        t = torch.tensor([mine], dtype=torch.int64, device=comm.device)
        comm.all_reduce(t, comm.group("world"), "ckpt.verify", op="min", phase="setup")
        code = int(t)
    return None if code == integrity.NO_PROBLEM else integrity.explain(path, files, code)


def resolve_resume(cfg: Config, comm: Comm | None = None, log: Callable[[str], None] = lambda m: None) -> Path | None:
    """The verified checkpoint this run starts from, or None for a fresh start (see the module docstring).

    With `comm`, every rank of the job calls this together and they reach the same answer."""
    spec = resume_spec(cfg)
    if spec == "none":
        return None
    if spec != "auto":
        path = find_checkpoint(spec, "--resume")
        problem = _check(path, comm)
        if problem:
            raise CheckpointError(problem)
        return path
    root = checkpoint_root(cfg)
    tried = candidates(root)
    for i, path in enumerate(tried):
        problem = _check(path, comm)
        if problem is None:
            return path
        if i + 1 < len(tried):
            log(f"{problem}; falling back to the previous complete checkpoint {tried[i + 1].name}")
        else:
            raise CheckpointError(
                f"{problem}; no older complete checkpoint in {root} to fall back to (use --resume none to start afresh)"
            )
    return None


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


def preflight(
    cfg: Config, signature: dict[str, Any] | None = None, data: Callable[[], Any] | None = None
) -> Path | None:
    """Check `--resume` before any process starts: the checkpoint it names (or the one `auto` falls back
    to) is verified, matches the model (`signature`; default: the GPT-MoE's, its vocabulary checked later)
    and, found by `auto`, the token data (`data()` builds it, only then), and has steps left to train."""
    path = resolve_resume(cfg)
    if path is not None:
        meta = read_meta(path)
        want = model_signature(cfg, None) if signature is None else signature
        auto = resume_spec(cfg) == "auto"
        check_compatible(path, meta, want, cfg, auto=auto)
        if auto and data is not None and meta.get("data"):
            check_compatible(path, meta, want, cfg, data=data_identity(data()), auto=auto)
        check_not_finished(path, int(meta.get("step", 0)), cfg)
    return path


def verify_files(path: Path) -> None:
    """Every file of the checkpoint matches its manifest (size and SHA-256); one-line error otherwise."""
    problem = integrity.verify(path)
    if problem:
        raise CheckpointError(problem)


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupted: meta.json unreadable ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, this version reads {FORMAT}")
    return meta


def check_compatible(
    path: Path,
    meta: dict[str, Any],
    want: dict[str, Any],
    cfg: Config,
    nodes: int | None = None,
    *,
    data: dict[str, str] | None = None,
    auto: bool = False,
) -> None:
    """One-line error unless the checkpoint's model signature matches `want` (keys `want` lacks are
    not known yet and not compared; `nodes` None: not known yet) and, when `auto` (the checkpoint was
    found by `--resume auto`, not named), its token data is `data` (None: not known yet)."""
    found = f" (found by --resume auto in {path.parent})" if auto else ""
    for k, v in meta["model"].items():
        if k in want and want[k] != v:
            fix = (
                "it is another run's: start afresh with --resume none or write to another --out-dir"
                if auto
                else "use the checkpoint's model config"
            )
            raise CheckpointError(f"checkpoint {path}{found} was saved with {k}={v}, this run has {k}={want[k]}; {fix}")
    saved = meta.get("data")
    if auto and data is not None and saved is not None and saved.get("key") != data["key"]:
        raise CheckpointError(
            f"checkpoint {path}{found} was trained on other data ({_data_text(saved)}; this run reads "
            f"{_data_text(data)}); it is another run's: start afresh with --resume none or write to another "
            "--out-dir (--resume DIR continues a checkpoint on new data)"
        )
    if nodes is not None and cfg.locmoe.node_bias and meta.get("nodes") != nodes:
        raise CheckpointError(
            f"checkpoint {path} holds per-node router biases (locmoe.node_bias) for "
            f"{meta.get('nodes')} nodes; this run has {nodes} nodes"
        )


# ------------------------------------------------------------------------------------------ save/load

OTHER_ERROR = 10_000  # a failure code that is not an errno


FULL_BYTES = 64 * 1024  # less free space than this where a save failed: the disk is full


def _disk_full(path: Path) -> bool:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free < FULL_BYTES


def _code(e: BaseException, tmp: Path) -> int:
    """errno of the root cause of a (possibly DCP-wrapped) failure, else OTHER_ERROR. torch's zip
    writer reports a write that ran out of space as a RuntimeError without errno ("unexpected pos"),
    so a failure on a full file system counts as ENOSPC whatever its type."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    if isinstance(e, OSError) and e.errno:
        return e.errno
    return errno.ENOSPC if _disk_full(tmp) else OTHER_ERROR


def _agree(comm: Comm, failure: BaseException | None, step: int, root: Path, tmp: Path) -> None:
    """Every rank learns whether any rank failed this phase of the save; if one did, all raise the same."""
    codes = torch.zeros(comm.world_size, dtype=torch.int64, device=comm.device)
    if failure is not None:
        codes[comm.rank] = _code(failure, tmp)
    comm.all_reduce(codes, comm.group("world"), "ckpt.status", phase="setup")
    bad = [r for r in range(comm.world_size) if int(codes[r])]
    if not bad:
        return
    r = comm.rank if failure is not None else bad[0]
    code = int(codes[r])
    cause = _first_cause(failure) if failure is not None else (os.strerror(code) if code < OTHER_ERROR else "error")
    if code == errno.ENOSPC:
        cause = f"no space left on the device of {root}"
    if comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back
    prev = latest(root)
    kept = f"the previous checkpoint {prev.name} and 'latest' are intact" if prev else "no earlier checkpoint"
    raise CheckpointError(f"saving checkpoint step_{step:08d} failed on rank {r}: {cause}; {kept}") from None


def save(
    root: Path,
    step: int,
    entries: dict[str, torch.Tensor],
    meta: dict[str, Any],
    comm: Comm,
    keep_last: int,
    inside: Callable[[], None] | None = None,
    side_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint atomically (see the module docstring); return its directory. `inside()` (a fault
    hook) runs once this rank's shards are written, before the ranks agree to commit; `side_files(dir)`
    runs on rank 0 before the manifest, so the files it writes are verified on resume like the shards."""
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    failure: BaseException | None = None
    if comm.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            failure = e
    _agree(comm, failure, step, root, tmp)
    try:
        dcp.save(entries, checkpoint_id=str(tmp))
        # each rank hashes its own shard files, in parallel; rank 0 merges them into the manifest
        sums = {p.name: integrity.describe(p) for p in sorted(tmp.glob(f"__{comm.rank}_*.distcp"))}
        integrity.write_json_durably(tmp / f"sums.rank{comm.rank}.part", sums)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a full disk, a vanished directory
        failure = e
    if inside is not None:
        inside()
    _agree(comm, failure, step, root, tmp)
    if comm.rank == 0:
        try:
            _commit(root, tmp, final, step, meta, comm.world_size, keep_last, side_files)
        except OSError as e:
            failure = e
    _agree(comm, failure, step, root, tmp)
    return final


def _commit(
    root: Path,
    tmp: Path,
    final: Path,
    step: int,
    meta: dict,
    world: int,
    keep_last: int,
    side_files: Callable[[Path], None] | None,
) -> None:
    """Rank 0: meta.json, the task's side files, the manifest (last), the rename, `latest`, pruning."""
    (tmp / "meta.json").write_text(json.dumps({**meta, "format": FORMAT, "step": step, "time": time.time()}, indent=1))
    if side_files is not None:
        side_files(tmp)
    files: dict[str, dict] = {}
    for r in range(world):
        part = tmp / f"sums.rank{r}.part"
        files.update(json.loads(part.read_text()))
        part.unlink()
    integrity.write_manifest(tmp, files, step)
    integrity.fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    integrity.fsync_dir(root)
    ptr = root / "latest.tmp"
    ptr.write_text(final.name)
    os.replace(ptr, root / "latest")
    integrity.fsync_dir(root)
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


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
