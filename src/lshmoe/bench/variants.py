"""Named configuration variants for side-by-side benchmarks.

A variant is a set of `section.key=value` overrides applied on top of the benchmark's base config.
Built-in names cover the comparisons of the report; `name:key=value;key=value` defines another.
"""

from __future__ import annotations

import copy

from lshmoe.config import Config, ConfigError, set_value, validate

BUILTIN = {
    "baseline": {"moe.compress": "identity"},
    "lsh": {"moe.compress": "lsh"},
    "lsh-comp": {"moe.compress": "lsh", "lsh.compensation": "identity"},
    "lsh-nocomp": {"moe.compress": "lsh", "lsh.compensation": "none"},
    "lsh-calibrated": {"moe.compress": "lsh", "lsh.compensation": "calibrated"},
    # what practitioners use instead, and the per-layer choice among them
    "dedup": {"moe.a2a": "dedup"},
    "fp8": {"moe.compress": "fp8"},
    "lsh+fp8": {"moe.compress": "lsh+fp8"},
    "auto": {"moe.compress": "auto"},
    # architectures (ScMoE paper's comparison): top-2 MoE, shared expert + top-1, ScMoE, DGMoE
    "top2": {"model.arch": "gpt", "moe.top_k": "2"},
    "shared": {"model.arch": "shared", "moe.top_k": "1"},
    "scmoe-pos1": {"model.arch": "scmoe", "model.shortcut": "pos1", "moe.top_k": "1"},
    "scmoe-pos2": {"model.arch": "scmoe", "model.shortcut": "pos2", "moe.top_k": "1"},
    "scmoe-pos3": {"model.arch": "scmoe", "model.shortcut": "pos3", "moe.top_k": "1"},
    "dgmoe": {"model.arch": "dgmoe", "moe.top_k": "1"},
}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'lsh', 'scmoe-pos2+lsh' (built-ins merged left to right) or 'mine:lsh.num_hashes=8;moe.compress=lsh'."""
    if text in BUILTIN:  # before splitting on "+": `lsh+fp8` is one built-in
        return text, dict(BUILTIN[text])
    if ":" not in text:
        merged: dict[str, str] = {}
        for part in text.split("+"):
            if part not in BUILTIN:
                raise ConfigError(
                    f"variant {part!r}: unknown; built-in: {', '.join(BUILTIN)} (combine with +, or name:key=value;...)"
                )
            merged.update(BUILTIN[part])
        return text, merged
    name, spec = text.split(":", 1)
    overrides = {}
    for item in filter(None, (t.strip() for t in spec.split(";"))):
        if "=" not in item:
            raise ConfigError(f"variant {text!r}: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v.strip()
    return name.strip(), overrides


def apply(base: Config, overrides: dict[str, str], world_size: int | None = None) -> Config:
    cfg = copy.deepcopy(base)
    for k, v in overrides.items():
        set_value(cfg, k, v)
    return validate(cfg, world_size)
