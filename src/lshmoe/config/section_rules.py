"""The rules of one config section alone, run when the section is constructed (schema.py's
`Section.__post_init__`) and again by `validate()` on the whole tree, with the same messages: a Python
user's `MoEConfig(top_k=9, num_experts=8)` fails as `--top-k 9` does on the command line.

This module sits below the schema: it knows a section by its class name (`MoEConfig` is the section
`moe`), reads nothing but the section it is given, and imports no other part of the config.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

from lshmoe.config.fields import _is_optional, check_leaf, leaf_types, type_name
from lshmoe.errors import ConfigError


def _model_rules(m: Any) -> None:  # ModelConfig
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


def _moe_rules(e: Any) -> None:  # MoEConfig
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
    if e.grad_path and e.compress != "identity":  # only the identity compressor builds the path
        raise ConfigError(
            f"moe.grad_path={e.grad_path} needs moe.compress=identity (got {e.compress}); "
            "with lsh the same path is lsh.grad_compensation"
        )
    if e.grad_path and e.a2a == "dedup":
        # NOTE: dedup weights rows on the experts' side and combines with unit weights: the path would
        # skip the gate weight that LSH's residual gets
        raise ConfigError(
            f"moe.grad_path={e.grad_path} needs moe.a2a=flat or hierarchical (dedup weights the rows remotely)"
        )


def _lsh_rules(h: Any) -> None:  # LSHConfig
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


def _train_rules(t: Any) -> None:  # TrainConfig
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


def _data_rules(d: Any) -> None:  # DataConfig
    if not d.field.strip():
        raise ConfigError("data.field='' is not valid; name the text column (default: text)")


RULES: dict[str, Callable[[Any], None]] = {  # by section class name
    "ModelConfig": _model_rules,
    "MoEConfig": _moe_rules,
    "LSHConfig": _lsh_rules,
    "AutoConfig": lambda a: a.candidate_names(),
    "TrainConfig": _train_rules,
    "DataConfig": _data_rules,
    "FaultConfig": lambda f: f.faults(),
}


def section_name(cls: type) -> str:
    """The config key of a section class: `MoEConfig` -> `moe` (the Config tree names its fields so)."""
    return cls.__name__.removesuffix("Config").lower()


def section_rules(obj: Any) -> None:
    """The section's own cross-field rules (none for most)."""
    rules = RULES.get(type(obj).__name__)
    if rules is not None:
        rules(obj)


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
    name = section_name(type(obj))
    hints = leaf_types(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is f.default or value == f.default:
            continue
        path = f"{name}.{f.name}"
        check_type(path, value, hints[f.name])
        check_leaf(path, value, dict(f.metadata))
    section_rules(obj)
