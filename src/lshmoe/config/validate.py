"""The validation of the whole config tree.

`validate(cfg, world_size, nodes)` checks each leaf's declared range and choices, then the
cross-field rules; the first violation raises a one-line ConfigError naming the field, its value
and what is allowed. Layers and engines check nothing themselves. A rule that needs a helper calls
a method of its section (`LSHConfig.projections_per_hash`, `FaultConfig.faults`, ...), so the rules
need nothing above the config; the compressor and dispatcher names are read from their registries
here, on first use (fields.py's `Registered`).

The rules of one section alone live in section_rules.py (below the schema, which runs them when a
section is constructed); `validate()` runs them again on the assembled tree, with the same messages.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from lshmoe.config.fields import check_leaf
from lshmoe.config.schema import (
    Config,
    DataConfig,
    MoEConfig,
    TrainConfig,
    leaf_fields,
)
from lshmoe.config.section_rules import section_rules
from lshmoe.errors import ConfigError

# ------------------------------------------------------------------------------------ the whole tree


def _validate_lsh(cfg: Config) -> None:
    h = cfg.lsh
    b = h.buckets_per_hash
    section_rules(h)
    if h.family == "cross_polytope" and b // 2 > cfg.model.d_model:
        raise ConfigError(f"lsh.buckets_per_hash={b} is out of range; must be <= 2 * model.d_model")
    bits = h.num_hashes * math.log2(b) + math.log2(max(2, cfg.moe.num_experts))
    if bits > 62:
        raise ConfigError(
            f"lsh.num_hashes={h.num_hashes} is out of range for buckets_per_hash={b} and "
            f"{cfg.moe.num_experts} experts; bucket ids need L*log2(b)+log2(E) <= 62 bits"
        )
    if h.projection == "pca" and h.pca_rank > cfg.model.d_model:
        raise ConfigError(f"lsh.pca_rank={h.pca_rank} is out of range; must be <= model.d_model={cfg.model.d_model}")


def _validate_scale(cfg: Config) -> None:
    """FSDP, mixed precision, activation checkpointing and micro-batches (docs/design.md, the mesh)."""
    section_rules(cfg.train)
    if cfg.dist.fsdp and cfg.lina.grad_sync != "sync":
        raise ConfigError(
            f"lina.grad_sync={cfg.lina.grad_sync} with dist.fsdp: FSDP2 reduce-scatters the gradients itself; "
            "Lina's scheduler would reduce them a second time (use lina.grad_sync=sync with --fsdp)"
        )


def _validate_paths(t: TrainConfig) -> None:
    """The run's directories: an existing path must be a directory (written into, never over a file)."""
    for key in ("out_dir", "ckpt_dir"):
        value = getattr(t, key)
        if value and Path(value).expanduser().exists() and not Path(value).expanduser().is_dir():
            raise ConfigError(
                f"train.{key}={value} is a file, not a directory; name a directory (a new one is created)"
            )


def validate(cfg: Config, world_size: int | None = None, nodes: int | None = None) -> Config:
    """Check every field and cross-field rule; raise a one-line ConfigError on the first violation.

    `world_size` (when known) enables the checks that depend on it: the expert-parallel size must
    divide the world size and the number of experts; `nodes` (the topology's node count, when
    known) the group-limited routing check.
    """
    for dotted, f, tp in leaf_fields():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        check_leaf(dotted, value, dict(f.metadata), tp)
    m, e, sc, loc = cfg.model, cfg.moe, cfg.scmoe, cfg.locmoe
    section_rules(m)
    if m.arch == "scmoe" and m.moe_every == 1 and sc.shortcut != "pos1":
        raise ConfigError(
            f"scmoe.shortcut={sc.shortcut} with model.moe_every=1: MoE in every block takes the shortcut at pos1"
        )
    if m.arch == "dgmoe" and (e.top_k != 1 or m.moe_every != 2):
        raise ConfigError(
            f"model.arch=dgmoe needs moe.top_k=1 and model.moe_every=2 (got top_k={e.top_k}, moe_every={m.moe_every})"
        )
    if e.router == "locmoe" and m.d_model % e.num_experts:
        raise ConfigError(
            f"moe.router=locmoe needs model.d_model={m.d_model} divisible by moe.num_experts="
            f"{e.num_experts} (each expert's gate is the mean of one slice of the width)"
        )
    section_rules(e)
    _validate_lsh(cfg)
    cfg.auto.candidate_names()
    if e.a2a != "flat" and cfg.lina.a2a_chunks > 1:
        raise ConfigError(
            f"lina.a2a_chunks={cfg.lina.a2a_chunks} needs moe.a2a=flat: micro-op pipelining cuts the flat "
            f"all-to-all (moe.a2a={e.a2a} has no pipelined form)"
        )
    cfg.fault.faults()
    _validate_scale(cfg)
    _validate_paths(cfg.train)
    if cfg.train.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("train.tensorboard=true needs the tensorboard package (pip install tensorboard)")
    validate_data(cfg.data)
    if world_size is not None:
        validate_ep(e, world_size)
        ep = e.ep_size or world_size
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


def validate_ep(e: MoEConfig, world_size: int) -> None:
    """The expert-parallel group for `world_size` ranks, whatever the number of experts (an --hf run learns
    it from the checkpoint): `moe.ep_size` divides the world; hierarchical dispatch needs EP = world."""
    ep = e.ep_size or world_size
    if world_size % ep:
        raise ConfigError(f"moe.ep_size={ep} must divide the world size {world_size}")
    if e.a2a == "hierarchical" and ep != world_size:
        raise ConfigError(
            f"moe.a2a=hierarchical needs the expert-parallel group to be the world "
            f"(moe.ep_size={e.ep_size}, world size {world_size})"
        )


def validate_data(dc: DataConfig) -> DataConfig:
    """The data section's rules alone (`lshmoe data prepare` has no other section)."""
    for f in dataclasses.fields(DataConfig):
        check_leaf(f"data.{f.name}", getattr(dc, f.name), dict(f.metadata), f.type)
    if dc.path is not None and not Path(dc.path).expanduser().exists():
        raise ConfigError(f"--data {dc.path}: no such file or directory")
    section_rules(dc)
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
