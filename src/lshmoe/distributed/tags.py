"""Collective tags: one helper builds and parses every tag the ledger records.

A tag names what a collective is for, e.g. `moe3.dispatch` (layer 3's token dispatch), `moe3.counts`
(its row-count exchange), `moe3.combine.lane` (the inter-node half of a two-level combine) or
`grad.chunk.17`. The ledger, Lina's gradient scheduler, its timeline checker and ScMoE's slot
planner all read tags; they parse them here instead of each splitting strings their own way, so a
renamed op cannot silently break a reader.

`Tag` is a `str` (it travels through `Comm` and the JSON ledger unchanged) with parsed views:
    Tag.moe(3, MoEOp.DISPATCH, "lane") == "moe3.dispatch.lane"
    Tag("moe3.dispatch.lane").layer == 3; .op == "dispatch"; .part == "lane"
"""

from __future__ import annotations

from enum import Enum


class MoEOp(str, Enum):
    """The exchanges of one MoE layer."""

    COUNTS = "counts"  # per-expert row counts (metadata of the dispatch)
    DISPATCH = "dispatch"  # rows to their experts
    COMBINE = "combine"  # expert outputs back to their tokens
    PROBE = "probe"  # off-path measurements (restore-error probe), phase `metrics`


MOE_PREFIX = "moe"


class Tag(str):
    """A collective's tag; parsing is lazy and never fails (foreign tags have `layer is None`)."""

    __slots__ = ()

    @classmethod
    def moe(cls, layer: int, op: MoEOp, part: str | None = None) -> Tag:
        return cls(f"{MOE_PREFIX}{layer}.{op.value}" + (f".{part}" if part else ""))

    @classmethod
    def of(cls, scope: str, *parts: object) -> Tag:
        """Any other tag: `Tag.of("grad", "chunk", 17) == "grad.chunk.17"`."""
        return cls(".".join([scope, *map(str, parts)]))

    @property
    def scope(self) -> str:
        """The first component: `moe3`, `grad`, `metrics`."""
        return self.split(".", 1)[0]

    @property
    def layer(self) -> int | None:
        """The MoE layer id of an MoE tag, else None."""
        s = self.scope
        if s.startswith(MOE_PREFIX) and s[len(MOE_PREFIX) :].isdigit():
            return int(s[len(MOE_PREFIX) :])
        return None

    @property
    def op(self) -> str | None:
        """The second component (`dispatch`, `combine`, `counts`, ...), None when absent."""
        parts = self.split(".")
        return parts[1] if len(parts) > 1 else None

    @property
    def part(self) -> str | None:
        """What follows the op (`lane`, `node`), None when absent."""
        parts = self.split(".", 2)
        return parts[2] if len(parts) > 2 else None

    def is_moe(self, op: MoEOp) -> bool:
        return self.layer is not None and self.op == op.value
