"""The machinery of the config tree: field declarations and value coercion (no schema here).

A leaf field is declared with `_f(default, help, choices=..., ge=..., flag=...)`: its help text, its
valid range (checked by `validate`) and, optionally, its short command-line flag. `coerce` turns a
YAML or command-line value into the declared type, or raises a one-line ConfigError naming the field.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import field
from typing import Any

from lshmoe.errors import ConfigError


def _f(
    default: Any,
    help: str,
    *,
    choices: tuple = (),
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    flag: str | None = None,
) -> Any:
    """A config field with its help text and valid range (checked by `validate`)."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "flag": flag}
    return field(default=default, metadata=meta)


def leaf_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    name = getattr(base, "__name__", str(base))
    return f"{name} or none" if _is_optional(tp) else name


def _is_optional(tp: Any) -> bool:
    return (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in typing.get_args(tp)


def coerce(path: str, value: Any, tp: Any) -> Any:
    """Convert a YAML or command-line value to the declared type, or raise a one-line ConfigError."""
    if _is_optional(tp):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    bad = ConfigError(f"{path}: expected {type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int | float):
            value = float(value)
        elif isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(value):
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover - programming error
