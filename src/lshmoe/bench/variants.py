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
}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'lsh' or 'mine:lsh.num_hashes=8;moe.compress=lsh' -> (name, overrides)."""
    if ":" not in text:
        if text not in BUILTIN:
            raise ConfigError(f"variant {text!r}: unknown; built-in: {', '.join(BUILTIN)} (or name:key=value;...)")
        return text, dict(BUILTIN[text])
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
