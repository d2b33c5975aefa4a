"""Compressors by name: the one registration point of the compressor seam (`moe.compress`).

An entry maps a name to `module:function`; the function takes a `CompressorContext` and returns a
compressor for that layer, or None to send that layer's rows uncompressed. Entries are imported
when first built, so this module (and the config schema that lists the names) stays import-light.
Adding a compressor is one new module plus one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lshmoe.errors import ConfigError

if TYPE_CHECKING:
    from lshmoe.config import Config

REGISTRY: dict[str, str] = {
    "identity": "lshmoe.compress.identity:build",
    "lsh": "lshmoe.compress.lsh:build",
    "fp8": "lshmoe.compress.quant:build_fp8",
    "int8": "lshmoe.compress.quant:build_int8",
    "lsh+fp8": "lshmoe.compress.compose:build_lsh_fp8",
    "auto": "lshmoe.compress.auto:build",
}
NAMES = tuple(REGISTRY)


@dataclass(frozen=True, slots=True)
class CompressorContext:
    """What a compressor may depend on: the layer's shape and place, the run's settings (the root
    config, whose section named like the compressor holds its options; None = defaults, see
    `config()`), whether the model is a causal LM (`causal`: a row's output may depend only on rows
    at earlier positions of its own sequence; the model builder says so) and the topology: the node
    of each global expert and of this rank (empty = one node).
    `ep_size`/`ep_index`: the expert-parallel group (expert e lives on EP rank e // (E / ep_size));
    `link()`: the layer's forward exchanges so far in this step, from the comm ledger (see
    `MoELayer._link_sample`); `log(msg)`: a line for the user (rank 0 prints it)."""

    num_experts: int
    d_model: int
    layer_id: int
    seed: int = 0
    settings: Config | None = None
    node_of_E: tuple[int, ...] = ()
    my_node: int = 0
    ep_size: int = 1
    ep_index: int = 0
    link: Callable[[], tuple[float, float, int, float]] | None = None
    log: Callable[[str], None] | None = None
    causal: bool = False

    def config(self) -> Config:
        """The run's config tree (the defaults when the context holds none)."""
        # NOTE: imported here: config/schema.py reads this module's NAMES, so a module-level import
        # of lshmoe.config would be a circle
        from lshmoe.config import Config

        return self.settings if self.settings is not None else Config()


def build_compressor(name: str, ctx: CompressorContext):
    """The compressor `name` for one layer (the identity one where its builder declines)."""
    from lshmoe.compress.identity import IDENTITY

    if name not in REGISTRY:
        raise ConfigError(f"moe.compress={name!r} is not a registered compressor; choose one of: {', '.join(NAMES)}")
    module, fn = REGISTRY[name].split(":")
    built = getattr(importlib.import_module(module), fn)(ctx)
    return IDENTITY if built is None else built
