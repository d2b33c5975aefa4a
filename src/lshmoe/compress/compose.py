"""A compressor made of two: the second compresses the first's payload (`lsh+fp8`).

    compress: rows_ND ─► first ─► payload_PD ─► second ─► payload_MD
    restore:  out_MD ─► second.restore ─► out_PD ─► first.restore ─► out_ND

The wire codecs are the second's (or the first's when the second has none), so in `lsh+fp8` the
LSH centroids cross the exchanges as FP8 bytes on the directions `quant.directions` selects. A part
that is inactive in the current mode (`active(training)` False) is skipped; the parts used by a
call are recorded in its meta, so restore undoes exactly what compress did. Stats, probes and state
are the parts' own (state keys prefixed with the part's name).
"""

from __future__ import annotations

from typing import Any

import torch

from lshmoe.compress.protocol import AllReduce, CompressorBase, Evaluate, Positions, Stat
from lshmoe.compress.registry import CompressorContext, build_compressor
from lshmoe.distributed.wire import NO_WIRES, Wires


class ComposedCompressor(CompressorBase):
    def __init__(self, first, second):
        self.parts = (first, second)
        self.name = f"{first.name}+{second.name}"
        self.rows_are_tokens = first.rows_are_tokens and second.rows_are_tokens
        self.needs_positions = first.needs_positions or (first.rows_are_tokens and second.needs_positions)
        self._used = self.parts

    @property
    def stats(self) -> dict[str, Stat]:
        return {k: v for p in self.parts for k, v in p.stats.items()}

    def set_step(self, step: int) -> None:
        for p in self.parts:
            p.set_step(step)

    def active(self, training: bool) -> bool:
        self._used = tuple(p for p in self.parts if p.active(training))
        return bool(self._used)

    def wires(self) -> Wires:
        for p in reversed(self._used):
            if p.wires() != NO_WIRES:
                return p.wires()
        return NO_WIRES

    def compress(
        self, rows_ND: torch.Tensor, counts_E: torch.Tensor, positions: Positions | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        metas = []
        for p in self._used:
            rows_ND, counts_E, m = p.compress(rows_ND, counts_E, positions)
            metas.append((p, m))
            # NOTE: the next part's rows are the tokens' rows only when this part sent token copies
            positions = positions if p.rows_are_tokens else None
        return rows_ND, counts_E, tuple(metas)

    def restore(self, out_MD: torch.Tensor, meta: Any) -> torch.Tensor:
        for p, m in reversed(meta):
            out_MD = p.restore(out_MD, m)
        return out_MD

    def probe_due(self, training: bool) -> bool:
        return any(p.probe_due(training) for p in self._used)

    def probe(self, meta: Any, evaluate: Evaluate, all_reduce: AllReduce) -> None:
        for p, m in meta:
            if p.probe_due(True):
                p.probe(m, evaluate, all_reduce)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{p.name}.{k}": v for p in self.parts for k, v in p.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for p in self.parts:
            prefix = f"{p.name}."
            p.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})


def compose(first, second):
    """`first` then `second`; a part that is the identity compressor drops out."""
    if first.name == "identity":
        return second
    if second.name == "identity":
        return first
    return ComposedCompressor(first, second)


def build_lsh_fp8(ctx: CompressorContext):
    """LSH centroids quantized to FP8 on the wire (the LSH part follows `lsh.layers`)."""
    return compose(build_compressor("lsh", ctx), build_compressor("fp8", ctx))
