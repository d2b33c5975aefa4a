"""Building a config: YAML files, `section.key=value` overrides, and the old names of moved keys.

Precedence (applied by the CLI): defaults < YAML < `--set` < flags. Unknown sections or keys and
wrong types fail with one line naming the field. A key that moved to a system's own section
(`ALIASES`, e.g. `model.shortcut` -> `scmoe.shortcut`) is accepted under its old name everywhere.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from lshmoe.config.fields import coerce, leaf_types
from lshmoe.config.schema import ALIASES, SECTIONS, Config
from lshmoe.errors import ConfigError


def resolve(section: str, key: str) -> tuple[str, str]:
    """(section, key) after following an alias of a moved key."""
    new = ALIASES.get(f"{section}.{key}")
    return tuple(new.split(".", 1)) if new else (section, key)  # type: ignore[return-value]


def from_dict(raw: dict[str, Any], base: Config | None = None, source: str = "config") -> Config:
    """Overlay a nested dict (e.g. parsed YAML) on `base`; unknown keys and wrong types are errors."""
    cfg = _deepcopy(base) if base is not None else Config()
    if raw is None:
        return cfg
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, got {type(values).__name__}")
        for key, value in values.items():
            _assign(cfg, section, key, value, f"{source}: unknown key {section}.{key}")
    return cfg


def _assign(cfg: Config, section: str, key: str, value: Any, unknown: str) -> None:
    """Coerce and set one leaf (following an alias); `unknown` starts the error for a bad key."""
    sec, k = resolve(section, key)
    hints = leaf_types(type(getattr(cfg, sec)))
    if k not in hints:
        valid = ", ".join(sorted(leaf_types(type(getattr(cfg, section)))))
        raise ConfigError(f"{unknown}; valid keys: {valid}")
    setattr(getattr(cfg, sec), k, coerce(f"{sec}.{k}", value, hints[k]))


def _deepcopy(cfg: Config) -> Config:
    # NOTE: copy.copy, not dataclasses.replace: a base mutated field by field is checked by validate(), not
    # by a section's construction halfway through an overlay
    return Config(**{s: copy.copy(getattr(cfg, s)) for s in SECTIONS})


def load_yaml(path: str | Path, base: Config | None = None) -> Config:
    """Read a YAML config file; a missing or malformed file is a one-line ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--config {p}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {p}: not a UTF-8 text file") from None
    return from_dict(raw or {}, base, source=str(p))


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Apply one `section.key=value` override (strings coerced to the field's type)."""
    if "." not in dotted:
        raise ConfigError(f"override {dotted!r}: expected section.key (sections: {', '.join(SECTIONS)})")
    section, key = dotted.split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"override {dotted!r}: unknown section {section!r}; valid: {', '.join(SECTIONS)}")
    _assign(cfg, section, key, value, f"override {dotted!r}: unknown key")


def apply_sets(cfg: Config, items: list[str]) -> Config:
    """Apply `--set SECTION.KEY=VALUE` items in order; return `cfg`."""
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), value)
    return cfg
