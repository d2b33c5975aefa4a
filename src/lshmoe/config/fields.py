"""The machinery of the config tree: field declarations and value coercion (no schema here).

A leaf field is declared with `_f(default, help, choices=..., ge=..., flag=...)`: its help text, its
valid range (checked by `validate`) and, optionally, its short command-line flag. `coerce` turns a
YAML or command-line value into the declared type, or raises a one-line ConfigError naming the field.

`choices` is a tuple, or `Registered("module:NAMES")` for the names of a registry that lives above
the config (the compressors, the dispatchers). Why a reference and not the names themselves: the
config is the bottom floor of the package and imports no other lshmoe package but `errors`, yet a
registry stays the one place a compressor or dispatcher is added (one module plus one line there).
The reference is resolved on first use, by `validate` and by the CLI's help, when the whole package
is importable; importing the config imports no registry (tests/test_floors.py checks it), so a
dispatcher or compressor may import `lshmoe.config` without closing a circle.
"""

from __future__ import annotations

import functools
import importlib
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import field
from typing import Any

from lshmoe.errors import ConfigError


@functools.cache
def _resolve(ref: str) -> tuple[str, ...]:
    module, name = ref.split(":")
    return tuple(getattr(importlib.import_module(module), name))


class Registered(Sequence):
    """The names of a registry above the config, `"module:NAMES"`, read on first use (module docstring)."""

    __slots__ = ("ref",)

    def __init__(self, ref: str):
        self.ref = ref

    def __getitem__(self, i):  # type: ignore[override]
        return _resolve(self.ref)[i]

    def __len__(self) -> int:
        return len(_resolve(self.ref))

    def __repr__(self) -> str:
        return f"Registered({self.ref!r})"


def _f(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] = (),
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


def _range_text(meta: dict[str, Any], tp: Any = None) -> str:
    parts = []
    for op, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if meta.get(op) is not None:
            bound = meta[op]
            parts.append(f"{sym} {int(bound) if float(bound).is_integer() else bound}")
    return " and ".join(parts)


def check_leaf(path: str, value: Any, meta: dict[str, Any], tp: Any = None) -> None:
    """One field's declared choices and range; a one-line ConfigError naming `path` (the dotted field)."""
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
