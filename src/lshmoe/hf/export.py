"""Export an expert-parallel model as a checkpoint transformers loads unchanged, from any EP size.

Each MoE block's experts are gathered over the EP group (every rank sends its G experts; rank 0
receives all E) and written in the published per-expert layout, `{block}.experts.{e}.{gate,up,down}
.weight` in nn.Linear's [out, in] orientation, next to the dense tensors under transformers' own
names: sharded safetensors files of at most `max_shard_mb`, `model.safetensors.index.json`, and
config.json. Tokenizer and generation files of the source directory are copied when given.
Only rank 0 writes; every rank must call it (the gather is collective).

The output directory must be new or empty: a directory that already holds a checkpoint, sharded
differently, would keep its old shards and index beside the new files, and transformers and lshmoe
would then load different weights from it. `overwrite=True` replaces a checkpoint there (its
`*.safetensors` and `model.safetensors.index.json` are removed first).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from lshmoe.distributed.comm import Comm
from lshmoe.hf.family import Family, HFError
from lshmoe.hf.load import block_prefixes, block_tensor_names
from lshmoe.hf.model import moe_blocks

INDEX = "model.safetensors.index.json"
# `--dtype` of `lshmoe export` (auto: the source checkpoint's, as its config.json records it)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


def hf_state_dict(model: nn.Module, comm: Comm) -> dict[str, torch.Tensor]:
    """The whole model under transformers' on-disk names (complete on rank 0; collective)."""
    family: Family = model.hf_family
    gate, up, down = family.expert_names
    out: dict[str, torch.Tensor] = {}
    skip: set[str] = set()
    ep = comm.group("ep")
    for i, block in moe_blocks(model):
        here, disk = f"model.layers.{i}.mlp", block_prefixes(family, i)[-1]
        for rel, name in block_tensor_names(family, disk, block).items():
            out[name] = model.get_parameter(f"{here}.{rel}").detach()
            skip.add(f"{here}.{rel}")
        ex = block.moe.experts
        full = {
            n: comm.all_gather(getattr(ex, n).detach().contiguous(), ep, f"export.{i}.{n}")
            for n in ("w1_GDF", "w3_GDF", "w2_GFD")
        }
        for n in ("w1_GDF", "w3_GDF", "w2_GFD"):
            full[n] = full[n].reshape(-1, *full[n].shape[2:])
            skip.add(f"{here}.moe.experts.{n}")
        for e in range(block.moe.num_experts):
            out[f"{disk}.experts.{e}.{gate}.weight"] = full["w1_GDF"][e].t()
            out[f"{disk}.experts.{e}.{up}.weight"] = full["w3_GDF"][e].t()
            out[f"{disk}.experts.{e}.{down}.weight"] = full["w2_GFD"][e].t()
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, p in model.named_parameters():
        if name in skip or (tied and name == "lm_head.weight"):
            continue
        out[name] = p.detach()
    persistent = set(model.state_dict().keys())
    for name, b in model.named_buffers():
        if name in persistent and name not in out and ".moe." not in name:
            out[name] = b.detach()
    return out


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = tensors[k]
        size += n
    return shards + [cur] if cur else shards


def check_out_dir(out: Path, overwrite: bool, name: str = "export") -> None:
    """`out` can take a checkpoint: a new or empty directory, or (`overwrite`) one whose checkpoint may go."""
    if out.exists() and not out.is_dir():
        raise HFError(f"{name} {out}: is a file, not a directory; name a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise HFError(
            f"{name} {out}: the directory is not empty; write to a new directory, or add --overwrite to replace "
            f"the checkpoint there (its *.safetensors and {INDEX} are removed first)"
        )


def clear_weights(out: Path) -> None:
    """Remove a checkpoint's weight files (every shard and the index) from `out`."""
    for f in [*out.glob("*.safetensors"), out / INDEX]:
        if f.is_file():
            f.unlink()


def export(
    model: nn.Module,
    comm: Comm,
    out_dir: str | Path,
    *,
    source: str | Path | None = None,
    max_shard_mb: float = 2000,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path | None:
    """Write the checkpoint (rank 0); returns its directory on rank 0, None elsewhere. `dtype`: cast
    the floating-point tensors on writing (e.g. back to the source checkpoint's dtype), and say so in
    config.json; `overwrite`: see the module docstring."""
    from safetensors.torch import save_file

    tensors = hf_state_dict(model, comm)  # NOTE: collective, so before rank 0 may raise
    if comm.rank != 0:
        return None
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    clear_weights(out)
    cast = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in tensors.items()}
    shards = _shards({k: v.contiguous().cpu() for k, v in cast.items()}, int(max_shard_mb * 2**20))
    weight_map, total = {}, 0
    for j, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = copy.deepcopy(model.config)
    if dtype is not None:
        config.dtype = dtype
    if getattr(model, "hf_output_router_logits", None) is not None:
        config.output_router_logits = model.hf_output_router_logits
    config.save_pretrained(str(out))
    if source is not None:
        for f in SIDE_FILES:
            if (Path(source) / f).is_file():
                shutil.copy2(Path(source) / f, out / f)
    return out
