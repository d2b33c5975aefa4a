"""Load a Hugging Face safetensors checkpoint into an expert-parallel model, own experts only.

Every rank reads the dense tensors (attention, norms, embeddings, routers, shared experts) and, of
the routed experts, only the E / EP it holds: safetensors' lazy `safe_open` reads a tensor's bytes
when asked, so the other ranks' experts are never read. Two on-disk layouts of the experts load:

    per-expert (as published, and as transformers' save_pretrained writes):
        {block}.experts.{e}.{gate,up,down}.weight         [F, D], [F, D], [D, F]
    fused 3-D (transformers' in-memory layout, e.g. a raw state_dict dump):
        {block}.experts.gate_up_proj [E, 2F, D] (gate rows first), {block}.experts.down_proj [E, D, F]
        (only rows [first, first + G) are read)

lshmoe keeps experts as w1_GDF / w3_GDF (gate / up, transposed) and w2_GFD (down, transposed).
A missing or mis-shaped tensor is a one-line error naming it.

Under FSDP (a model sharded before its weights are loaded: `hf.model.materialize_model`) a dense
parameter is a DTensor sharded on its first dimension, and a rank reads only its own rows of it; an
expert bank is sharded over the ranks holding the same experts, and each of them reads its E / EP
experts and keeps its slice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lshmoe.hf.family import Family, HFError
from lshmoe.hf.model import HFMoEBlock, moe_blocks


def _local_box(p: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(local shape, global offset) of a DTensor's shard, None for a plain tensor."""
    if not hasattr(p, "device_mesh"):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)


def assign(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the whole tensor `full` into `p`, or its shard's part into a DTensor's local shard."""
    box = _local_box(p)
    if box is None:
        p.copy_(full)
        return
    shape, offset = box
    p.to_local().copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))])


def fill(p: torch.Tensor, store: SafetensorsDir, key: str) -> None:
    """`p` from the checkpoint tensor `key`; a DTensor sharded on dim 0 reads only its own rows."""
    box = _local_box(p)
    shape = tuple(p.shape)
    if box is None:
        p.copy_(store.read(key, shape))
    elif all(o == 0 for o in box[1][1:]) and tuple(box[0][1:]) == shape[1:]:
        rows = (box[1][0], box[1][0] + box[0][0])
        p.to_local().copy_(store.read(key, shape, rows=rows))
    else:
        assign(p, store.read(key, shape))


class SafetensorsDir:
    """Tensor name -> file of a checkpoint directory, and lazy reads of whole tensors or row ranges."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path, self._open, self._handles = path, safe_open, {}
        self.reads: list[tuple[str, tuple[int, int] | None]] = []  # what was read (the tests check it)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            self.where = dict(json.loads(index.read_text())["weight_map"])
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise HFError(f"{path}: no *.safetensors files (and no model.safetensors.index.json)")
            self.where = {}
            for f in files:
                with safe_open(str(f), "pt") as h:
                    self.where.update({k: f.name for k in h.keys()})  # noqa: SIM118 - a safetensors handle

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def _handle(self, key: str):
        name = self.where[key]
        if name not in self._handles:
            f = self.path / name
            if not f.is_file():
                raise HFError(f"{self.path}: shard {name} (holding {key}) is missing")
            self._handles[name] = self._open(str(f), "pt")
        return self._handles[name]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def read(self, key: str, shape: tuple[int, ...], rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `key` (rows [lo, hi) of its first dimension when `rows`), checked against `shape`
        (the full tensor's shape)."""
        if key not in self.where:
            raise HFError(f"{self.path}: tensor {key} is missing from the checkpoint")
        got = self.shape(key)
        if got != tuple(shape):
            raise HFError(f"{self.path}: tensor {key} has shape {list(got)}, expected {list(shape)}")
        self.reads.append((key, rows))
        if rows is None:
            return self._handle(key).get_tensor(key)
        return self._handle(key).get_slice(key)[rows[0] : rows[1]]


def _first(store: SafetensorsDir, names: list[str]) -> str:
    return next((n for n in names if n in store), names[0])


def block_prefixes(family: Family, layer: int) -> list[str]:
    """Where a layer's sparse block may be on disk: its module name, then the family's own name."""
    return list(dict.fromkeys([f"model.layers.{layer}.mlp", f"model.layers.{layer}.{family.disk_block}"]))


def _load_experts(store: SafetensorsDir, prefixes: list[str], block: HFMoEBlock, family: Family) -> None:
    ex = block.moe.experts
    G, D, F_ = ex.num_local, ex.d_model, ex.d_hidden
    lo, E = ex.first_expert, block.moe.num_experts
    gate, up, down = family.expert_names
    fused = next((p for p in prefixes if f"{p}.experts.gate_up_proj" in store), None)
    with torch.no_grad():
        if fused is not None:
            gu = store.read(f"{fused}.experts.gate_up_proj", (E, 2 * F_, D), rows=(lo, lo + G))
            dn = store.read(f"{fused}.experts.down_proj", (E, D, F_), rows=(lo, lo + G))
            assign(ex.w1_GDF, gu[:, :F_].transpose(1, 2))
            assign(ex.w3_GDF, gu[:, F_:].transpose(1, 2))
            assign(ex.w2_GFD, dn.transpose(1, 2))
            return
        banks = {
            n: torch.empty(tuple(getattr(ex, n).shape), dtype=getattr(ex, n).dtype)
            for n in ("w1_GDF", "w3_GDF", "w2_GFD")
        }
        for g in range(G):
            e = lo + g
            p = _first(store, [f"{q}.experts.{e}.{gate}.weight" for q in prefixes]).rsplit(f".experts.{e}.", 1)[0]
            banks["w1_GDF"][g].copy_(store.read(f"{p}.experts.{e}.{gate}.weight", (F_, D)).t())
            banks["w3_GDF"][g].copy_(store.read(f"{p}.experts.{e}.{up}.weight", (F_, D)).t())
            banks["w2_GFD"][g].copy_(store.read(f"{p}.experts.{e}.{down}.weight", (D, F_)).t())
        for n, full in banks.items():
            assign(getattr(ex, n), full)


def block_tensor_names(family: Family, prefix: str, block: HFMoEBlock) -> dict[str, str]:
    """lshmoe parameter name (relative to the block) -> on-disk name, for the block's dense tensors."""
    out = {"moe.router.weight": f"{prefix}.gate.weight"}
    if block.moe.router.e_score_correction_bias is not None:
        out["moe.router.e_score_correction_bias"] = f"{prefix}.gate.e_score_correction_bias"
    if block.moe.shared is not None:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"moe.shared.{proj}.weight"] = f"{prefix}.{family.shared_name}.{proj}.weight"
        if block.moe.shared.gate is not None:
            out["moe.shared.gate.weight"] = f"{prefix}.{family.shared_gate_name}.weight"
    return out


def load_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Fill `model` (from hf.model.build_model) from the checkpoint at `path`; returns read statistics."""
    path = Path(path)
    store = SafetensorsDir(path)
    family: Family = model.hf_family
    params = dict(model.named_parameters())
    done: set[str] = set()
    read_experts = 0
    with torch.no_grad():
        for i, block in moe_blocks(model):
            prefixes = block_prefixes(family, i)
            here = f"model.layers.{i}.mlp"
            for rel, disk in block_tensor_names(family, prefixes[0], block).items():
                key = _first(store, [disk] + [disk.replace(prefixes[0], q, 1) for q in prefixes[1:]])
                p = params[f"{here}.{rel}"]
                if rel.endswith("e_score_correction_bias") and key not in store:
                    p.zero_()  # a bias this run added (moe.correction_bias) starts at zero
                else:
                    fill(p, store, key)
                done.add(f"{here}.{rel}")
            _load_experts(store, prefixes, block, family)
            read_experts += block.moe.experts.num_local
            done.update(f"{here}.moe.experts.{n}" for n, _ in block.moe.experts.named_parameters())
        tied = getattr(model.config, "tie_word_embeddings", False)
        for name, p in params.items():
            if name in done:
                continue
            if tied and name == "lm_head.weight":
                continue
            fill(p, store, name)
        for name, b in model.named_buffers():
            if name in store:
                b.copy_(store.read(name, tuple(b.shape)))
    return {"experts_read": read_experts, "reads": store.reads}
