"""Every validation rule of the config tree, in one place.

`validate(cfg, world_size, nodes)` checks each leaf's declared range and choices, then the
cross-field rules; the first violation raises a one-line ConfigError naming the field, its value
and what is allowed. Layers and engines check nothing themselves. A rule that needs a helper calls
a method of its section (`LSHConfig.projections_per_hash`, `FaultConfig.faults`, ...), so the rules
need nothing above the config; the compressor and dispatcher names are read from their registries
here, on first use (fields.py's `Registered`).

The rules of one section alone (`SECTION_RULES`) also run when a section is constructed
(`check_section`, called by schema.py's `Section.__post_init__`), with the same messages: a Python
user's `MoEConfig(top_k=9, num_experts=8)` fails as `--top-k 9` does on the command line.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lshmoe.config.fields import _is_optional, check_leaf, leaf_types, type_name
from lshmoe.config.io import leaf_fields
from lshmoe.config.schema import (
    AutoConfig,
    Config,
    DataConfig,
    FaultConfig,
    LSHConfig,
    ModelConfig,
    MoEConfig,
    TrainConfig,
)
from lshmoe.errors import ConfigError

# ------------------------------------------------------------------------------------ one section alone


def _model_rules(m: ModelConfig) -> None:
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} must divide model.d_model={m.d_model}")
    if m.arch in ("scmoe", "dgmoe") and (m.moe_every not in (1, 2) or m.n_layers % m.moe_every):
        raise ConfigError(
            f"model.moe_every={m.moe_every} with model.arch={m.arch}: must be 1 (every block) or 2 "
            f"(Block-MLP + Block-MoE pairs) and divide model.n_layers={m.n_layers}"
        )
    if m.moe_every > m.n_layers:
        raise ConfigError(
            f"model.moe_every={m.moe_every} is out of range; must be in [1, model.n_layers={m.n_layers}] "
            "so that the model has at least one MoE block"
        )


def _moe_rules(e: MoEConfig) -> None:
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
    if e.expert_bias and e.activation not in ("gelu", "swiglu"):
        raise ConfigError(f"moe.expert_bias=true needs moe.activation gelu or swiglu (got {e.activation})")
    if e.top_k > e.num_experts:
        raise ConfigError(f"moe.top_k={e.top_k} is out of range; must be in [1, moe.num_experts={e.num_experts}]")


def _lsh_rules(h: LSHConfig) -> None:
    b = h.buckets_per_hash
    if h.family == "cross_polytope" and b % 2:
        raise ConfigError(f"lsh.buckets_per_hash={b} must be even for the cross-polytope family (2, 4, 6, ...)")
    if h.family == "hyperplane" and b & (b - 1):
        raise ConfigError(f"lsh.buckets_per_hash={b} must be a power of two for the hyperplane family")
    if h.projection == "pca" and 0 < h.pca_rank < h.projections_per_hash():
        raise ConfigError(
            f"lsh.pca_rank={h.pca_rank} is out of range; must be 0 or >= {h.projections_per_hash()} "
            f"(the projections of one hash) and <= model.d_model"
        )
    if h.kernels == "triton" and h.torch_only():
        raise ConfigError(
            f"lsh.kernels=triton does not implement {', '.join(h.torch_only())}; use lsh.kernels=auto or torch"
        )
    try:
        h.layer_ids()
    except ValueError:
        raise ConfigError(f"lsh.layers={h.layers!r} must be 'all' or comma-separated block indices") from None


def _train_rules(t: TrainConfig) -> None:
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


def _data_rules(d: DataConfig) -> None:
    if not d.field.strip():
        raise ConfigError("data.field='' is not valid; name the text column (default: text)")


SECTION_RULES: dict[type, Callable[[Any], None]] = {
    ModelConfig: _model_rules,
    MoEConfig: _moe_rules,
    LSHConfig: _lsh_rules,
    AutoConfig: lambda a: a.candidate_names(),
    TrainConfig: _train_rules,
    DataConfig: _data_rules,
    FaultConfig: lambda f: f.faults(),
}
SECTION_OF = {f.default_factory: f.name for f in dataclasses.fields(Config)}  # type: ignore[misc]


def check_type(path: str, value: Any, tp: Any) -> None:
    """A value given in Python has the declared type (the message is the one coercion gives a YAML value)."""
    if value is None and _is_optional(tp):
        return
    base = next((a for a in getattr(tp, "__args__", ()) if a is not type(None)), tp)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
        float: lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }.get(base, lambda v: True)(value)
    if not ok:
        raise ConfigError(f"{path}: expected {type_name(tp)}, got {value!r}")
    if base is float and not math.isfinite(value):
        raise ConfigError(f"{path}: must be a finite number, got {value!r}")


def check_section(obj: Any) -> None:
    """On construction of a section: every field given a value other than its default (defaults are valid,
    and comparing them keeps a registry's names unread), then the section's own rules."""
    name = SECTION_OF[type(obj)]
    hints = leaf_types(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is f.default or value == f.default:
            continue
        path = f"{name}.{f.name}"
        check_type(path, value, hints[f.name])
        check_leaf(path, value, dict(f.metadata))
    rules = SECTION_RULES.get(type(obj))
    if rules is not None:
        rules(obj)


# ------------------------------------------------------------------------------------ the whole tree


def _validate_lsh(cfg: Config) -> None:
    h = cfg.lsh
    b = h.buckets_per_hash
    _lsh_rules(h)
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
    _train_rules(cfg.train)
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
    _model_rules(m)
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
    _moe_rules(e)
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
    _data_rules(dc)
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
