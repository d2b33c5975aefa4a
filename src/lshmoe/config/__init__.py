"""Typed configuration: the schema (schema.py), its machinery (fields.py, io.py) and every rule
(validate.py). `from lshmoe.config import X` reaches all of them.

A config is a tree of dataclasses, one section per system (see schema.py). Each leaf field declares
its help text and valid range through `_f(...)`; `validate()` checks ranges, choices and every
cross-field rule and raises `ConfigError` with one line that names the field, the bad value and what
is allowed. YAML files and `--flag value` overrides are coerced to the declared types, so a wrong
type or an unknown key fails the same way, before any process is started.

The config is the bottom floor of the package: it imports no other lshmoe package but `errors`
(the compressor and dispatcher names are read from their registries on first use; fields.py).
"""

from lshmoe.config.fields import Registered, _f, coerce, leaf_types
from lshmoe.config.io import apply_sets, from_dict, load_yaml, resolve, set_value
from lshmoe.config.schema import (
    ALIASES,
    AUTO_CHOICES,
    DTYPES,
    FAULT_KINDS,
    FLAG_PREFIX,
    PLACEMENTS,
    SCRATCH_LR,
    SECTIONS,
    AutoConfig,
    Config,
    DataConfig,
    DistConfig,
    Fault,
    FaultConfig,
    InferConfig,
    LinaConfig,
    LocMoEConfig,
    LSHConfig,
    ModelConfig,
    MoEConfig,
    QuantConfig,
    ScMoEConfig,
    Section,
    TrainConfig,
    UpcycleConfig,
    leaf_fields,
    section_class,
)
from lshmoe.config.validate import validate, validate_ep, validate_inference
from lshmoe.errors import ConfigError

__all__ = [
    "ALIASES",
    "AUTO_CHOICES",
    "DTYPES",
    "FAULT_KINDS",
    "FLAG_PREFIX",
    "PLACEMENTS",
    "SCRATCH_LR",
    "SECTIONS",
    "Section",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "Fault",
    "FaultConfig",
    "InferConfig",
    "LSHConfig",
    "LinaConfig",
    "LocMoEConfig",
    "ModelConfig",
    "MoEConfig",
    "QuantConfig",
    "AutoConfig",
    "Registered",
    "ScMoEConfig",
    "TrainConfig",
    "UpcycleConfig",
    "_f",
    "apply_sets",
    "coerce",
    "from_dict",
    "leaf_fields",
    "leaf_types",
    "load_yaml",
    "resolve",
    "section_class",
    "set_value",
    "validate",
    "validate_ep",
    "validate_inference",
]
