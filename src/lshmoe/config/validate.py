"""Every validation rule of the config tree, in one place.

`validate(cfg, world_size, nodes)` checks each leaf's declared range and choices, then the
cross-field rules; the first violation raises a one-line ConfigError naming the field, its value
and what is allowed. Layers and engines check nothing themselves. A rule that needs a helper calls
a method of its section (`LSHConfig.projections_per_hash`, `FaultConfig.faults`, ...), so the rules
need nothing above the config; the compressor and dispatcher names are read from their registries
here, on first use (fields.py's `Registered`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from lshmoe.config.io import leaf_fields
from lshmoe.config.schema import Config, DataConfig, MoEConfig
from lshmoe.errors import ConfigError


def _range_text(meta: dict[str, Any], tp: Any) -> str:
    parts = []
    for op, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if meta.get(op) is not None:
            bound = meta[op]
            parts.append(f"{sym} {int(bound) if float(bound).is_integer() else bound}")
    return " and ".join(parts)


def _check_leaf(path: str, value: Any, meta: dict[str, Any], tp: Any) -> None:
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{path}={value!r} is not valid; choose one of: {', '.join(meta['choices'])}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    ok = all(
        bound is None or cmp(value, bound)
        for bound, cmp in (
            (meta.get("ge"), lambda v, b: v >= b),
            (meta.get("gt"), lambda v, b: v > b),
            (meta.get("le"), lambda v, b: v <= b),
            (meta.get("lt"), lambda v, b: v < b),
        )
    )
    if not ok:
        raise ConfigError(f"{path}={value} is out of range; must be {_range_text(meta, tp)}")


def _validate_lsh(cfg: Config) -> None:
    h = cfg.lsh
    b = h.buckets_per_hash
    if h.family == "cross_polytope" and b % 2:
        raise ConfigError(f"lsh.buckets_per_hash={b} must be even for the cross-polytope family (2, 4, 6, ...)")
    if h.family == "cross_polytope" and b // 2 > cfg.model.d_model:
        raise ConfigError(f"lsh.buckets_per_hash={b} is out of range; must be <= 2 * model.d_model")
    if h.family == "hyperplane" and b & (b - 1):
        raise ConfigError(f"lsh.buckets_per_hash={b} must be a power of two for the hyperplane family")
    bits = h.num_hashes * math.log2(b) + math.log2(max(2, cfg.moe.num_experts))
    if bits > 62:
        raise ConfigError(
            f"lsh.num_hashes={h.num_hashes} is out of range for buckets_per_hash={b} and "
            f"{cfg.moe.num_experts} experts; bucket ids need L*log2(b)+log2(E) <= 62 bits"
        )
    if h.projection == "pca" and 0 < h.pca_rank < h.projections_per_hash():
        raise ConfigError(
            f"lsh.pca_rank={h.pca_rank} is out of range; must be 0 or >= {h.projections_per_hash()} "
            f"(the projections of one hash) and <= model.d_model"
        )
    if h.projection == "pca" and h.pca_rank > cfg.model.d_model:
        raise ConfigError(f"lsh.pca_rank={h.pca_rank} is out of range; must be <= model.d_model={cfg.model.d_model}")
    if h.kernels == "triton" and h.torch_only():
        raise ConfigError(
            f"lsh.kernels=triton does not implement {', '.join(h.torch_only())}; use lsh.kernels=auto or torch"
        )
    try:
        h.layer_ids()
    except ValueError:
        raise ConfigError(f"lsh.layers={h.layers!r} must be 'all' or comma-separated block indices") from None


def _validate_auto(cfg: Config) -> None:
    cfg.auto.candidate_names()


def _validate_scale(cfg: Config) -> None:
    """FSDP, mixed precision, activation checkpointing and micro-batches (docs/design.md, the mesh)."""
    t = cfg.train
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.grad_accum={t.grad_accum} must divide train.batch_size={t.batch_size} (the step's sequences "
            "are split into equal micro-batches)"
        )
    if t.compute_dtype is not None and t.dtype != "float32":
        raise ConfigError(
            f"train.compute_dtype={t.compute_dtype} keeps float32 master weights: leave train.dtype=float32 "
            f"(got {t.dtype})"
        )
    if cfg.dist.fsdp and cfg.lina.grad_sync != "sync":
        raise ConfigError(
            f"lina.grad_sync={cfg.lina.grad_sync} with dist.fsdp: FSDP2 reduce-scatters the gradients itself; "
            "Lina's scheduler would reduce them a second time (use lina.grad_sync=sync with --fsdp)"
        )


def _validate_routing(e: MoEConfig) -> None:
    if e.n_group > 1:
        if e.num_experts % e.n_group:
            raise ConfigError(f"moe.n_group={e.n_group} must divide moe.num_experts={e.num_experts}")
        if not 1 <= e.topk_group <= e.n_group:
            raise ConfigError(f"moe.topk_group={e.topk_group} is out of range; must be in [1, moe.n_group={e.n_group}]")
        if e.topk_group * (e.num_experts // e.n_group) < e.top_k:
            raise ConfigError(
                f"moe.topk_group={e.topk_group} groups hold {e.topk_group * (e.num_experts // e.n_group)} experts, "
                f"fewer than moe.top_k={e.top_k}"
            )
    if e.bias_update_rate > 0 and not e.correction_bias:
        raise ConfigError(f"moe.bias_update_rate={e.bias_update_rate} needs moe.correction_bias=true")


def validate(cfg: Config, world_size: int | None = None, nodes: int | None = None) -> Config:
    """Check every field and cross-field rule; raise a one-line ConfigError on the first violation.

    `world_size` (when known) enables the checks that depend on it: the expert-parallel size must
    divide the world size and the number of experts; `nodes` (the topology's node count, when
    known) the group-limited routing check.
    """
    for dotted, f, tp in leaf_fields():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        _check_leaf(dotted, value, dict(f.metadata), tp)
    m, e, sc, loc = cfg.model, cfg.moe, cfg.scmoe, cfg.locmoe
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} must divide model.d_model={m.d_model}")
    if m.arch in ("scmoe", "dgmoe"):
        if m.moe_every not in (1, 2) or m.n_layers % m.moe_every:
            raise ConfigError(
                f"model.moe_every={m.moe_every} with model.arch={m.arch}: must be 1 (every block) or 2 "
                f"(Block-MLP + Block-MoE pairs) and divide model.n_layers={m.n_layers}"
            )
        if m.moe_every == 1 and sc.shortcut != "pos1" and m.arch == "scmoe":
            raise ConfigError(
                f"scmoe.shortcut={sc.shortcut} with model.moe_every=1: MoE in every block takes the shortcut at pos1"
            )
        if m.arch == "dgmoe" and (e.top_k != 1 or m.moe_every != 2):
            raise ConfigError(
                f"model.arch=dgmoe needs moe.top_k=1 and model.moe_every=2 (got top_k={e.top_k}, "
                f"moe_every={m.moe_every})"
            )
    if e.router == "locmoe" and m.d_model % e.num_experts:
        raise ConfigError(
            f"moe.router=locmoe needs model.d_model={m.d_model} divisible by moe.num_experts="
            f"{e.num_experts} (each expert's gate is the mean of one slice of the width)"
        )
    _validate_routing(e)
    if e.expert_bias and e.activation not in ("gelu", "swiglu"):
        raise ConfigError(f"moe.expert_bias=true needs moe.activation gelu or swiglu (got {e.activation})")
    if e.top_k > e.num_experts:
        raise ConfigError(f"moe.top_k={e.top_k} is out of range; must be in [1, moe.num_experts={e.num_experts}]")
    if m.moe_every > m.n_layers:
        raise ConfigError(
            f"model.moe_every={m.moe_every} is out of range; must be in [1, model.n_layers={m.n_layers}] "
            "so that the model has at least one MoE block"
        )
    _validate_lsh(cfg)
    _validate_auto(cfg)
    if e.a2a != "flat" and cfg.lina.a2a_chunks > 1:
        raise ConfigError(
            f"lina.a2a_chunks={cfg.lina.a2a_chunks} needs moe.a2a=flat: micro-op pipelining cuts the flat "
            f"all-to-all (moe.a2a={e.a2a} has no pipelined form)"
        )
    cfg.fault.faults()
    _validate_scale(cfg)
    if cfg.train.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("train.tensorboard=true needs the tensorboard package (pip install tensorboard)")
    validate_data(cfg.data)
    if world_size is not None:
        ep = e.ep_size or world_size
        if world_size % ep:
            raise ConfigError(f"moe.ep_size={ep} must divide the world size {world_size}")
        if e.a2a == "hierarchical" and ep != world_size:
            raise ConfigError(
                f"moe.a2a=hierarchical needs the expert-parallel group to be the world "
                f"(moe.ep_size={e.ep_size}, world size {world_size})"
            )
        if e.num_experts % ep:
            raise ConfigError(
                f"moe.num_experts={e.num_experts} is not divisible by the expert-parallel size {ep}; "
                f"use a multiple of {ep} experts or a different ep_size/--nproc"
            )
    if nodes is not None and loc.node_limit and loc.node_limit < nodes:
        per_node = e.num_experts // nodes
        if loc.node_limit * per_node < e.top_k:
            raise ConfigError(
                f"locmoe.node_limit={loc.node_limit} nodes hold {loc.node_limit * per_node} experts, fewer "
                f"than moe.top_k={e.top_k}; raise node_limit to >= {-(-e.top_k // per_node)}"
            )
    return cfg


def validate_data(dc: DataConfig) -> DataConfig:
    """The data section's rules alone (`lshmoe data prepare` has no other section)."""
    for f in dataclasses.fields(DataConfig):
        _check_leaf(f"data.{f.name}", getattr(dc, f.name), dict(f.metadata), f.type)
    if dc.path is not None and not Path(dc.path).expanduser().exists():
        raise ConfigError(f"--data {dc.path}: no such file or directory")
    if not dc.field.strip():
        raise ConfigError("data.field='' is not valid; name the text column (default: text)")
    return dc


def validate_inference(cfg: Config) -> Config:
    """The rules of serving a trained model with Lina's placement (`lshmoe infer`)."""
    if cfg.model.arch != "gpt":
        raise ConfigError(f"Lina inference supports model.arch=gpt, not {cfg.model.arch!r}")
    if cfg.locmoe.node_bias:
        raise ConfigError(
            "Lina inference cannot serve a model trained with locmoe.node_bias: its routing depends "
            "on the node a token is on, which replica placement changes"
        )
    return cfg
